//! ORC unwind tables (`.orc_unwind_ip` + `.orc_unwind`), copied once from the guest.
//!
//! Two on-disk entry formats exist (KERNEL-FACTS §3.1): the 6.1 one (type:2, end:1) and the
//! one with an `.orc_header` (6.4+: type:3, signal:1). Both decode into [`OrcEntry`], whose
//! `ty` and `signal` fields follow the newer semantics so the unwinder has one code path.

use thiserror::Error;

/// Largest ORC table we accept (entries). 6.12 has ~423k.
pub const MAX_ORC_ENTRIES: usize = 4 << 20;

/// ORC register numbers (`ORC_REG_*`).
pub mod reg {
    /// Undefined.
    pub const UNDEFINED: u8 = 0;
    /// The previous frame's stack pointer (CFA).
    pub const PREV_SP: u8 = 1;
    /// rdx (from pt_regs).
    pub const DX: u8 = 2;
    /// rdi (from pt_regs).
    pub const DI: u8 = 3;
    /// rbp.
    pub const BP: u8 = 4;
    /// rsp.
    pub const SP: u8 = 5;
    /// r10 (from pt_regs).
    pub const R10: u8 = 6;
    /// r13 (from pt_regs).
    pub const R13: u8 = 7;
    /// `*(bp + off)`.
    pub const BP_INDIRECT: u8 = 8;
    /// `*(sp) + off`.
    pub const SP_INDIRECT: u8 = 9;
}

/// Which entry bit layout the guest kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrcFormat {
    /// Linux < 6.4 (no `.orc_header`): `sp_reg:4 bp_reg:4 type:2 end:1`.
    Legacy,
    /// Linux >= 6.4 (has `.orc_header`): `sp_reg:4 bp_reg:4 type:3 signal:1`.
    Current,
}

/// Normalized ORC entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrcType {
    /// No unwind information: an error if reached.
    Undefined,
    /// The end of the stack (entry code, kthread/idle bottoms).
    EndOfStack,
    /// A normal call frame.
    Call,
    /// A full `pt_regs` at the CFA.
    Regs,
    /// An iret frame at the CFA.
    RegsPartial,
    /// An unknown type value (treated as an error).
    Unknown(u8),
}

/// One decoded ORC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrcEntry {
    /// Offset added to the `sp_reg` value to get the CFA.
    pub sp_offset: i16,
    /// Offset used to find the saved rbp.
    pub bp_offset: i16,
    /// Register the CFA is based on ([`reg`]).
    pub sp_reg: u8,
    /// Register the saved rbp is based on ([`reg`]).
    pub bp_reg: u8,
    /// Entry type.
    pub ty: OrcType,
    /// Whether the *next* ip is exact (signal/exception frame) rather than a return address.
    pub signal: bool,
}

impl OrcEntry {
    /// The frame-pointer guess used when no ORC entry covers an ip (`orc_fp_entry`).
    pub const FP_GUESS: OrcEntry = OrcEntry {
        sp_offset: 16,
        bp_offset: -16,
        sp_reg: reg::BP,
        bp_reg: reg::PREV_SP,
        ty: OrcType::Call,
        signal: false,
    };
    /// The entry used for ip == 0 (`null_orc_entry`): a call to a NULL function pointer.
    pub const NULL_IP: OrcEntry = OrcEntry {
        sp_offset: 8,
        bp_offset: 0,
        sp_reg: reg::SP,
        bp_reg: reg::UNDEFINED,
        ty: OrcType::Call,
        signal: false,
    };

    /// Decodes one 6-byte entry.
    pub fn decode(b: [u8; 6], format: OrcFormat) -> OrcEntry {
        let sp_offset = i16::from_le_bytes([b[0], b[1]]);
        let bp_offset = i16::from_le_bytes([b[2], b[3]]);
        let bits = u16::from_le_bytes([b[4], b[5]]);
        let sp_reg = (bits & 0xf) as u8;
        let bp_reg = ((bits >> 4) & 0xf) as u8;
        let (ty, signal) = match format {
            OrcFormat::Legacy => {
                let t = ((bits >> 8) & 3) as u8;
                let end = bits & (1 << 10) != 0;
                if sp_reg == reg::UNDEFINED {
                    (
                        if end {
                            OrcType::EndOfStack
                        } else {
                            OrcType::Undefined
                        },
                        false,
                    )
                } else {
                    match t {
                        0 => (OrcType::Call, false),
                        1 => (OrcType::Regs, true),
                        2 => (OrcType::RegsPartial, true),
                        t => (OrcType::Unknown(t), false),
                    }
                }
            }
            OrcFormat::Current => {
                let t = ((bits >> 8) & 7) as u8;
                let signal = bits & (1 << 11) != 0;
                let ty = match t {
                    0 => OrcType::Undefined,
                    1 => OrcType::EndOfStack,
                    2 => OrcType::Call,
                    3 => OrcType::Regs,
                    4 => OrcType::RegsPartial,
                    t => OrcType::Unknown(t),
                };
                (ty, signal)
            }
        };
        OrcEntry {
            sp_offset,
            bp_offset,
            sp_reg,
            bp_reg,
            ty,
            signal,
        }
    }
}

/// Errors building an [`OrcTable`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OrcError {
    /// Section sizes are not multiples of 4/6 or disagree on the entry count.
    #[error("inconsistent ORC sections: {ips} ip bytes, {entries} entry bytes")]
    BadSizes {
        /// Size of `.orc_unwind_ip` in bytes.
        ips: usize,
        /// Size of `.orc_unwind` in bytes.
        entries: usize,
    },
    /// The table is empty or larger than [`MAX_ORC_ENTRIES`].
    #[error("ORC table with {0} entries is empty or too large")]
    BadCount(usize),
}

