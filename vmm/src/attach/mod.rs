//! `hvpatch attach`: control of a running QEMU guest through its gdbstub (registers, pause,
//! breakpoints, code writes) and its shared `memory-backend-file` (fast reads).
//!
//! QEMU must run with e.g.
//! `-object memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/ram,share=on
//!  -machine memory-backend=ram0 -chardev socket,id=gdb0,path=gdb.sock,server=on,wait=off
//!  -gdb chardev:gdb0`.

mod backend;
pub mod gdb;
pub mod guard;
pub mod layout;
pub mod ram;

use std::path::PathBuf;

use thiserror::Error;

pub use backend::{AttachOptions, QemuAttach, DETACHED};
pub use ram::{MemLayout, RamFile};

/// Errors of the QEMU attach backend.
#[derive(Debug, Error)]
pub enum AttachError {
    /// Connecting to the gdbstub socket failed.
    #[error("cannot connect to the QEMU gdbstub at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Opening or mapping the RAM file failed.
    #[error("cannot map the QEMU RAM file {path}: {source}")]
    MemFile {
        /// File path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The RAM file does not fit the guest (size, layout, content).
    #[error("RAM file layout: {0}")]
    MemLayout(String),
    /// Socket I/O error.
    #[error("gdbstub I/O: {0}")]
    Io(std::io::Error),
    /// The stub did not answer in time.
    #[error("the gdbstub did not answer in time")]
    Timeout,
    /// The stub closed the connection (QEMU exited).
    #[error("the gdbstub closed the connection (QEMU exited?)")]
    Closed,
    /// The stub sent something we cannot use.
    #[error("gdbstub protocol: {0}")]
    Protocol(String),
    /// The stub answered a command with an error.
    #[error("gdbstub command `{command}` failed: {reply}")]
    Stub {
        /// The command (truncated).
        command: String,
        /// The stub's reply (`Exx`).
        reply: String,
    },
    /// The stub lacks something we need.
    #[error("the gdbstub does not support {0}")]
    Unsupported(String),
    /// The guard process could not be started.
    #[error("attach guard: {0}")]
    Guard(String),
}
