//! Fuzz page-table walks: the first 17 bytes pick the root, the paging levels and a virtual
//! address; the rest is guest-physical memory from 0.
#![no_main]

use introspect::paging::{self, PageRoot};
use introspect::SliceMemory;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let root = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
    let levels = if data[8] & 1 == 0 { 4 } else { 5 };
    let va = u64::from_le_bytes(data[9..17].try_into().unwrap_or_default());
    let mem = SliceMemory::flat(&data[17..]);
    let root = PageRoot::from_cr3(root, levels == 5);
    let _ = paging::walk(&mem, root, va);
    let _ = paging::walk_or_hole(&mem, root, va);
    let mut buf = [0u8; 64];
    let _ = paging::read_virt(&mem, root, va.wrapping_sub(32), &mut buf);
    let _ = paging::mapped_ranges(
        &mem,
        root,
        va & !0xfff,
        (va & !0xfff).saturating_add(64 << 12),
    );
});
