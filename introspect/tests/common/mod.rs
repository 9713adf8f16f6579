//! Shared helpers of the introspect integration tests: loading the guest snapshots (see
//! [`snapshot_dir`]; made by `cargo run --release -p hvpatch-tests --example snapshots`).

#![allow(dead_code)]

pub mod hmp;
pub mod snapshot_dir;
pub mod synth;

use std::sync::OnceLock;

use introspect::VcpuRegs;
use snapshot_dir::{read_snapshot, snapshot_dir};

/// A memory snapshot of a booted guest plus the guest's own ground truth.
pub struct Dump {
    /// Kernel version directory name ("6.1" / "6.12").
    pub version: &'static str,
    /// Guest-physical RAM from 0.
    pub ram: Vec<u8>,
    /// vCPU registers at the same pause.
    pub vcpus: Vec<VcpuRegs>,
    /// /proc/kallsyms as root.
    pub kallsyms: String,
    /// "== PID COMM" + /proc/PID/stack blocks.
    pub stacks: String,
    /// `uname -a`.
    pub uname: String,
    /// ps output.
    pub ps: String,
    /// /proc/cmdline.
    pub cmdline: String,
}

fn read(version: &str, file: &str) -> Vec<u8> {
    read_snapshot(version, file)
}

fn load(version: &'static str) -> Dump {
    let text = |f| String::from_utf8_lossy(&read(version, f)).into_owned();
    let vcpus = hmp::parse_hmp_registers(&text("regs.txt"));
    assert!(
        !vcpus.is_empty(),
        "no CPU# blocks in {}/regs.txt",
        snapshot_dir(version).display()
    );
    Dump {
        version,
        ram: read(version, "ram.bin"),
        vcpus,
        kallsyms: text("kallsyms.txt"),
        stacks: text("stacks.txt"),
        uname: text("uname.txt"),
        ps: text("ps.txt"),
        cmdline: text("cmdline.txt"),
    }
}

/// The 6.1 snapshot (loaded once per test binary).
pub fn dump_6_1() -> &'static Dump {
    static D: OnceLock<Dump> = OnceLock::new();
    D.get_or_init(|| load("6.1"))
}

/// The 6.12 snapshot (loaded once per test binary).
pub fn dump_6_12() -> &'static Dump {
    static D: OnceLock<Dump> = OnceLock::new();
    D.get_or_init(|| load("6.12"))
}

/// The 6.12 snapshot booted with `pti=on`, one vCPU caught in user mode (two `spin` loops).
pub fn dump_6_12_pti() -> &'static Dump {
    static D: OnceLock<Dump> = OnceLock::new();
    D.get_or_init(|| load("6.12-pti"))
}
