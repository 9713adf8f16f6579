//! The serial console (ttyS0) over QEMU's stdio: a reader thread collects everything QEMU
//! prints into a transcript (also mirrored to a log file); callers wait on it with deadlines.

use std::fs::File;
use std::io::{Read, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    eof: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// Why a wait on the console ended without a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// Deadline passed.
    Timeout,
    /// QEMU closed its stdout (it exited).
    Eof,
}

/// Console input and the collected output.
pub(crate) struct Console {
    shared: Shared,
    input: ChildStdin,
    reader: Option<JoinHandle<()>>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A poisoned lock only means a reader panicked mid-append; the bytes are still usable.
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

impl Console {
    /// Starts collecting `output`, mirroring it to `log`.
    pub(crate) fn start(input: ChildStdin, mut output: ChildStdout, mut log: File) -> Console {
        let shared: Shared = Arc::default();
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("hvpatch-console".into())
            .spawn(move || {
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = match output.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let data = &chunk[..n];
                    let _ = log.write_all(data);
                    lock(&s).buf.extend_from_slice(data);
                    s.1.notify_all();
                }
                lock(&s).eof = true;
                s.1.notify_all();
            })
            .ok();
        Console {
            shared,
            input,
            reader,
        }
    }

    /// Sends bytes to the guest's ttyS0, followed by 16 newlines: QEMU's 16550 does not
    /// reliably raise the receive-timeout interrupt, so the last bytes below the guest's FIFO
    /// trigger level (8) would sit in the FIFO until more input came. Empty lines are harmless
    /// to the shell.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.input.write_all(bytes)?;
        self.input.write_all(&[b'\n'; 16])?;
        self.input.flush()
    }

    /// Number of bytes received so far.
    pub(crate) fn len(&self) -> usize {
        lock(&self.shared).buf.len()
    }

    /// Calls `find` on the transcript from byte `from` on, each time output arrives, until it
    /// returns `Some` or `deadline` passes.
    pub(crate) fn wait_for<R>(
        &self,
        from: usize,
        deadline: Instant,
        mut find: impl FnMut(&[u8]) -> Option<R>,
    ) -> Result<R, WaitError> {
        let mut st = lock(&self.shared);
        loop {
            if let Some(r) = find(st.buf.get(from..).unwrap_or(&[])) {
                return Ok(r);
            }
            if st.eof {
                return Err(WaitError::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout);
            }
            st = self
                .shared
                .1
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Transcript bytes `from..to` (clamped).
    pub(crate) fn slice(&self, from: usize, to: usize) -> Vec<u8> {
        let st = lock(&self.shared);
        let to = to.min(st.buf.len());
        st.buf.get(from.min(to)..to).unwrap_or(&[]).to_vec()
    }

    /// The last `n` bytes as text.
    pub(crate) fn tail(&self, n: usize) -> String {
        let st = lock(&self.shared);
        let start = st.buf.len().saturating_sub(n);
        String::from_utf8_lossy(&st.buf[start..]).replace("\r\n", "\n")
    }

    /// The whole transcript as text.
    pub(crate) fn transcript(&self) -> String {
        String::from_utf8_lossy(&lock(&self.shared).buf).replace("\r\n", "\n")
    }

    /// Waits for the reader thread (after QEMU was killed).
    pub(crate) fn join(&mut self) {
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}
