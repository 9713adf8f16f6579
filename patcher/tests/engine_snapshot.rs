//! The engine on saved guest memory snapshots (6.1 and 6.12, made by `scripts/setup` /
//! `cargo run --release -p hvpatch-tests --example snapshots`): load/unload, stacking, refusals,
//! rollback — comparing the whole guest RAM byte for byte. The same scenarios also run on
//! snapshots taken from freshly booted guests through QEMU attach (tests/tests/patch_snapshot.rs).

mod common;

use common::scenarios::*;
use common::{snap_6_1, snap_6_12};

#[test]
fn load_unload_restores_ram_6_1() {
    load_unload_roundtrip(snap_6_1());
}

#[test]
fn load_unload_restores_ram_6_12() {
    load_unload_roundtrip(snap_6_12());
}

#[test]
fn stacked_patches_6_1() {
    stacking(snap_6_1());
}

#[test]
fn stacked_patches_6_12() {
    stacking(snap_6_12());
}

#[test]
fn bad_loads_leave_ram_unchanged_6_1() {
    bad_loads(snap_6_1());
}

#[test]
fn bad_loads_leave_ram_unchanged_6_12() {
    bad_loads(snap_6_12());
}

#[test]
fn failed_write_is_rolled_back() {
    failed_write_rollback(snap_6_12());
}

#[test]
fn works_with_introspect_kernel_6_1() {
    with_introspect(snap_6_1(), 12);
}

#[test]
fn works_with_introspect_kernel_6_12() {
    with_introspect(snap_6_12(), 13);
}

#[test]
fn sealed_endbr_site_6_12() {
    sealed_endbr_site(snap_6_12());
}
