//! The patch arena: guest-physical pages for patch code, data and the page table that maps
//! them into the kernel's address space.
//!
//! Sources:
//! * **Host** ([`crate::GuestControl::patch_arena`]): our KVM VMM's e820-reserved range; the
//!   guest kernel never uses it.
//! * **Low memory** (QEMU attach, no host range): since Linux 5.13 ("x86/setup: Always reserve
//!   the first 1M of RAM") the kernel memblock-reserves all of the first 1 MiB; only the
//!   real-mode trampoline (at `*real_mode_header`, `real_mode_blob_end - real_mode_blob` bytes),
//!   page 0 and BIOS areas are ever used, and reserved memory is never handed to the page
//!   allocator. We take pages in [0x10000, 0x90000) that are outside the trampoline, have
//!   `PG_reserved` set in their `struct page` (`vmemmap_base + pfn * sizeof(struct page)`) and are
//!   all-zero. `PG_reserved`'s bit comes from BTF (`enum pageflags`) when the symbol source has
//!   it, else it is derived: the single low flag bit set both in pfn 0's and in `_text`'s
//!   `struct page` (both memblock-reserved). Verified on the dumps: bit 12 on 6.1.0-56, bit 13
//!   on 6.12.117 (PG_writeback moved to bit 1 in between). Every page is re-verified (zero +
//!   PG_reserved) inside each load's pause window.
//!
//! Mapping: one 2 MiB slot in the kernel image region (`0xffffffff80000000 + [0, 1 GiB)`)
//! whose PMD entry is empty — after `_end` (entries past the image are cleared by
//! `cleanup_highmap()`) and past the freed `.init.scratch` area there, else below `_text`. A page-table page from the arena is installed in
//! that PMD; arena page `i` is always mapped at `slot + i * 4 KiB` (so a VA always names the same
//! physical page), code pages RX, data pages RW+NX, never global. A page index that has been
//! code is never reused for data and vice versa, so stale TLB entries of unloaded patches can
//! only ever be identical to or stricter than a new mapping (Linux' `spurious_kernel_fault()`
//! resolves the latter). The PMD was not present, so installing it needs no flush. When the last
//! patch goes the PMD is restored to its exact old value and the slot is retired: later loads
//! use a fresh slot, never a VA that may still sit in a TLB.

use introspect::PhysMemory;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::paging::{KernelPaging, A, D, NX, P, RW};
use crate::symbols::SymbolSource;

/// Page size.
pub const PAGE: u64 = 4096;
/// Maximum arena pages (one page table).
pub const MAX_PAGES: usize = 512;
/// Low-memory window searched for free reserved pages.
pub const LOW_WINDOW: (u64, u64) = (0x10000, 0x90000);
/// Start of the kernel image region.
pub const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// End of the kernel image region (start of modules).
pub const KERNEL_MAP_END: u64 = 0xffff_ffff_c000_0000;
/// `sizeof(struct page)` when BTF cannot tell (64 on x86-64 without debug options; true for
/// both supported guests).
pub const STRUCT_PAGE_SIZE_DEFAULT: u64 = 64;

/// Errors finding or using the arena.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ArenaError {
    /// A symbol needed to find the arena is missing.
    #[error("arena: guest symbol {0} not found")]
    MissingSymbol(String),
    /// Guest memory could not be read.
    #[error("arena: reading the guest: {0}")]
    Read(String),
    /// PG_reserved could not be determined.
    #[error("arena: cannot determine PG_reserved: {0}")]
    PgReserved(String),
    /// Not enough free pages.
    #[error("arena: need {need} contiguous free pages of kind {kind}, none left ({free} free of {total})")]
    Full {
        /// Pages needed.
        need: usize,
        /// Code or data.
        kind: &'static str,
        /// Free pages.
        free: usize,
        /// Total pages.
        total: usize,
    },
    /// No empty 2 MiB slot near the kernel image.
    #[error("arena: no empty 2 MiB slot in the kernel image region ({0})")]
    NoSlot(String),
    /// A page failed re-verification.
    #[error("arena: page {pa:#x} is no longer usable: {why}")]
    PageInUse {
        /// Physical address.
        pa: u64,
        /// Why.
        why: String,
    },
}

