//! Minimal QMP client for the harness's own use (quit, human-monitor-command).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::HarnessError;

/// A QMP session in command mode.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn perr(e: std::io::Error) -> HarnessError {
    HarnessError::io("QMP", e)
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Qmp, HarnessError> {
        let s = UnixStream::connect(path).map_err(perr)?;
        s.set_read_timeout(Some(timeout)).map_err(perr)?;
        s.set_write_timeout(Some(timeout)).map_err(perr)?;
        let writer = s.try_clone().map_err(perr)?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(HarnessError::Protocol(format!(
                "bad QMP greeting {greeting}"
            )));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, HarnessError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).map_err(perr)? == 0 {
            return Err(HarnessError::Protocol("QMP connection closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| HarnessError::Protocol(format!("bad QMP message {line:?}: {e}")))
    }

    /// Runs a QMP command and returns its `return` value (events are skipped).
    pub(crate) fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, HarnessError> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").map_err(perr)?;
        for _ in 0..1000 {
            let v = self.read_msg()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(HarnessError::Protocol(format!("QMP {cmd}: {e}")));
            }
        }
        Err(HarnessError::Protocol(format!("QMP {cmd}: no reply")))
    }
}