/// The vmlinux ORC table, held in host memory.
#[derive(Debug, Clone)]
pub struct OrcTable {
    /// Absolute ip of each entry (decoded from the self-relative s32 table).
    ips: Vec<u64>,
    /// Raw 6-byte entries.
    entries: Vec<u8>,
    format: OrcFormat,
}

impl OrcTable {
    /// Builds the table from the raw section bytes; `ip_table_va` is the guest virtual address
    /// of `__start_orc_unwind_ip` (the ip entries are relative to their own address).
    pub fn new(
        ip_bytes: &[u8],
        ip_table_va: u64,
        entries: Vec<u8>,
        format: OrcFormat,
    ) -> Result<Self, OrcError> {
        let bad = || OrcError::BadSizes {
            ips: ip_bytes.len(),
            entries: entries.len(),
        };
        if !ip_bytes.len().is_multiple_of(4)
            || !entries.len().is_multiple_of(6)
            || ip_bytes.len() / 4 != entries.len() / 6
        {
            return Err(bad());
        }
        let n = ip_bytes.len() / 4;
        if n == 0 || n > MAX_ORC_ENTRIES {
            return Err(OrcError::BadCount(n));
        }
        let ips = ip_bytes
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let rel = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64 as u64;
                ip_table_va.wrapping_add(4 * i as u64).wrapping_add(rel)
            })
            .collect();
        Ok(OrcTable {
            ips,
            entries,
            format,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// Whether the table is empty (never true for a constructed table).
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// Entry format.
    pub fn format(&self) -> OrcFormat {
        self.format
    }

    /// The entry covering `ip`: the rightmost entry with `ip_i <= ip` (`__orc_find`). Like the
    /// kernel, an ip below the first entry yields the first entry; callers restrict `ip` to
    /// the text ranges the table covers.
    pub fn find(&self, ip: u64) -> Option<OrcEntry> {
        let idx = self.ips.partition_point(|&x| x <= ip).saturating_sub(1);
        self.entry(idx)
    }

    /// Index of the entry [`OrcTable::find`] would return for `ip`.
    pub fn index_of(&self, ip: u64) -> Option<usize> {
        let idx = self.ips.partition_point(|&x| x <= ip).saturating_sub(1);
        (idx < self.ips.len()).then_some(idx)
    }

    /// Entry number `idx` and its ip.
    pub fn entry_at(&self, idx: usize) -> Option<(u64, OrcEntry)> {
        Some((*self.ips.get(idx)?, self.entry(idx)?))
    }

    fn entry(&self, idx: usize) -> Option<OrcEntry> {
        let b = self
            .entries
            .get(idx.checked_mul(6)?..idx.checked_mul(6)?.checked_add(6)?)?;
        Some(OrcEntry::decode(
            [b[0], b[1], b[2], b[3], b[4], b[5]],
            self.format,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_formats() {
        // 6.1 CALL sp=SP+8
        let e = OrcEntry::decode([8, 0, 0, 0, 0x05, 0x00], OrcFormat::Legacy);
        assert_eq!(
            (e.ty, e.sp_reg, e.sp_offset, e.signal),
            (OrcType::Call, reg::SP, 8, false)
        );
        // 6.1 END: sp_reg undefined + end bit
        let e = OrcEntry::decode([0, 0, 0, 0, 0x00, 0x04], OrcFormat::Legacy);
        assert_eq!(e.ty, OrcType::EndOfStack);
        assert_eq!(
            OrcEntry::decode([0; 6], OrcFormat::Legacy).ty,
            OrcType::Undefined
        );
        // 6.12 CALL = 0x0205
        let e = OrcEntry::decode([16, 0, 0, 0, 0x05, 0x02], OrcFormat::Current);
        assert_eq!((e.ty, e.sp_offset), (OrcType::Call, 16));
        let e = OrcEntry::decode([0, 0, 0, 0, 0x05, 0x0b], OrcFormat::Current);
        assert_eq!((e.ty, e.signal), (OrcType::Regs, true));
    }

    #[test]
    fn lookup_rightmost() {
        let base = 0xffff_ffff_8100_0000u64;
        // ips: base+0, base+0x10 (two dup), base+0x20, relative to their own slot.
        let abs = [base, base + 0x10, base + 0x10, base + 0x20];
        let mut ipb = Vec::new();
        for (i, a) in abs.iter().enumerate() {
            let rel = a.wrapping_sub(base - 0x1000 + 4 * i as u64) as i64 as i32;
            ipb.extend_from_slice(&rel.to_le_bytes());
        }
        let mut ent = Vec::new();
        for off in [8i16, 16, 24, 32] {
            ent.extend_from_slice(&off.to_le_bytes());
            ent.extend_from_slice(&[0, 0, 5, 2]);
        }
        let t = OrcTable::new(&ipb, base - 0x1000, ent, OrcFormat::Current).unwrap();
        assert_eq!(t.find(base + 0x15).unwrap().sp_offset, 24);
        assert_eq!(t.find(base + 0x10).unwrap().sp_offset, 24);
        assert_eq!(t.find(base + 0xf).unwrap().sp_offset, 8);
        assert_eq!(t.find(base - 1).unwrap().sp_offset, 8);
        assert_eq!(t.find(u64::MAX).unwrap().sp_offset, 32);
        assert!(OrcTable::new(&ipb[..4], 0, vec![0; 12], OrcFormat::Current).is_err());
    }
}
