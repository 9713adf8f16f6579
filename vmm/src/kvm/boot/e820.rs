//! The e820 memory map the guest gets (zero page or PVH memmap).

use crate::kvm::layout::{EBDA_START, HIMEM_START};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Builds the map: RAM from `regions`, minus the EBDA/legacy hole (reserved: EBDA with the MP
/// table, VGA hole, BIOS area with the ACPI tables) and minus the patch `arena` (reserved). Sorted by address.
pub fn build_e820(regions: &[(u64, u64)], arena: Option<(u64, u64)>) -> Vec<E820Entry> {
    let mut holes: Vec<(u64, u64)> = vec![(EBDA_START, HIMEM_START)];
    if let Some((a, l)) = arena {
        holes.push((a, a + l));
    }
    let mut out = Vec::new();
    for &(start, len) in regions {
        let mut pieces = vec![(start, start + len)];
        for &(hs, he) in &holes {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    let mut v = Vec::new();
                    if s < hs.min(e) {
                        v.push((s, hs.min(e)));
                    }
                    if he.max(s) < e {
                        v.push((he.max(s), e));
                    }
                    v
                })
                .collect();
        }
        out.extend(pieces.into_iter().map(|(s, e)| E820Entry {
            addr: s,
            size: e - s,
            kind: E820_RAM,
        }));
    }
    // EBDA (MP table), VGA hole and BIOS area (ACPI tables) as one reserved range, as PVH
    // kernels reserve 640K-1M themselves and merge it with ours.
    out.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820_RESERVED,
    });
    if let Some((a, l)) = arena {
        out.push(E820Entry {
            addr: a,
            size: l,
            kind: E820_RESERVED,
        });
    }
    out.sort_by_key(|e| e.addr);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_with_arena_on_top() {
        let m = build_e820(&[(0, 512 << 20)], Some(((510 << 20), 2 << 20)));
        let want = [
            (0, 0x9fc00, E820_RAM),
            (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
            (0x100000, (510 << 20) - 0x100000, E820_RAM),
            (510 << 20, 2 << 20, E820_RESERVED),
        ];
        let got: Vec<_> = m.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got, want);
    }
}
