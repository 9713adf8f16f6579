//! A guard process that leaves the guest running if `hvpatch attach` dies without detaching.
//!
//! QEMU stops the VM when a debugger connects and does nothing when the connection drops: if
//! hvpatch were killed (SIGKILL, OOM, crash) while the guest is paused — inside a load or an
//! unload, or after `vm pause` — the tenant would stay frozen, and any breakpoints would stay
//! set. So `hvpatch attach` first starts a small copy of itself (`hvpatch __attach-guard`) in
//! its own process group, holding a pipe from the parent. On a clean exit the parent writes
//! [`RELEASE`] and the guard exits; if the pipe closes without it, the parent died: the guard
//! connects to the gdbstub itself and sends `D` (detach), which makes QEMU remove every
//! breakpoint and resume the VM.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::gdb::GdbClient;
use super::AttachError;

/// The byte a parent writes when it detached cleanly.
pub const RELEASE: u8 = b'q';

/// The parent's handle on its guard.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Guard {
    /// Starts the guard for the gdbstub at `gdb_socket` (running this executable with the
    /// hidden `__attach-guard` command).
    pub fn spawn(gdb_socket: &Path) -> Result<Guard, AttachError> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|e| AttachError::Guard(e.to_string()))?;
        let mut child = Command::new(exe)
            .arg("__attach-guard")
            .arg("--qemu-gdb")
            .arg(gdb_socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| AttachError::Guard(format!("cannot start the guard process: {e}")))?;
        let pipe = child.stdin.take();
        Ok(Guard { child, pipe })
    }

    /// Tells the guard that hvpatch detached cleanly; it exits without touching QEMU.
    pub fn release(mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(&[RELEASE]);
        }
        let _ = self.child.wait();
    }
}

/// The guard process: waits for its parent to go; if it went without [`RELEASE`], detaches
/// from the gdbstub at `gdb_socket` so QEMU resumes the guest. Returns the exit code.
pub fn run_guard(gdb_socket: &Path) -> i32 {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut got = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut got);
    if got.contains(&RELEASE) {
        return 0;
    }
    tracing::warn!("hvpatch attach went away without detaching; detaching for it");
    for attempt in 0..20 {
        match detach(gdb_socket) {
            Ok(()) => {
                tracing::warn!("detached from the gdbstub; the guest runs on");
                return 0;
            }
            Err(e) => {
                tracing::warn!("detach attempt {attempt}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    1
}

fn detach(gdb_socket: &Path) -> Result<(), AttachError> {
    let mut gdb = GdbClient::connect(gdb_socket)?;
    // The connection stops the VM; a stop reply shows the stub is listening to us. Send `D`
    // whatever happens: a connection QEMU accepted must never be dropped without it (the VM
    // would stay stopped).
    for _ in 0..3 {
        if gdb.command("?", Duration::from_secs(2)).is_ok() {
            break;
        }
    }
    gdb.command_ok("D", Duration::from_secs(5))?;
    Ok(())
}
