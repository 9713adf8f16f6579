//! The patch engine's snapshot scenarios (patcher/tests/common/scenarios.rs) on memory
//! snapshots taken from freshly booted 6.1 and 6.12 guests through QEMU attach: the whole guest
//! RAM is compared byte for byte after load/unload, stacking, refusals and injected write
//! failures (things a live guest cannot show as precisely).

#[path = "../../patcher/tests/common/mod.rs"]
mod common;

use common::scenarios::*;
use common::Snapshot;
use harness::{Guest, GuestSpec, KernelSeries};
use patcher::GuestControl;

/// Boots a guest, takes its kallsyms, release, registers and all RAM, and shuts it down.
fn live_snapshot(series: KernelSeries, version: &'static str) -> Snapshot {
    let mut g = Guest::boot(GuestSpec::new(series))
        .expect("boot (images: run `cargo run -p hvpatch-guest-images -- fetch`)");
    let kallsyms = g.run_bulk("cat /proc/kallsyms").unwrap();
    let release = g.run("uname -r").unwrap().trim().to_string();
    let mut ctl = vmm::attach::QemuAttach::connect(&g.gdb_socket(), &g.mem_file())
        .unwrap_or_else(|e| panic!("QemuAttach::connect: {e}\n{}", g.tail()));
    ctl.pause().unwrap();
    let vcpus: Vec<_> = (0..ctl.vcpu_count())
        .map(|v| ctl.regs(v).unwrap())
        .collect();
    let mut ram = vec![0u8; g.mem_size() as usize];
    ctl.memory().read_phys(0, &mut ram).unwrap();
    ctl.resume().unwrap();
    drop(ctl);
    g.shutdown().unwrap();
    Snapshot::from_parts(version, ram, vcpus, kallsyms, release)
}

#[test]
fn snapshot_scenarios_6_1() {
    let s = live_snapshot(KernelSeries::V6_1, "6.1");
    load_unload_roundtrip(&s);
    stacking(&s);
    bad_loads(&s);
    failed_write_rollback(&s);
    with_introspect(&s, 12);
}

#[test]
fn snapshot_scenarios_6_12() {
    let s = live_snapshot(KernelSeries::V6_12, "6.12");
    load_unload_roundtrip(&s);
    stacking(&s);
    bad_loads(&s);
    failed_write_rollback(&s);
    with_introspect(&s, 13);
    sealed_endbr_site(&s);
}
