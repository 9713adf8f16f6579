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
//!
//! The guest: `qemu-system-x86_64 -accel tcg,thread=multi`, 2 vCPUs, 512 MiB in a shared
//! `memory-backend-file` under `/dev/shm`, KASLR on, `console=ttyS0 panic=-1`, 6.1 with
//! `-cpu max,la57=off`, 6.12 with `-cpu max`; gdbstub and QMP on Unix sockets; ttyS0 on QEMU's
//! stdio, ttyS1 to a file.
//!
//! The console: after `hvpatch-guest: ready` the harness turns echo off and runs
//! `while :; do cat | sh; done` in the init shell, so commands are read by a non-interactive
//! shell (busybox ash's interactive no-echo input takes a SIGCHLD-interrupted read for end of
//! file and would exit PID 1). Each command then runs as `sh -c '<cmd>' </dev/null` followed by a
//! `printf` of an end marker with the exit status (marker digits are printf arguments, so the
//! command text never contains the marker). Consequences for callers:
//! - no shell state (variables, `cd`) carries over between calls; the guest sees root's shell;
//! - commands never read the console (stdin is `/dev/null`);
//! - kernel messages are kept off the console (`dmesg -n 1`, see
//!   [`GuestSpec::console_loglevel`]); read them with `dmesg`;
//! - a line of a command may be at most 4000 bytes (the guest tty's line limit).

mod console;
mod error;
mod guest;
mod hvpatch;
mod images;
pub mod klp;
pub mod oracle;
pub mod patching;
mod qmp;
pub mod snapshot;
pub mod soak;

pub use error::HarnessError;
pub use guest::{Guest, GuestSpec, KernelInfo};
pub use hvpatch::{hvpatch, hvpatch_bin, AttachServer, CliOutput, HvpatchError};
pub use images::{find_kernel, KernelFiles, KernelSeries};
