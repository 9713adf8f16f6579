//! Shared helpers of the introspect integration tests: loading the guest snapshots in
//! /tmp/hvpatch-dumps/<version>/ (made by `python3 /tmp/hvpatch-dumps/dump.py <version>`).

#![allow(dead_code)]

pub mod hmp;
pub mod synth;

use std::path::PathBuf;
use std::sync::OnceLock;

use introspect::VcpuRegs;

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

fn dir(version: &str) -> PathBuf {
    if let Some(v) = version.strip_suffix("-pti") {
        return PathBuf::from(
            std::env::var("HVPATCH_DUMPS_PTI").unwrap_or_else(|_| "/tmp/hvpatch-dumps-pti".into()),
        )
        .join(v);
    }
    PathBuf::from(std::env::var("HVPATCH_DUMPS").unwrap_or_else(|_| "/tmp/hvpatch-dumps".into()))
        .join(version)
}

fn read(version: &str, file: &str) -> Vec<u8> {
    let p = dir(version).join(file);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "missing guest snapshot file {} ({e}): run `{}` to make it",
            p.display(),
            match version.strip_suffix("-pti") {
                Some(v) => format!("python3 introspect/tests/dump_pti.py {v}"),
                None => format!("python3 /tmp/hvpatch-dumps/dump.py {version}"),
            }
        )
    })
}

fn load(version: &'static str) -> Dump {
    let text = |f| String::from_utf8_lossy(&read(version, f)).into_owned();
    let vcpus = hmp::parse_hmp_registers(&text("regs.txt"));
    assert!(
        !vcpus.is_empty(),
        "no CPU# blocks in {}/regs.txt",
        dir(version).display()
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

/// The 6.12 snapshot booted with `pti=on`, one vCPU caught in user mode
/// (`python3 introspect/tests/dump_pti.py 6.12`).
pub fn dump_6_12_pti() -> &'static Dump {
    static D: OnceLock<Dump> = OnceLock::new();
    D.get_or_init(|| load("6.12-pti"))
}