/// Where the arena pages come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArenaSource {
    /// Host-reserved range.
    Host {
        /// Start (guest-physical).
        #[serde(with = "introspect::hex")]
        start: u64,
        /// Length.
        len: u64,
    },
    /// Pages the guest reserved in its first MiB (see the module docs).
    LowMemory {
        /// `PG_reserved` bit number.
        pg_reserved_bit: u32,
        /// Where that number came from (`btf` or `derived`).
        pg_reserved_from: String,
        /// `vmemmap_base`.
        #[serde(with = "introspect::hex")]
        vmemmap_base: u64,
        /// `sizeof(struct page)`.
        struct_page_size: u64,
        /// Real-mode trampoline `[start, end)` (guest-physical), excluded.
        #[serde(with = "introspect::hex")]
        trampoline: (u64, u64),
    },
}

/// Kind of an arena page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageKind {
    /// The page table.
    Table,
    /// Patch code (RX).
    Code,
    /// Patch data (RW, NX).
    Data,
}

/// The arena's mapping into the kernel address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Slot VA (2 MiB aligned).
    #[serde(with = "introspect::hex")]
    pub va: u64,
    /// Guest-physical address of the PMD entry.
    #[serde(with = "introspect::hex")]
    pub pmd_pa: u64,
    /// Its value before we installed ours.
    #[serde(with = "introspect::hex")]
    pub pmd_old: u64,
    /// Its value while mapped.
    #[serde(with = "introspect::hex")]
    pub pmd_new: u64,
    /// Index of the page-table page.
    pub table: usize,
}

/// Serializable view of the arena.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArenaInfo {
    /// Source and what was verified.
    pub source: ArenaSource,
    /// Total pages.
    pub pages: usize,
    /// Pages in use.
    pub used: usize,
    /// Current mapping.
    pub mapping: Option<Mapping>,
    /// Slots used before and retired.
    #[serde(with = "introspect::hex")]
    pub retired_slots: Vec<u64>,
    /// Pages of the journal in guest memory ([`crate::journal`]), if any.
    #[serde(default, with = "introspect::hex")]
    pub journal: Vec<u64>,
}

/// The arena: pages, their use, the mapping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arena {
    /// Source.
    pub source: ArenaSource,
    /// Physical page addresses; index = page index in the slot.
    #[serde(with = "introspect::hex")]
    pub pages: Vec<u64>,
    used: Vec<bool>,
    kind: Vec<Option<PageKind>>,
    /// Current mapping.
    pub mapping: Option<Mapping>,
    #[serde(with = "introspect::hex")]
    retired: Vec<u64>,
    /// Page kinds and table page of each retired slot, so that a slot can be used again with
    /// exactly the translations it had (every VA → the same page, with the same permissions):
    /// a stale TLB or paging-structure cache entry in the guest then still agrees with the
    /// page tables.
    #[serde(default)]
    layouts: Vec<SlotLayout>,
    /// Page indices of the journal's slots ([`crate::journal`]): never mapped, never given to
    /// a patch.
    #[serde(default)]
    journal: Vec<usize>,
}

/// How a retired slot was laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SlotLayout {
    #[serde(with = "introspect::hex")]
    va: u64,
    table: usize,
    kinds: Vec<Option<PageKind>>,
}

fn read_err(e: impl std::fmt::Display) -> ArenaError {
    ArenaError::Read(e.to_string())
}

fn one(syms: &dyn SymbolSource, name: &str) -> Result<u64, ArenaError> {
    syms.addresses(name)
        .first()
        .copied()
        .ok_or_else(|| ArenaError::MissingSymbol(name.into()))
}

