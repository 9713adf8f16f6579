//! Where the guest memory snapshots are (the one place the introspect tests and benches resolve
//! it): under `guest_images::snapshots_dir()`. Made by `harness::snapshot`.

#![allow(dead_code)]

use std::path::PathBuf;

/// Directory of snapshot `version`: "6.1", "6.12", or "<ver>-pti" for the PTI variant
/// (`<root>/pti/<ver>`).
pub fn snapshot_dir(version: &str) -> PathBuf {
    let root = guest_images::snapshots_dir();
    match version.strip_suffix("-pti") {
        Some(v) => root.join("pti").join(v),
        None => root.join(version),
    }
}

/// Path of `file` in snapshot `version`; panics with how to make it when it is missing.
pub fn snapshot_file(version: &str, file: &str) -> PathBuf {
    let p = snapshot_dir(version).join(file);
    if !p.is_file() {
        panic!(
            "guest snapshot {} missing: run `scripts/setup` (or `cargo run --release -p \
             hvpatch-tests --example snapshots`)",
            p.display()
        );
    }
    p
}

/// Reads `file` of snapshot `version` (panics like [`snapshot_file`]).
pub fn read_snapshot(version: &str, file: &str) -> Vec<u8> {
    let p = snapshot_file(version, file);
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading guest snapshot {}: {e}", p.display()))
}
