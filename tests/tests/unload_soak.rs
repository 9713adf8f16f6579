//! Unload safety under load, on booted 6.1 and 6.12 guests (QEMU attach): 200 load/unload
//! cycles of a patch of `version_proc_show` while a `hammer` on every vCPU reads /proc/version.
//! Fails on any guest oops, BUG, WARNING or panic, on any failed operation, on a hammer that
//! never saw both outputs, and on kernel text or arena pages left different. The 1000-cycle
//! version with numbers: `cargo run --release -p hvpatch-tests --example unload_soak`.

use harness::soak::run_soak;
use harness::KernelSeries;

const CYCLES: usize = 200;

fn soak(series: KernelSeries) {
    let rep = run_soak(series, CYCLES, &mut |n, r| {
        eprintln!("{series:?}: {n} cycles, {} waited", r.waited)
    })
    .unwrap_or_else(|e| panic!("{series:?}: {e}"));
    eprintln!("{rep}");
    assert_eq!(rep.cycles, CYCLES);
}

#[test]
fn unload_soak_6_1() {
    soak(KernelSeries::V6_1);
}

#[test]
fn unload_soak_6_12() {
    soak(KernelSeries::V6_12);
}