fn page_is_zero(mem: &dyn PhysMemory, pa: u64) -> Result<bool, ArenaError> {
    let mut b = vec![0u8; PAGE as usize];
    mem.read_phys(pa, &mut b).map_err(read_err)?;
    Ok(b.iter().all(|&x| x == 0))
}

/// PTE value for an arena page.
pub fn pte(pa: u64, kind: PageKind, nx: bool) -> u64 {
    match kind {
        PageKind::Code => pa | P | A,
        PageKind::Data | PageKind::Table => pa | P | RW | A | D | if nx { NX } else { 0 },
    }
}

impl Arena {
    fn with_pages(source: ArenaSource, pages: Vec<u64>) -> Self {
        let n = pages.len();
        Self {
            source,
            pages,
            used: vec![false; n],
            kind: vec![None; n],
            mapping: None,
            retired: Vec::new(),
            layouts: Vec::new(),
            journal: Vec::new(),
        }
    }

    /// The host-reserved range `[start, start+len)` (page-aligned part, at most 512 pages).
    pub fn host(start: u64, len: u64) -> Self {
        let first = start.div_ceil(PAGE) * PAGE;
        let end = start.saturating_add(len) / PAGE * PAGE;
        let pages = (0..MAX_PAGES as u64)
            .map(|i| first + i * PAGE)
            .take_while(|&pa| pa + PAGE <= end)
            .collect();
        Self::with_pages(ArenaSource::Host { start, len }, pages)
    }

    /// Finds free reserved pages in the guest's first MiB (see the module docs).
    pub fn low_memory(
        mem: &dyn PhysMemory,
        paging: &KernelPaging,
        syms: &dyn SymbolSource,
    ) -> Result<Self, ArenaError> {
        let vmemmap_base = paging
            .read_u64(mem, one(syms, "vmemmap_base")?)
            .map_err(read_err)?;
        let rmh = paging
            .read_u64(mem, one(syms, "real_mode_header")?)
            .map_err(read_err)?;
        let blob = one(syms, "real_mode_blob")?;
        let blob_end = one(syms, "real_mode_blob_end")?;
        let size = blob_end
            .checked_sub(blob)
            .filter(|&s| s < 0x10_0000)
            .ok_or_else(|| {
                ArenaError::Read(format!(
                    "real_mode blob size {blob:#x}..{blob_end:#x} is implausible"
                ))
            })?;
        let tramp_pa = paging.translate(mem, rmh).map_err(read_err)?;
        let trampoline = (
            tramp_pa & !(PAGE - 1),
            (tramp_pa + size).div_ceil(PAGE) * PAGE,
        );
        let sp = syms.type_size("page").unwrap_or(STRUCT_PAGE_SIZE_DEFAULT);
        if !(32..=256).contains(&sp) {
            return Err(ArenaError::PgReserved(format!(
                "sizeof(struct page) = {sp} is implausible"
            )));
        }
        let flags = |pfn: u64| -> Result<u64, ArenaError> {
            let va = vmemmap_base.wrapping_add(pfn.wrapping_mul(sp));
            paging.read_u64(mem, va).map_err(read_err)
        };
        let text_pa = paging
            .translate(mem, one(syms, "_text")?)
            .map_err(read_err)?;
        let (f0, ft) = (flags(0)?, flags(text_pa / PAGE)?);
        let (bit, from) = match syms.enum_value("pageflags", "PG_reserved") {
            Some(v) if (0..32).contains(&v) => (v as u32, "btf".to_string()),
            _ => {
                let common = f0 & ft & 0xff_ffff;
                if common.count_ones() != 1 {
                    return Err(ArenaError::PgReserved(format!(
                        "flags of pfn 0 ({f0:#x}) and of _text ({ft:#x}) share {} low bits, expected exactly one",
                        common.count_ones()
                    )));
                }
                (
                    common.trailing_zeros(),
                    "derived: the one low flag set in pfn 0 and _text".to_string(),
                )
            }
        };
        if f0 & (1 << bit) == 0 || ft & (1 << bit) == 0 {
            return Err(ArenaError::PgReserved(format!(
                "bit {bit} not set for pfn 0 / _text"
            )));
        }
        let source = ArenaSource::LowMemory {
            pg_reserved_bit: bit,
            pg_reserved_from: from,
            vmemmap_base,
            struct_page_size: sp,
            trampoline,
        };
        let mut a = Self::with_pages(source, Vec::new());
        let mut pa = LOW_WINDOW.0;
        while pa < LOW_WINDOW.1 && a.pages.len() < MAX_PAGES {
            if (pa + PAGE <= trampoline.0 || pa >= trampoline.1)
                && a.verify_free(mem, paging, pa).is_ok()
            {
                a.pages.push(pa);
            }
            pa += PAGE;
        }
        let n = a.pages.len();
        a.used = vec![false; n];
        a.kind = vec![None; n];
        if n < 2 {
            return Err(ArenaError::Full {
                need: 2,
                kind: "any",
                free: n,
                total: n,
            });
        }
        Ok(a)
    }

