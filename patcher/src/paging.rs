//! The small part of x86-64 paging the engine needs: translating kernel VAs and locating the
//! page-directory entry (PMD) of a 2 MiB slot so that the arena can be mapped there.

use introspect::paging::{table_index, walk_or_hole, PageRoot, WalkOutcome};
use introspect::{PhysMemory, VcpuRegs};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Physical-address bits of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Present.
pub const P: u64 = 1 << 0;
/// Writable.
pub const RW: u64 = 1 << 1;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty.
pub const D: u64 = 1 << 6;
/// Large page (in PUD/PMD entries).
pub const PS: u64 = 1 << 7;
/// No-execute.
pub const NX: u64 = 1 << 63;

/// Errors walking page tables.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PagingError {
    /// Not mapped.
    #[error("{va:#x} is not mapped (level {level} entry {entry:#x})")]
    NotMapped {
        /// Virtual address.
        va: u64,
        /// Level where the walk stopped (5..1).
        level: u8,
        /// The entry.
        entry: u64,
    },
    /// A table is outside guest RAM.
    /// The page walk failed (entry outside RAM, non-canonical address, reserved bits).
    #[error(transparent)]
    Walk(#[from] introspect::PagingError),
    /// Reading guest memory failed.
    #[error("page table read at {pa:#x} failed (outside guest RAM)")]
    Read {
        /// Physical address.
        pa: u64,
    },
}

/// The kernel's paging root and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPaging {
    /// Guest-physical address of the kernel's top-level table (PML4/PML5).
    #[serde(with = "introspect::hex")]
    pub pgd_pa: u64,
    /// 5-level paging (CR4.LA57).
    pub la57: bool,
    /// EFER.NXE: whether the NX bit may be set.
    pub nx: bool,
}

impl KernelPaging {
    /// From a vCPU's registers, for Linux kernels built with page-table isolation (both
    /// supported guests): `pgd = CR3 & 0x000f_ffff_ffff_e000` (drops PCID and the PTI user
    /// bit; KERNEL-FACTS §2.4). Other guests: build the struct by hand.
    pub fn from_regs(regs: &VcpuRegs) -> Self {
        Self {
            pgd_pa: regs.cr3 & 0x000f_ffff_ffff_e000,
            la57: regs.cr4 & (1 << 12) != 0,
            nx: regs.nx_enabled(),
        }
    }

    fn levels(&self) -> u8 {
        if self.la57 {
            5
        } else {
            4
        }
    }

    /// Translates `va` (4 KiB, 2 MiB or 1 GiB leaves).
    pub fn translate(&self, mem: &dyn PhysMemory, va: u64) -> Result<u64, PagingError> {
        match walk_or_hole(mem, self.root(), va)? {
            WalkOutcome::Mapped(w) => Ok(w.pa),
            WalkOutcome::Hole(h) => Err(PagingError::NotMapped {
                va,
                level: h.missing.level,
                entry: h.missing.value,
            }),
        }
    }

    /// The introspect page root of these tables (one page walker for the whole workspace).
    pub fn root(&self) -> PageRoot {
        PageRoot {
            pgd_pa: self.pgd_pa,
            levels: self.levels(),
        }
    }

    /// Physical address of the PMD (level-2) entry for `va` and its value, provided the upper
    /// levels are present tables. `None` if an upper level is missing or a large page.
    pub fn pmd_entry(
        &self,
        mem: &dyn PhysMemory,
        va: u64,
    ) -> Result<Option<(u64, u64)>, PagingError> {
        // Down to level 2 only (what lies below a present PMD does not matter here).
        let mut table = self.pgd_pa & ADDR_MASK;
        for level in (2..=self.levels()).rev() {
            let pa = table + 8 * table_index(va, level) as u64;
            let e = mem.read_u64(pa).map_err(|_| PagingError::Read { pa })?;
            if level == 2 {
                return Ok(Some((pa, e)));
            }
            if e & P == 0 || e & PS != 0 {
                return Ok(None);
            }
            table = e & ADDR_MASK;
        }
        Ok(None)
    }

    /// Reads `buf.len()` bytes at kernel VA `va` (page by page).
    pub fn read_virt(
        &self,
        mem: &dyn PhysMemory,
        va: u64,
        buf: &mut [u8],
    ) -> Result<(), PagingError> {
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va.wrapping_add(done as u64);
            let pa = self.translate(mem, cur)?;
            let n = ((0x1000 - (cur & 0xfff)) as usize).min(buf.len() - done);
            mem.read_phys(pa, &mut buf[done..done + n])
                .map_err(|_| PagingError::Read { pa })?;
            done += n;
        }
        Ok(())
    }

    /// Reads a u64 at kernel VA `va`.
    pub fn read_u64(&self, mem: &dyn PhysMemory, va: u64) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read_virt(mem, va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}
