//! Identity page tables for 64-bit entry: the first [`IDENTITY_GIBS`] GiB with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::kvm::layout::{IDENTITY_GIBS, PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes PML4, PDPT and page directories; returns the CR3 value.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let w = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| BootError::GuestMemory(format!("page tables at {addr:#x}: {e}")))
    };
    w(PML4_ADDR, PDPT_ADDR | PRESENT_RW)?;
    for gib in 0..IDENTITY_GIBS {
        let pd = PD_ADDR + gib * 0x1000;
        w(PDPT_ADDR + gib * 8, pd | PRESENT_RW)?;
        for i in 0..512u64 {
            let pa = ((gib << 9) + i) << 21;
            w(pd + i * 8, pa | PRESENT_RW | PAGE_SIZE_2M)?;
        }
    }
    Ok(PML4_ADDR)
}