    /// Checks that the page at `pa` is still free: all zero, and for low memory, PG_reserved.
    pub fn verify_free(
        &self,
        mem: &dyn PhysMemory,
        paging: &KernelPaging,
        pa: u64,
    ) -> Result<(), ArenaError> {
        if !page_is_zero(mem, pa)? {
            return Err(ArenaError::PageInUse {
                pa,
                why: "not all-zero".into(),
            });
        }
        if let ArenaSource::LowMemory {
            pg_reserved_bit,
            vmemmap_base,
            struct_page_size,
            trampoline,
            ..
        } = &self.source
        {
            if pa >= trampoline.0 && pa < trampoline.1 {
                return Err(ArenaError::PageInUse {
                    pa,
                    why: "inside the real-mode trampoline".into(),
                });
            }
            let va = vmemmap_base.wrapping_add((pa / PAGE).wrapping_mul(*struct_page_size));
            let f = paging.read_u64(mem, va).map_err(read_err)?;
            if f & (1 << pg_reserved_bit) == 0 {
                return Err(ArenaError::PageInUse {
                    pa,
                    why: format!("PG_reserved clear (flags {f:#x})"),
                });
            }
        }
        Ok(())
    }

    /// Serializable view.
    pub fn info(&self) -> ArenaInfo {
        ArenaInfo {
            source: self.source.clone(),
            pages: self.pages.len(),
            used: self.used.iter().filter(|&&u| u).count(),
            mapping: self.mapping,
            retired_slots: self.retired.clone(),
            journal: self.journal.iter().map(|&i| self.pages[i]).collect(),
        }
    }

    /// The journal's slots ([`crate::journal`]): the guest-physical start of each of
    /// [`crate::journal::SLOTS`] runs of [`crate::journal::SLOT_PAGES`] physically contiguous
    /// pages, taken once (from the highest indices never used in this slot, each page verified
    /// free) and kept for the arena's life.
    pub fn journal_slots(
        &mut self,
        mem: &dyn PhysMemory,
        paging: &KernelPaging,
    ) -> Result<Vec<u64>, ArenaError> {
        use crate::journal::{SLOTS, SLOT_PAGES};
        if self.journal.is_empty() {
            let mut taken: Vec<usize> = Vec::new();
            let mut i = self.pages.len();
            while taken.len() < SLOTS * SLOT_PAGES && i >= SLOT_PAGES {
                let run = i - SLOT_PAGES..i;
                let fits = run.clone().all(|j| {
                    !self.used[j]
                        && self.kind[j].is_none()
                        && self.pages[j] == self.pages[run.start] + (j - run.start) as u64 * PAGE
                        && self.verify_free(mem, paging, self.pages[j]).is_ok()
                });
                if fits {
                    taken.extend(run);
                    i -= SLOT_PAGES;
                } else {
                    i -= 1;
                }
            }
            if taken.len() < SLOTS * SLOT_PAGES {
                return Err(ArenaError::Full {
                    need: SLOTS * SLOT_PAGES,
                    kind: "journal (contiguous runs)",
                    free: self.used.iter().filter(|&&u| !u).count(),
                    total: self.pages.len(),
                });
            }
            taken.sort_unstable();
            self.journal = taken;
        }
        Ok(self
            .journal
            .chunks(SLOT_PAGES)
            .map(|c| self.pages[c[0]])
            .collect())
    }

