//! GDT entries and the KVM segments derived from them (after Firecracker's gdt.rs).

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from flags (access byte in bits 0..8, flags nibble in bits 12..16),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let l = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    if (entry >> 55) & 1 == 1 {
        (l << 12) | 0xfff
    } else {
        l
    }
}

/// The KVM segment for GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// GDT for 64-bit entry: null, code (0x08), data (0x10), TSS (0x18).
pub const GDT_LONG: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for PVH 32-bit protected-mode entry: null, code (0x08), data (0x10), TSS (0x18).
pub const GDT_PVH: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let s = segment_from_gdt(GDT_LONG[1], 1);
        assert_eq!(
            (s.selector, s.l, s.db, s.present, s.s, s.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let d = segment_from_gdt(GDT_PVH[2], 2);
        assert_eq!((d.selector, d.db, d.type_, d.base), (0x10, 1, 3, 0));
        let t = segment_from_gdt(0, 0);
        assert_eq!(t.unusable, 1);
    }
}
