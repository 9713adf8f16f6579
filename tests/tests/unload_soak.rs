//! Unload safety under load, on booted 6.1 and 6.12 guests (QEMU attach): 200 load/unload
//! cycles of a patch of `version_proc_show` while a `hammer` on every vCPU reads /proc/version,
//! and 200 of a patch of `rb_simple_read` (no ftrace site: a prologue rewrite) while they read
//! /sys/kernel/tracing/tracing_on. Fails on any guest oops, BUG, WARNING or panic, on any
//! failed operation, on a hammer that never saw every output, and on kernel text or arena
//! pages left different. The 1000-cycle version with numbers: `cargo run --release -p
//! hvpatch-tests --example unload_soak`.

use harness::soak::{run_soak_target, SoakTarget};
use harness::KernelSeries;

const CYCLES: usize = 200;

fn soak(series: KernelSeries, target: SoakTarget) {
    let rep = run_soak_target(series, target, CYCLES, &mut |n, r| {
        eprintln!("{series:?} {target:?}: {n} cycles, {} waited", r.waited)
    })
    .unwrap_or_else(|e| panic!("{series:?} {target:?}: {e}"));
    eprintln!("{rep}");
    assert_eq!(rep.cycles, CYCLES);
}

#[test]
fn unload_soak_6_1() {
    soak(KernelSeries::V6_1, SoakTarget::FtraceSite);
}

#[test]
fn unload_soak_6_12() {
    soak(KernelSeries::V6_12, SoakTarget::FtraceSite);
}

/// The soak with a prologue-rewritten function on the hammered path.
#[test]
fn unload_soak_prologue_6_1() {
    soak(KernelSeries::V6_1, SoakTarget::Prologue);
}

/// The soak with a prologue-rewritten function on the hammered path.
#[test]
fn unload_soak_prologue_6_12() {
    soak(KernelSeries::V6_12, SoakTarget::Prologue);
}