    /// The journal's slots, if taken.
    pub fn journal_starts(&self) -> Vec<u64> {
        self.journal
            .chunks(crate::journal::SLOT_PAGES)
            .map(|c| self.pages[c[0]])
            .collect()
    }

    /// Finds `n` contiguous free page indices usable as `kind` (never used as another kind in
    /// this slot). Does not mark them.
    pub fn find_run(&self, n: usize, kind: PageKind) -> Result<usize, ArenaError> {
        let ok = |i: usize| {
            !self.used[i]
                && !self.journal.contains(&i)
                && (self.kind[i].is_none() || self.kind[i] == Some(kind))
        };
        let total = self.pages.len();
        if n == 0 {
            return Ok(0);
        }
        let mut i = 0;
        while i + n <= total {
            match (i..i + n).find(|&j| !ok(j)) {
                None => return Ok(i),
                Some(bad) => i = bad + 1,
            }
        }
        let kname = match kind {
            PageKind::Code => "code",
            PageKind::Data => "data",
            PageKind::Table => "table",
        };
        Err(ArenaError::Full {
            need: n,
            kind: kname,
            free: self.used.iter().filter(|&&u| !u).count(),
            total,
        })
    }

    /// Marks `[start, start+n)` used as `kind`.
    pub fn mark(&mut self, start: usize, n: usize, kind: PageKind) {
        for i in start..start + n {
            self.used[i] = true;
            self.kind[i] = Some(kind);
        }
    }

    /// Frees `[start, start+n)` (kind stays recorded while the slot lives).
    pub fn free(&mut self, start: usize, n: usize) {
        for i in start..start + n {
            self.used[i] = false;
        }
    }

    /// Whether no page but the table is used.
    pub fn only_table_left(&self) -> bool {
        let t = self.mapping.map(|m| m.table);
        self.used
            .iter()
            .enumerate()
            .all(|(i, &u)| !u || Some(i) == t)
    }

    /// Chooses an empty 2 MiB slot for a new mapping, and the page-table page. With `reuse`,
    /// the slot used last comes first, with its old table page and page kinds (see
    /// [`Arena::set_mapped`]), so repeated load/unload cycles do not use up the address space;
    /// otherwise only slots never used before.
    pub fn plan_mapping(
        &self,
        mem: &dyn PhysMemory,
        paging: &KernelPaging,
        syms: &dyn SymbolSource,
        reuse: bool,
    ) -> Result<Mapping, ArenaError> {
        const SLOT: u64 = 0x20_0000;
        if let Some(l) = self.layouts.last().filter(|_| reuse) {
            if l.table < self.pages.len() && !self.used[l.table] && !self.journal.contains(&l.table)
            {
                if let Some((pmd_pa, 0)) = paging.pmd_entry(mem, l.va).map_err(read_err)? {
                    return Ok(Mapping {
                        va: l.va,
                        pmd_pa,
                        pmd_old: 0,
                        pmd_new: self.pages[l.table] | P | RW | A | D,
                        table: l.table,
                    });
                }
            }
        }
        let end = one(syms, "_end")?;
        let text = syms.addresses("_text").first().copied().unwrap_or(end);
        // Region searched: the Linux kernel image region, or for other guests the 1 GiB
        // (one page directory) holding `_end`.
        let (lo, hi) = if (KERNEL_MAP..KERNEL_MAP_END).contains(&end) {
            (KERNEL_MAP, KERNEL_MAP_END)
        } else {
            let lo = end & !(0x4000_0000 - 1);
            (lo, lo.saturating_add(0x4000_0000))
        };
        let after = end.saturating_add(SLOT - 1) & !(SLOT - 1);
        // Past `.init.scratch` (after `_end` with CONFIG_AMD_MEM_ENCRYPT: `sme_workarea`, mapped
        // at boot and freed since), whose old addresses may linger in stale stack slots and would
        // hold our unloads.
        let scratch = match (
            syms.addresses("__init_scratch_begin").first(),
            syms.addresses("__init_scratch_end").first(),
        ) {
            (Some(&b), Some(&e)) if b < e => Some((b & !(SLOT - 1), e)),
            _ => None,
        };
        let in_scratch = |v: u64| scratch.is_some_and(|(b, e)| v < e && v.saturating_add(SLOT) > b);
        let mut candidates: Vec<u64> = (0..512u64)
            .map(|i| after.wrapping_add(i * SLOT))
            .filter(|&v| v >= after && v >= lo && v < hi && !in_scratch(v))
            .collect();
        let below = text & !(SLOT - 1);
        candidates.extend(
            (1..512u64)
                .map(|i| below.wrapping_sub(i * SLOT))
                .filter(|&v| (lo..below).contains(&v)),
        );
        let table = self.find_run(1, PageKind::Table)?;
        for va in candidates {
            if self.retired.contains(&va) {
                continue;
            }
            if let Some((pmd_pa, old)) = paging.pmd_entry(mem, va).map_err(read_err)? {
                if old == 0 {
                    let pt_pa = self.pages[table];
                    return Ok(Mapping {
                        va,
                        pmd_pa,
                        pmd_old: old,
                        pmd_new: pt_pa | P | RW | A | D,
                        table,
                    });
                }
            }
        }
        Err(ArenaError::NoSlot(format!(
            "_end {end:#x}, _text {text:#x}"
        )))
    }

