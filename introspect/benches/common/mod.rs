//! Shared by the introspect benches: best-of-N timing and loading a guest snapshot
//! (`[ram.bin] [regs.txt]` from the command line, else the 6.12 snapshot).

#[path = "../../tests/common/hmp.rs"]
mod hmp;
#[path = "../../tests/common/snapshot_dir.rs"]
mod snapshot_dir;

use std::time::{Duration, Instant};

use introspect::VcpuRegs;

/// Runs `f` `runs` times; returns the fastest time and the last result.
pub fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("runs > 0"))
}

/// Guest RAM and vCPU registers of the snapshot named on the command line (or 6.12's).
pub fn load_snapshot() -> (Vec<u8>, Vec<VcpuRegs>) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let file = |i: usize, name: &str| {
        args.get(i).cloned().unwrap_or_else(|| {
            snapshot_dir::snapshot_file("6.12", name)
                .display()
                .to_string()
        })
    };
    let (ram_path, regs_path) = (file(0, "ram.bin"), file(1, "regs.txt"));
    let ram = std::fs::read(&ram_path).unwrap_or_else(|e| panic!("cannot read {ram_path}: {e}"));
    let regs = std::fs::read_to_string(&regs_path)
        .unwrap_or_else(|e| panic!("cannot read {regs_path}: {e}"));
    (ram, hmp::parse_hmp_registers(&regs))
}
