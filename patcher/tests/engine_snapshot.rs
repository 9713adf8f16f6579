//! The engine on saved guest memory snapshots (/tmp/hvpatch-dumps, 6.1 and 6.12): load/unload,
//! stacking, refusals, rollback — comparing the whole guest RAM byte for byte. The same
//! scenarios run in CI on snapshots taken from freshly booted guests
//! (tests/tests/patch_snapshot.rs); these run on the saved dumps for quick local iteration:
//! `cargo test -p hvpatch-patcher --test engine_snapshot -- --ignored`.

mod common;

use common::scenarios::*;
use common::{snap_6_1, snap_6_12};

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn load_unload_restores_ram_6_1() {
    load_unload_roundtrip(snap_6_1());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn load_unload_restores_ram_6_12() {
    load_unload_roundtrip(snap_6_12());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn stacked_patches_6_1() {
    stacking(snap_6_1());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn stacked_patches_6_12() {
    stacking(snap_6_12());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn bad_loads_leave_ram_unchanged_6_1() {
    bad_loads(snap_6_1());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn bad_loads_leave_ram_unchanged_6_12() {
    bad_loads(snap_6_12());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn failed_write_is_rolled_back() {
    failed_write_rollback(snap_6_12());
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn works_with_introspect_kernel_6_1() {
    with_introspect(snap_6_1(), 12);
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn works_with_introspect_kernel_6_12() {
    with_introspect(snap_6_12(), 13);
}

#[test]
#[ignore = "needs /tmp/hvpatch-dumps (python3 /tmp/hvpatch-dumps/dump.py <ver>); CI runs the same on live snapshots in tests/tests/patch_snapshot.rs"]
fn sealed_endbr_site_6_12() {
    sealed_endbr_site(snap_6_12());
}