    /// Records a mapping as installed. A slot used before gets back its page kinds.
    pub fn set_mapped(&mut self, m: Mapping) {
        if let Some(i) = self.layouts.iter().position(|l| l.va == m.va) {
            let l = self.layouts.remove(i);
            if l.table == m.table && l.kinds.len() == self.kind.len() {
                self.kind = l.kinds;
            }
        }
        self.mark(m.table, 1, PageKind::Table);
        self.mapping = Some(m);
    }

    /// Records the mapping as removed; the slot is retired with its layout (for reuse by
    /// [`Arena::plan_mapping`]) and the page kinds are forgotten.
    pub fn set_unmapped(&mut self) {
        if let Some(m) = self.mapping.take() {
            if !self.retired.contains(&m.va) {
                self.retired.push(m.va);
            }
            self.free(m.table, 1);
            self.layouts.retain(|l| l.va != m.va);
            self.layouts.push(SlotLayout {
                va: m.va,
                table: m.table,
                kinds: self.kind.clone(),
            });
        }
        self.kind.iter_mut().for_each(|k| *k = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbols::SymbolMap;
    use introspect::SliceMemory;

    #[test]
    fn host_arena_pages_are_aligned_and_capped() {
        let a = Arena::host(0x1000_0800, 0x3000);
        assert_eq!(a.pages, vec![0x1000_1000, 0x1000_2000]);
        let big = Arena::host(0x4000_0000, 64 << 20);
        assert_eq!(big.pages.len(), MAX_PAGES);
        assert!(Arena::host(0x1000, 0x800).pages.is_empty());
    }

    #[test]
    fn page_kinds_are_never_mixed_within_a_slot() {
        let mut a = Arena::host(0x10_0000, 8 * PAGE);
        a.set_mapped(Mapping {
            va: KERNEL_MAP_END - 0x20_0000,
            pmd_pa: 0,
            pmd_old: 0,
            pmd_new: 1,
            table: 0,
        });
        let c = a.find_run(3, PageKind::Code).unwrap();
        assert_eq!(c, 1);
        a.mark(c, 3, PageKind::Code);
        let d = a.find_run(2, PageKind::Data).unwrap();
        assert_eq!(d, 4);
        a.mark(d, 2, PageKind::Data);
        a.free(c, 3);
        // Freed code pages are not handed out as data.
        assert_eq!(a.find_run(2, PageKind::Data).unwrap(), 6);
        assert_eq!(a.find_run(3, PageKind::Code).unwrap(), 1);
        assert!(matches!(
            a.find_run(4, PageKind::Data),
            Err(ArenaError::Full { .. })
        ));
        // After unmapping, the slot is retired and kinds are forgotten.
        a.free(d, 2);
        assert!(a.only_table_left());
        a.set_unmapped();
        assert_eq!(a.info().retired_slots, vec![KERNEL_MAP_END - 0x20_0000]);
        assert_eq!(a.find_run(7, PageKind::Data).unwrap(), 0);
    }

    #[test]
    fn journal_slots_are_contiguous_free_and_never_handed_out() {
        let mut ram = vec![0u8; 0x20_0000];
        // Page 14 of the arena is in use by the guest (not zero): no slot may hold it.
        ram[0x10_0000 + 14 * 4096 + 5] = 1;
        let mem = SliceMemory::flat(&ram);
        let p = KernelPaging {
            pgd_pa: 0,
            la57: false,
            nx: true,
        };
        let mut a = Arena::host(0x10_0000, 16 * PAGE);
        let slots = a.journal_slots(&mem, &p).unwrap();
        // From the top: [15] fails (14 is busy) ... [10, 14) and [6, 10).
        assert_eq!(slots, vec![0x10_0000 + 6 * PAGE, 0x10_0000 + 10 * PAGE]);
        assert_eq!(a.journal_slots(&mem, &p).unwrap(), slots, "taken once");
        assert_eq!(a.info().journal.len(), 8);
        assert_eq!(a.find_run(6, PageKind::Code).unwrap(), 0);
        assert!(a.find_run(7, PageKind::Code).is_err());
        assert_eq!(a.find_run(2, PageKind::Data).unwrap(), 0);
        // Not enough room: a clear error.
        let mut small = Arena::host(0x10_0000, 7 * PAGE);
        assert!(matches!(
            small.journal_slots(&mem, &p),
            Err(ArenaError::Full { .. })
        ));
    }

    #[test]
    fn low_memory_refuses_garbage_guest() {
        // No page tables: every read fails cleanly.
        let ram = vec![0u8; 1 << 20];
        let mem = SliceMemory::flat(&ram);
        let p = KernelPaging {
            pgd_pa: 0x1000,
            la57: false,
            nx: true,
        };
        let mut syms = SymbolMap::new();
        assert!(matches!(
            Arena::low_memory(&mem, &p, &syms),
            Err(ArenaError::MissingSymbol(_))
        ));
        for (n, a) in [
            ("vmemmap_base", 0xffff_ffff_8100_0000u64),
            ("real_mode_header", 0xffff_ffff_8100_0008),
            ("real_mode_blob", 0xffff_ffff_8100_0010),
            ("real_mode_blob_end", 0xffff_ffff_8100_0020),
            ("_text", 0xffff_ffff_8100_0000),
        ] {
            syms.insert(n, a);
        }
        assert!(matches!(
            Arena::low_memory(&mem, &p, &syms),
            Err(ArenaError::Read(_))
        ));
        // A PGD pointing at itself (loop) is still bounded.
        let mut ram = vec![0u8; 1 << 20];
        for i in 0..512 {
            ram[0x1000 + i * 8..0x1000 + i * 8 + 8]
                .copy_from_slice(&(0x1000u64 | 0x63).to_le_bytes());
        }
        let mem = SliceMemory::flat(&ram);
        assert!(Arena::low_memory(&mem, &p, &syms).is_err());
    }

    #[test]
    fn pte_bits() {
        assert_eq!(pte(0x5000, PageKind::Code, true), 0x5000 | P | A);
        assert_eq!(
            pte(0x5000, PageKind::Data, true),
            0x5000 | P | RW | A | D | NX
        );
        assert_eq!(pte(0x5000, PageKind::Data, false), 0x5000 | P | RW | A | D);
    }
}
