//! x86-64 page-table walks (4- and 5-level long mode) over guest-physical memory.
//!
//! A walk is bounded by construction (at most 5 levels), but guest entries can point anywhere:
//! every table read is bounds-checked and every failure is a [`PagingError`].

use serde::Serialize;

use crate::error::PagingError;
use crate::memory::PhysMemory;
use crate::regs::VcpuRegs;

/// Mask of the physical-address bits of CR3 that name the top-level table, also clearing
/// bit 12: with page-table isolation the kernel PGD is the even page of an 8 KiB pair and the
/// user PGD (CR3 bit 12) the odd one.
pub const CR3_KERNEL_PGD_MASK: u64 = 0x000f_ffff_ffff_e000;
/// Physical-address bits of a paging-structure entry (4 KiB frame).
pub const ENTRY_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Page size (1 GiB in a PDPTE, 2 MiB in a PDE; PAT in a PTE).
pub const PTE_PS: u64 = 1 << 7;
/// Global.
pub const PTE_GLOBAL: u64 = 1 << 8;
/// No-execute.
pub const PTE_NX: u64 = 1 << 63;

/// 4 KiB.
pub const PAGE_4K: u64 = 1 << 12;
/// 2 MiB.
pub const PAGE_2M: u64 = 1 << 21;
/// 1 GiB.
pub const PAGE_1G: u64 = 1 << 30;

/// Level number of the root when reporting the root itself in [`PagingError::OutsideRam`].
pub const ROOT_LEVEL_MARK: u8 = 6;

/// The root of a paging hierarchy: top-level table address and number of levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PageRoot {
    /// Guest-physical address of the top-level table (PML4 or PML5).
    #[serde(with = "crate::hex")]
    pub pgd_pa: u64,
    /// 4 or 5.
    pub levels: u8,
}

impl PageRoot {
    /// The kernel root from a CR3 value: strips PCID and the PTI user-PGD bit
    /// (`cr3 & 0x000f_ffff_ffff_e000`). Valid for kernels built with page-table isolation
    /// (every PGD is then an 8 KiB-aligned pair, even with PTI off at runtime).
    pub fn from_cr3(cr3: u64, la57: bool) -> Self {
        Self {
            pgd_pa: cr3 & CR3_KERNEL_PGD_MASK,
            levels: if la57 { 5 } else { 4 },
        }
    }

    /// The kernel root of a vCPU (see [`PageRoot::from_cr3`]).
    pub fn from_regs(regs: &VcpuRegs) -> Self {
        Self::from_cr3(regs.cr3, regs.la57())
    }

    /// The user PGD of the PTI pair (`pgd_pa + 0x1000`).
    pub fn user_pgd_pa(&self) -> u64 {
        self.pgd_pa | 0x1000
    }
}

/// One paging-structure entry read during a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WalkEntry {
    /// Level (5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT).
    pub level: u8,
    /// Guest-physical address of the entry.
    #[serde(with = "crate::hex")]
    pub entry_pa: u64,
    /// Raw entry value.
    #[serde(with = "crate::hex")]
    pub value: u64,
}

impl WalkEntry {
    /// Whether the present bit is set.
    pub fn present(&self) -> bool {
        self.value & PTE_PRESENT != 0
    }

    /// Whether this entry maps a page (PS at levels 3/2, or any PTE).
    pub fn is_leaf(&self) -> bool {
        self.level == 1 || ((self.level == 2 || self.level == 3) && self.value & PTE_PS != 0)
    }
}

/// A complete translation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Walk {
    /// Entries from the top level down to the leaf.
    pub entries: Vec<WalkEntry>,
    /// Translated guest-physical address.
    #[serde(with = "crate::hex")]
    pub pa: u64,
    /// Size of the mapping page (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Writable at every level.
    pub writable: bool,
    /// Not executable (NX at any level).
    pub nx: bool,
    /// User-accessible at every level.
    pub user: bool,
}

impl Walk {
    /// The leaf entry.
    pub fn leaf(&self) -> Option<&WalkEntry> {
        self.entries.last()
    }
}

/// A walk that stopped at a non-present entry: where a new mapping would have to be linked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hole {
    /// Present entries read before the hole, top level first.
    pub entries: Vec<WalkEntry>,
    /// The non-present entry.
    pub missing: WalkEntry,
}

/// Outcome of [`walk_or_hole`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WalkOutcome {
    /// The address is mapped.
    Mapped(Walk),
    /// A level is not present.
    Hole(Hole),
}

