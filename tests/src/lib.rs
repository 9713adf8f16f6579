//! QEMU test harness: boots a guest kernel under QEMU/TCG and drives its serial console.
//!
//! ```no_run
//! use harness::{Guest, GuestSpec, KernelSeries};
//! let mut g = Guest::boot(GuestSpec::new(KernelSeries::V6_12)).unwrap();
//! let release = g.run("uname -r").unwrap();
//! let kallsyms = g.run_bulk("cat /proc/kallsyms").unwrap();
//! let pid = g.spawn("sleep 1000").unwrap();
//! // Attach backends use g.gdb_socket() and g.mem_file().
//! ```
//!
//! Every guest is shut down when its [`Guest`] is dropped (also on panic), and QEMU gets
//! `SIGKILL` if the test process dies.

mod console;
mod error;
mod guest;
mod hvpatch;
mod images;
mod qmp;

pub use error::HarnessError;
pub use guest::{Guest, GuestSpec, KernelInfo};
pub use hvpatch::{hvpatch, hvpatch_bin, AttachServer, CliOutput, HvpatchError};
pub use images::{find_kernel, KernelFiles, KernelSeries};
