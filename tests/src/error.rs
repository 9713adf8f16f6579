//! Harness errors. Messages carry the console tail so a failing test shows what the guest did.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Errors from booting or driving a test guest.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// A guest kernel or the initramfs is missing from the image cache.
    #[error(
        "guest image {path} is missing ({what}); run `cargo run -p hvpatch-guest-images -- fetch`"
    )]
    ImageMissing {
        /// What is missing.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The image cache is incomplete or stale (the message says how to fetch it).
    #[error(transparent)]
    Images(guest_images::ImagesError),
    /// `qemu-system-x86_64` is not installed.
    #[error("qemu-system-x86_64 not found ({0}); run `apt-get install qemu-system-x86`")]
    QemuMissing(std::io::Error),
    /// Host I/O failure (temp files, sockets, pipes).
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The guest did not print its ready line in time.
    #[error("guest did not boot within {timeout:?} (no `hvpatch-guest: ready`)\n{tail}")]
    BootTimeout {
        /// The boot timeout.
        timeout: Duration,
        /// Console and QEMU log tail.
        tail: String,
    },
    /// QEMU exited (guest panic, reboot, QEMU error).
    #[error("QEMU exited ({status}) while {doing}\n{tail}")]
    QemuExited {
        /// Exit status as text.
        status: String,
        /// What the harness was doing.
        doing: String,
        /// Console and QEMU log tail.
        tail: String,
    },
    /// A guest command did not finish in time (the harness sent ^C to it).
    #[error("guest command `{cmd}` did not finish within {timeout:?}\n{tail}")]
    CommandTimeout {
        /// The command.
        cmd: String,
        /// The timeout.
        timeout: Duration,
        /// Console tail.
        tail: String,
    },
    /// A guest command exited with a non-zero status (from [`crate::Guest::run`]).
    #[error("guest command `{cmd}` exited with status {status}; output:\n{output}")]
    CommandFailed {
        /// The command.
        cmd: String,
        /// Its exit status.
        status: i32,
        /// Its console output (stdout and stderr).
        output: String,
    },
    /// The command cannot be sent over the console.
    #[error("bad guest command: {0}")]
    BadCommand(String),
    /// Unexpected data on the console, monitor or bulk port.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            what: what.into(),
            source,
        }
    }
}