/// Index into the table at `level` (1..=5) for `va`.
pub fn table_index(va: u64, level: u8) -> usize {
    let shift = 12 + 9 * (u32::from(level.clamp(1, 5)) - 1);
    ((va >> shift) & 0x1ff) as usize
}

/// Size mapped by one entry at `level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB, ...).
pub fn level_size(level: u8) -> u64 {
    1u64 << (12 + 9 * (u32::from(level.clamp(1, 5)) - 1))
}

/// Whether `va` is canonical for `levels`-level paging.
pub fn is_canonical(va: u64, levels: u8) -> bool {
    let bits = if levels == 5 { 57 } else { 48 };
    let shift = 64 - bits;
    (((va << shift) as i64) >> shift) as u64 == va
}

/// Frame address held by an entry at `level` (large-page frames at levels 2/3 with PS set).
pub fn entry_frame(value: u64, level: u8) -> u64 {
    if (level == 2 || level == 3) && value & PTE_PS != 0 {
        value & ENTRY_ADDR_MASK & !(level_size(level) - 1)
    } else {
        value & ENTRY_ADDR_MASK
    }
}

/// Reads the 512 entries of the paging structure at guest-physical `table_pa` (e.g. to look
/// for a free PMD/PTE slot next to a [`Hole`]).
pub fn read_table(
    mem: &dyn PhysMemory,
    table_pa: u64,
) -> Result<Vec<u64>, crate::memory::MemError> {
    let mut raw = vec![0u8; 4096];
    mem.read_phys(table_pa & ENTRY_ADDR_MASK, &mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Where a walk ended: a leaf (translation, page size, and the permissions of every level)
/// or a non-present entry.
enum Ended {
    Leaf {
        pa: u64,
        page_size: u64,
        writable: bool,
        nx: bool,
        user: bool,
    },
    Hole(WalkEntry),
}

/// The page walk of `va`; `seen` gets every present entry from the top level down.
fn walk_core(
    mem: &dyn PhysMemory,
    root: PageRoot,
    va: u64,
    mut seen: impl FnMut(WalkEntry),
) -> Result<Ended, PagingError> {
    if root.levels != 4 && root.levels != 5 {
        return Err(PagingError::Levels(root.levels));
    }
    if !is_canonical(va, root.levels) {
        return Err(PagingError::NonCanonical {
            va,
            levels: root.levels,
        });
    }
    let mut table = root.pgd_pa & ENTRY_ADDR_MASK;
    let mut prev = root.pgd_pa;
    let (mut writable, mut user, mut nx) = (true, true, false);
    let mut level = root.levels;
    loop {
        let entry_pa = table + 8 * table_index(va, level) as u64;
        let value = mem
            .read_u64(entry_pa)
            .map_err(|_| PagingError::OutsideRam {
                va,
                level: level + 1,
                value: prev,
                target: table,
            })?;
        let entry = WalkEntry {
            level,
            entry_pa,
            value,
        };
        if value & PTE_PRESENT == 0 {
            return Ok(Ended::Hole(entry));
        }
        seen(entry);
        writable &= value & PTE_RW != 0;
        user &= value & PTE_USER != 0;
        nx |= value & PTE_NX != 0;
        let ps = value & PTE_PS != 0;
        if ps && level >= 4 {
            return Err(PagingError::Reserved { va, level, value });
        }
        if level == 1 || ps {
            let page_size = level_size(level);
            // Large-page frames: bits 51:30 / 51:21 (bit 12 is PAT there).
            let frame = value & ENTRY_ADDR_MASK & !(page_size - 1);
            let pa = frame | (va & (page_size - 1));
            let mut probe = [0u8; 1];
            if mem.read_phys(pa, &mut probe).is_err() {
                return Err(PagingError::OutsideRam {
                    va,
                    level,
                    value,
                    target: pa,
                });
            }
            return Ok(Ended::Leaf {
                pa,
                page_size,
                writable,
                nx,
                user,
            });
        }
        prev = value;
        table = value & ENTRY_ADDR_MASK;
        level -= 1;
    }
}

/// Walks `va`, returning either the translation or the first non-present entry.
pub fn walk_or_hole(
    mem: &dyn PhysMemory,
    root: PageRoot,
    va: u64,
) -> Result<WalkOutcome, PagingError> {
    let mut entries = Vec::with_capacity(usize::from(root.levels));
    Ok(match walk_core(mem, root, va, |e| entries.push(e))? {
        Ended::Leaf {
            pa,
            page_size,
            writable,
            nx,
            user,
        } => WalkOutcome::Mapped(Walk {
            entries,
            pa,
            page_size,
            writable,
            nx,
            user,
        }),
        Ended::Hole(missing) => WalkOutcome::Hole(Hole { entries, missing }),
    })
}

/// Walks `va` through the page tables at `root`. A non-present level is an error.
pub fn walk(mem: &dyn PhysMemory, root: PageRoot, va: u64) -> Result<Walk, PagingError> {
    match walk_or_hole(mem, root, va)? {
        WalkOutcome::Mapped(w) => Ok(w),
        WalkOutcome::Hole(h) => Err(PagingError::NotPresent {
            va,
            level: h.missing.level,
            entry_pa: h.missing.entry_pa,
            value: h.missing.value,
        }),
    }
}

/// The translation of `va` and the size of its page: [`walk`] without recording the entries
/// (no allocation), with the same checks and the same errors. Reads of guest memory use it.
pub fn leaf(mem: &dyn PhysMemory, root: PageRoot, va: u64) -> Result<(u64, u64), PagingError> {
    match walk_core(mem, root, va, |_| {})? {
        Ended::Leaf { pa, page_size, .. } => Ok((pa, page_size)),
        Ended::Hole(h) => Err(PagingError::NotPresent {
            va,
            level: h.level,
            entry_pa: h.entry_pa,
            value: h.value,
        }),
    }
}

/// Translates `va` to a guest-physical address.
pub fn translate(mem: &dyn PhysMemory, root: PageRoot, va: u64) -> Result<u64, PagingError> {
    leaf(mem, root, va).map(|(pa, _)| pa)
}

/// A virtually and physically contiguous mapped range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// First virtual address.
    #[serde(with = "crate::hex")]
    pub va: u64,
    /// First guest-physical address.
    #[serde(with = "crate::hex")]
    pub pa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Most page walks [`mapped_ranges`] performs (1 GiB of 4 KiB pages).
pub const MAX_RANGE_WALKS: usize = 1 << 18;

/// The mapped parts of `[va_start, va_end)`, merged into contiguous [`Mapping`]s, in VA order.
/// Holes are skipped a whole missing level at a time; unreadable or bad entries are skipped.
/// At most [`MAX_RANGE_WALKS`] walks are done.
pub fn mapped_ranges(
    mem: &dyn PhysMemory,
    root: PageRoot,
    va_start: u64,
    va_end: u64,
) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    let mut va = va_start;
    let mut walks = 0usize;
    while va < va_end && walks < MAX_RANGE_WALKS {
        walks += 1;
        let step_level = match walk_or_hole(mem, root, va) {
            Ok(WalkOutcome::Mapped(w)) => {
                let page_va = va & !(w.page_size - 1);
                let page_pa = w.pa & !(w.page_size - 1);
                let (s_va, s_pa) = (
                    page_va.max(va_start),
                    page_pa + (page_va.max(va_start) - page_va),
                );
                let len = (page_va.saturating_add(w.page_size)).min(va_end) - s_va;
                match out.last_mut() {
                    Some(m)
                        if m.va.checked_add(m.len) == Some(s_va)
                            && m.pa.checked_add(m.len) == Some(s_pa) =>
                    {
                        m.len += len
                    }
                    _ => out.push(Mapping {
                        va: s_va,
                        pa: s_pa,
                        len,
                    }),
                }
                match w.page_size {
                    PAGE_1G => 3,
                    PAGE_2M => 2,
                    _ => 1,
                }
            }
            Ok(WalkOutcome::Hole(h)) => h.missing.level,
            Err(PagingError::OutsideRam { level, .. })
            | Err(PagingError::Reserved { level, .. }) => level.clamp(1, 5),
            Err(_) => 1,
        };
        let size = level_size(step_level);
        match (va & !(size - 1)).checked_add(size) {
            Some(next) => va = next,
            None => break,
        }
    }
    out
}

/// Errors of [`read_virt`]: a translation failure or a failed read of a translated page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtReadError {
    /// Translation failed.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// Reading the translated physical range failed.
    #[error(transparent)]
    Mem(#[from] crate::memory::MemError),
}

/// Reads `buf.len()` bytes at virtual `va`, translating each page separately (reads may cross
/// page boundaries and physically discontiguous pages).
pub fn read_virt(
    mem: &dyn PhysMemory,
    root: PageRoot,
    va: u64,
    buf: &mut [u8],
) -> Result<(), VirtReadError> {
    let len = buf.len() as u64;
    if len > 0 && va.checked_add(len - 1).is_none() {
        return Err(PagingError::Wraps { va, len }.into());
    }
    let mut done = 0usize;
    while done < buf.len() {
        let cur = va + done as u64;
        let (pa, page_size) = leaf(mem, root, cur)?;
        let in_page = page_size - (cur & (page_size - 1));
        let n = usize::try_from(in_page)
            .unwrap_or(usize::MAX)
            .min(buf.len() - done);
        mem.read_phys(pa, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::SliceMemory;

    fn put(m: &mut [u8], pa: u64, v: u64) {
        m[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// 4-level tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
    fn four_level() -> Vec<u8> {
        let mut m = vec![0u8; 0x40_0000];
        let va: u64 = 0xffff_ffff_8100_0000;
        put(
            &mut m,
            0x1000 + 8 * table_index(va, 4) as u64,
            0x2000 | 0x63,
        );
        put(
            &mut m,
            0x2000 + 8 * table_index(va, 3) as u64,
            0x3000 | 0x63,
        );
        // 2 MiB page at 0x20_0000 for va, 4 KiB pages through PT 0x4000 for va + 2 MiB.
        put(
            &mut m,
            0x3000 + 8 * table_index(va, 2) as u64,
            0x20_0000 | 0xe1,
        );
        put(
            &mut m,
            0x3000 + 8 * table_index(va + PAGE_2M, 2) as u64,
            0x4000 | 0x63,
        );
        put(&mut m, 0x4000, 0x5000 | 0x63 | PTE_NX);
        put(&mut m, 0x4008, 0x7000 | 0x63);
        m
    }

    #[test]
    fn leaf_agrees_with_walk_everywhere() {
        // Well-formed tables, and the same memory with garbage sprinkled into every table page:
        // leaf() must give walk()'s answer (translation or exact error) for every address.
        let good = four_level();
        let mut bad = good.clone();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 0x1000 + (x as usize % 0x4000) / 8 * 8;
            let v = x.rotate_left(17) & (0x8000_0000_003f_ffff | 0x1ff);
            bad[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let mut mapped = 0;
        for ram in [good, bad] {
            let mem = SliceMemory::flat(&ram);
            for levels in [4u8, 5, 3] {
                let root = PageRoot {
                    pgd_pa: 0x1000,
                    levels,
                };
                // Around the mapped range page by page, then far and wide.
                let near = (0..2048u64).map(|i| 0xffff_ffff_80f0_0000 + i * 0x1000 + (i % 7) * 8);
                let far = (0..20_000u64)
                    .map(|i| 0xffff_8000_0000_0000u64.wrapping_add(i.wrapping_mul(0x1_3579_b123)));
                for probe in near.chain(far) {
                    let w = walk(&mem, root, probe).map(|w| (w.pa, w.page_size));
                    mapped += usize::from(w.is_ok());
                    assert_eq!(leaf(&mem, root, probe), w, "va {probe:#x} levels {levels}");
                }
            }
        }
        assert!(
            mapped > 500,
            "only {mapped} addresses mapped: the test proves little"
        );
    }

    #[test]
    fn walks_2m_and_4k() {
        let m = four_level();
        let mem = SliceMemory::flat(&m);
        let root = PageRoot::from_cr3(0x1000 | 0x1000 | 0x5, false);
        assert_eq!(root.pgd_pa, 0);
        let root = PageRoot::from_cr3(0x1005, false);
        // bit 12 is the PTI bit: the kernel PGD is the even page, 0x0 here; use a raw root.
        assert_eq!(root.pgd_pa, 0);
        let root = PageRoot {
            pgd_pa: 0x1000,
            levels: 4,
        };
        let w = walk(&mem, root, 0xffff_ffff_8100_1234).unwrap();
        assert_eq!(w.pa, 0x20_1234);
        assert_eq!(w.page_size, PAGE_2M);
        assert!(!w.writable && !w.nx);
        assert_eq!(w.entries.len(), 3);
        let w = walk(&mem, root, 0xffff_ffff_8120_0010).unwrap();
        assert_eq!(
            (w.pa, w.page_size, w.nx, w.writable),
            (0x5010, PAGE_4K, true, true)
        );
        let mut buf = [0u8; 16];
        // Crossing from the NX page (pa 0x5000) into the next one (pa 0x7000).
        let m2 = {
            let mut m = m.clone();
            m[0x5ff8..0x6000].copy_from_slice(&[1; 8]);
            m[0x7000..0x7008].copy_from_slice(&[2; 8]);
            m
        };
        let mem2 = SliceMemory::flat(&m2);
        read_virt(&mem2, root, 0xffff_ffff_8120_0ff8, &mut buf).unwrap();
        assert_eq!(buf, [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn holes_and_errors() {
        let m = four_level();
        let mem = SliceMemory::flat(&m);
        let root = PageRoot {
            pgd_pa: 0x1000,
            levels: 4,
        };
        match walk_or_hole(&mem, root, 0xffff_ffff_8120_2000).unwrap() {
            WalkOutcome::Hole(h) => {
                assert_eq!(h.entries.len(), 3);
                assert_eq!(h.missing.level, 1);
                assert_eq!(h.missing.entry_pa, 0x4010);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            walk(&mem, root, 0x0000_8000_0000_0000),
            Err(PagingError::NonCanonical { .. })
        ));
        assert!(matches!(
            walk(&mem, root, 0x1000),
            Err(PagingError::NotPresent { level: 4, .. })
        ));
        assert!(matches!(
            walk(
                &mem,
                PageRoot {
                    pgd_pa: 0x1000,
                    levels: 3
                },
                0
            ),
            Err(PagingError::Levels(3))
        ));
    }

    #[test]
    fn hostile_tables() {
        let va: u64 = 0xffff_ffff_8100_0000;
        // PML4 entry pointing at itself: the walk is bounded and ends at level 1 with a
        // "page" that is the PML4 itself.
        let mut m = vec![0u8; 0x10000];
        let slot = 0x1000 + 8 * table_index(va, 4) as u64;
        put(&mut m, slot, 0x1000 | 0x63);
        let mem = SliceMemory::flat(&m);
        let root = PageRoot {
            pgd_pa: 0x1000,
            levels: 4,
        };
        let r = walk(&mem, root, va);
        assert!(r.is_err() || r.unwrap().entries.len() == 4);
        // Entry pointing outside RAM.
        put(&mut m, slot, 0xdead_0000_0000 | 0x63);
        let mem = SliceMemory::flat(&m);
        assert!(matches!(
            walk(&mem, root, va),
            Err(PagingError::OutsideRam { level: 4, .. })
        ));
        // Leaf pointing outside RAM.
        put(&mut m, slot, 0x2000 | 0x63);
        put(
            &mut m,
            0x2000 + 8 * table_index(va, 3) as u64,
            0x7_c000_0000 | 0xe3,
        );
        let mem = SliceMemory::flat(&m);
        assert!(matches!(
            walk(&mem, root, va),
            Err(PagingError::OutsideRam { level: 3, .. })
        ));
        // PS in a PML4 entry is reserved.
        put(&mut m, slot, 0x2000 | 0xe3);
        let mem = SliceMemory::flat(&m);
        assert!(matches!(
            walk(&mem, root, va),
            Err(PagingError::Reserved { level: 4, .. })
        ));
        // Root outside RAM.
        let far = PageRoot {
            pgd_pa: 0xffff_f000,
            levels: 5,
        };
        assert!(matches!(
            walk(&mem, far, va),
            Err(PagingError::OutsideRam { level: 6, .. })
        ));
        // A range that wraps.
        let mut b = [0u8; 16];
        assert!(read_virt(&mem, root, u64::MAX - 4, &mut b).is_err());
        // Random tables never panic.
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..200 {
            for chunk in m.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                chunk.copy_from_slice(&(seed & 0x8000_0000_0000_ffff | 0x1).to_le_bytes());
            }
            let mem = SliceMemory::flat(&m);
            for levels in [4, 5] {
                let root = PageRoot {
                    pgd_pa: seed & 0xf000,
                    levels,
                };
                let _ = walk(&mem, root, va ^ (seed & 0x7fff_f000));
                let _ = read_virt(&mem, root, va, &mut b);
            }
        }
    }

    #[test]
    fn five_level_and_1g_pages() {
        // PML5 0x1000 -> PML4 0x2000 -> PDPT 0x3000 with a 1 GiB leaf at pa 0x4000_0000.
        let va: u64 = 0xff11_0000_4000_0000 | 0x12345;
        let mut m = vec![0u8; 0x10000];
        put(
            &mut m,
            0x1000 + 8 * table_index(va, 5) as u64,
            0x2000 | 0x63,
        );
        put(
            &mut m,
            0x2000 + 8 * table_index(va, 4) as u64,
            0x3000 | 0x63,
        );
        put(
            &mut m,
            0x3000 + 8 * table_index(va, 3) as u64,
            0x4000_0000 | 0xe3 | PTE_NX,
        );
        let big = vec![0u8; 0x10];
        let mem = SliceMemory::new(vec![
            crate::memory::SliceRegion { gpa: 0, bytes: &m },
            crate::memory::SliceRegion {
                gpa: 0x4001_2340,
                bytes: &big,
            },
        ]);
        let root = PageRoot {
            pgd_pa: 0x1000,
            levels: 5,
        };
        let w = walk(&mem, root, va).unwrap();
        assert_eq!(
            (w.pa, w.page_size, w.nx, w.writable),
            (0x4001_2345, PAGE_1G, true, true)
        );
        assert_eq!(
            w.entries.iter().map(|e| e.level).collect::<Vec<_>>(),
            vec![5, 4, 3]
        );
        assert_eq!(
            w.entries[2].entry_pa,
            0x3000 + 8 * table_index(va, 3) as u64
        );
        // The same VA is not canonical with 4 levels.
        let root4 = PageRoot {
            pgd_pa: 0x1000,
            levels: 4,
        };
        assert!(matches!(
            walk(&mem, root4, va),
            Err(PagingError::NonCanonical { .. })
        ));
        // 1 GiB leaf whose target is outside RAM.
        assert!(matches!(
            walk(&mem, root, va + 0x10_0000),
            Err(PagingError::OutsideRam { level: 3, .. })
        ));
        // mapped_ranges reports the RAM-backed mapping from `va` to the end of the 1 GiB page.
        let ranges = mapped_ranges(&mem, root, va, va + 2 * PAGE_1G);
        let len = PAGE_1G - (va & (PAGE_1G - 1));
        assert_eq!(
            ranges,
            vec![Mapping {
                va,
                pa: 0x4001_2345,
                len
            }]
        );
    }

    #[test]
    fn mapped_ranges_merge_and_top_of_address_space() {
        let mut m = four_level();
        // PDPT[511] -> PD 0x6000: PD[510] = 2 MiB at 0, PD[511] = 2 MiB at 0x20_0000.
        put(&mut m, 0x2000 + 8 * 511, 0x6000 | 0x63);
        put(&mut m, 0x6000 + 8 * 510, 0xe3);
        put(&mut m, 0x6000 + 8 * 511, 0x20_0000 | 0xe3);
        let mem = SliceMemory::flat(&m);
        let root = PageRoot {
            pgd_pa: 0x1000,
            levels: 4,
        };
        let r = mapped_ranges(&mem, root, 0xffff_ffff_8000_0000, u64::MAX);
        // 0xffffffff81000000 (2 MiB) and 0xffffffff81200000 (4 KiB pages at 0x5000, 0x7000),
        // then the merged 4 MiB at the very top.
        assert_eq!(r.len(), 4, "{r:x?}");
        assert_eq!(
            r[0],
            Mapping {
                va: 0xffff_ffff_8100_0000,
                pa: 0x20_0000,
                len: PAGE_2M
            }
        );
        assert_eq!(
            r[1],
            Mapping {
                va: 0xffff_ffff_8120_0000,
                pa: 0x5000,
                len: PAGE_4K
            }
        );
        assert_eq!(
            r[2],
            Mapping {
                va: 0xffff_ffff_8120_1000,
                pa: 0x7000,
                len: PAGE_4K
            }
        );
        assert_eq!(r[3].va, 0xffff_ffff_ffc0_0000);
        assert_eq!((r[3].pa, r[3].len), (0, 2 * PAGE_2M - 1));
    }

    #[test]
    fn canonical() {
        assert!(is_canonical(0xffff_8000_0000_0000, 4));
        assert!(!is_canonical(0xff11_0000_0000_0000, 4));
        assert!(is_canonical(0xff11_0000_0000_0000, 5));
        assert!(is_canonical(0x7fff_ffff_ffff, 4));
        assert!(!is_canonical(0x8000_0000_0000, 4));
    }
}
