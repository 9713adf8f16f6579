//! Fuzz the ORC unwinder: the input supplies an ORC table (ip deltas + entries, both formats),
//! a start state and the contents of a 16 KiB task stack.
#![no_main]

use introspect::orc::{OrcFormat, OrcTable};
use introspect::unwind::{
    walk, PtRegsLayout, StackRange, StackReader, StackType, UnwindEnv, UnwindStart, MAX_FRAMES,
};
use libfuzzer_sys::fuzz_target;

const TEXT: u64 = 0xffff_ffff_8100_0000;
const STACK: u64 = 0xffff_c900_0000_0000;

struct Mem<'a>(&'a [u8]);

impl StackReader for Mem<'_> {
    fn read_u64(&self, va: u64) -> Option<u64> {
        let off = usize::try_from(va.checked_sub(STACK)?).ok()?;
        let b = self.0.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 26 {
        return;
    }
    let n = (data[0] as usize % 32) + 1;
    let format = if data[1] & 1 == 0 {
        OrcFormat::Legacy
    } else {
        OrcFormat::Current
    };
    let start = UnwindStart {
        ip: TEXT + u64::from(u16::from_le_bytes([data[2], data[3]])),
        sp: STACK + u64::from(u16::from_le_bytes([data[4], data[5]]) & 0x3fff),
        bp: STACK + u64::from(u16::from_le_bytes([data[6], data[7]])),
        signal: data[8] & 1 != 0,
    };
    let rest = &data[9..];
    let need = n * 8;
    if rest.len() < need {
        return;
    }
    // Each table row: u16 ip delta, 6-byte entry.
    let table_va = TEXT + 0x10_0000;
    let mut ips = Vec::new();
    let mut ents = Vec::new();
    let mut ip = TEXT;
    for (i, row) in rest[..need].chunks_exact(8).enumerate() {
        ip += u64::from(u16::from_le_bytes([row[0], row[1]]));
        let rel = ip.wrapping_sub(table_va + 4 * i as u64) as i32;
        ips.extend_from_slice(&rel.to_le_bytes());
        ents.extend_from_slice(&row[2..8]);
    }
    let Ok(orc) = OrcTable::new(&ips, table_va, ents, format) else {
        return;
    };
    let ranges = [(TEXT, TEXT + 0x1_0000)];
    let regs = PtRegsLayout::X86_64;
    let env = UnwindEnv {
        orc: &orc,
        orc_ranges: &ranges,
        text_ranges: &ranges,
        modules: None,
        regs,
        fp_text: &[],
        aliases: &[],
    };
    let stacks = [StackRange {
        start: STACK,
        end: STACK + 0x4000,
        ty: StackType::Task,
    }];
    let w = walk(env, &stacks, &Mem(&rest[need..]), start);
    assert!(w.frames.len() <= MAX_FRAMES);
});
