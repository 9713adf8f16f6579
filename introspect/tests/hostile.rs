//! Hostile guest memory: corrupted kallsyms tables (byte flips, truncation, huge counts, bad
//! markers, bad token indices, unsorted offsets), garbage RAM, and page tables that loop or
//! point outside RAM. Everything must end in a typed error (or a harmless result), never a panic
//! or a hang.

mod common;

use std::time::{Duration, Instant};

use common::Dump;
use introspect::kallsyms::{self, KallsymsLayout};
use introspect::paging::{self, PageRoot};
use introspect::{KallsymsError, Kernel, KernelError, SliceMemory, VcpuRegs};

/// The bytes around the real kallsyms tables of a snapshot, with their base pa and the offset of
/// the token table.
struct Window {
    bytes: Vec<u8>,
    base: u64,
    tt_off: usize,
    layout: KallsymsLayout,
}

impl Window {
    fn off(&self, pa: u64) -> usize {
        (pa - self.base) as usize
    }
    fn parse(&self, bytes: &[u8]) -> Result<kallsyms::Kallsyms, KallsymsError> {
        kallsyms::parse(bytes, self.base, self.tt_off)
    }
}

fn window(d: &Dump) -> Window {
    let mem = SliceMemory::flat(&d.ram);
    let tt = kallsyms::scan_token_tables(&mem)[0];
    let k = kallsyms::decode_at(&mem, tt).expect("real tables decode");
    let l = k.layout;
    let n = u64::from(l.num_syms);
    let lo = l.start_pa() - 0x1000;
    let hi = [
        l.token_index_pa + 512,
        l.offsets_pa + 4 * n,
        l.relative_base_pa + 8,
        l.seqs_of_names_pa.unwrap() + 3 * n,
    ]
    .into_iter()
    .max()
    .unwrap()
        + 0x1000;
    Window {
        bytes: d.ram[lo as usize..hi as usize].to_vec(),
        base: lo,
        tt_off: (tt - lo) as usize,
        layout: l,
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Uses a parse result without panicking (lookups and symbolization on whatever came out).
fn exercise(r: &Result<kallsyms::Kallsyms, KallsymsError>) {
    if let Ok(k) = r {
        let s = &k.symbols;
        assert!(s.len() < kallsyms::MAX_SYMS as usize);
        for sym in s.iter().step_by(997) {
            let _ = s.lookup(sym.name, None);
            let _ = s.symbolize(sym.addr.wrapping_add(3));
        }
        let _ = s.lookup("", Some(u32::MAX));
        let _ = s.symbolize(u64::MAX);
    }
}

#[test]
fn real_window_parses() {
    for d in [common::dump_6_1(), common::dump_6_12()] {
        let w = window(d);
        let k = w.parse(&w.bytes).unwrap();
        assert_eq!(k.symbols.len(), w.layout.num_syms as usize);
        assert_eq!(k.layout, w.layout);
    }
}

#[test]
fn random_byte_flips() {
    for (seed, d) in [
        (0x9e37_79b9_7f4a_7c15u64, common::dump_6_1()),
        (0xdead_beef_1234_5678, common::dump_6_12()),
    ] {
        let w = window(d);
        let mut rng = Rng(seed);
        // Structural hot spots get most flips: num_syms, markers, token table/index, offsets,
        // relative_base, the first names.
        let spots = [
            w.off(w.layout.num_syms_pa),
            w.off(w.layout.markers_pa),
            w.off(w.layout.token_table_pa),
            w.off(w.layout.token_index_pa),
            w.off(w.layout.offsets_pa),
            w.off(w.layout.relative_base_pa),
            w.off(w.layout.names_pa),
        ];
        let (mut ok, mut err) = (0, 0);
        for _ in 0..40 {
            let mut b = w.bytes.clone();
            for _ in 0..1 + rng.below(16) {
                let at = if rng.below(4) == 0 {
                    rng.below(b.len())
                } else {
                    (spots[rng.below(spots.len())] + rng.below(64)).min(b.len() - 1)
                };
                b[at] ^= 1 << rng.below(8);
            }
            let t = Instant::now();
            let r = w.parse(&b);
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "parse took {:?}",
                t.elapsed()
            );
            exercise(&r);
            if r.is_ok() {
                ok += 1
            } else {
                err += 1
            }
        }
        eprintln!(
            "{}: 40 corrupted tables: {ok} still decoded, {err} rejected",
            d.version
        );
        assert!(
            err > 0,
            "corruption of structural fields must be detected sometimes"
        );
    }
}

#[test]
fn truncated_tables() {
    let w = window(common::dump_6_12());
    for i in 1..16 {
        let cut = w.bytes.len() * i / 16;
        let r = kallsyms::parse(&w.bytes[..cut], w.base, w.tt_off.min(cut));
        exercise(&r);
        // Every table but the optional seqs_of_names (last in 6.12) is needed.
        match &r {
            Ok(k) => assert!(
                k.layout.seqs_of_names_pa.is_none() && cut > w.off(w.layout.relative_base_pa),
                "truncated at {cut:#x} of {:#x} still decoded",
                w.bytes.len()
            ),
            Err(_) => assert!(
                cut <= w.off(w.layout.seqs_of_names_pa.unwrap()) + 3 * w.layout.num_syms as usize
            ),
        }
        let r = kallsyms::parse(
            &w.bytes[cut..],
            w.base + cut as u64,
            w.tt_off.saturating_sub(cut),
        );
        exercise(&r);
        assert!(r.is_err());
    }
    // Truncation of the whole RAM around the tables: decode_at reads what exists.
    let d = common::dump_6_12();
    let tt = w.layout.token_table_pa as usize;
    let mem = SliceMemory::flat(&d.ram[..tt + 0x800]);
    assert!(kallsyms::decode_at(&mem, tt as u64).is_err());
}

#[test]
fn huge_num_syms_bad_markers_bad_token_index() {
    for d in [common::dump_6_1(), common::dump_6_12()] {
        let w = window(d);
        let n_off = w.off(w.layout.num_syms_pa);
        for n in [
            u32::MAX,
            0x00ff_ffff,
            w.layout.num_syms + 1,
            w.layout.num_syms - 1,
            0,
        ] {
            let mut b = w.bytes.clone();
            b[n_off..n_off + 4].copy_from_slice(&n.to_le_bytes());
            let t = Instant::now();
            let r = w.parse(&b);
            assert!(r.is_err(), "num_syms {n:#x} accepted");
            assert!(t.elapsed() < Duration::from_secs(10));
        }
        // Bad marker.
        let mut b = w.bytes.clone();
        let m1 = w.off(w.layout.markers_pa) + 4;
        b[m1] = b[m1].wrapping_add(1);
        assert!(w.parse(&b).is_err(), "bad marker accepted");
        // token_index entries out of range / inconsistent.
        for (i, v) in [(7usize, 0xffffu16), (0, 1), (255, 0x7fff)] {
            let mut b = w.bytes.clone();
            let at = w.off(w.layout.token_index_pa) + 2 * i;
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
            assert!(w.parse(&b).is_err(), "token_index[{i}] = {v:#x} accepted");
        }
        // A token losing its NUL (tokens merge; the index no longer matches).
        let mut b = w.bytes.clone();
        let tt = w.off(w.layout.token_table_pa);
        let nul = tt + b[tt..].iter().position(|&c| c == 0).unwrap();
        b[nul] = b'x';
        assert!(w.parse(&b).is_err());
        // First name entry claims the maximum length (0x3fff tokens).
        let mut b = w.bytes.clone();
        let names = w.off(w.layout.names_pa);
        b[names] = 0xff;
        b[names + 1] = 0x7f;
        assert!(w.parse(&b).is_err());
        // Offsets out of order: two symbols swapped.
        let mut b = w.bytes.clone();
        let o = w.off(w.layout.offsets_pa) + 4 * 5000;
        let (x, y) = (b[o..o + 4].to_vec(), b[o + 400..o + 404].to_vec());
        b[o..o + 4].copy_from_slice(&y);
        b[o + 400..o + 404].copy_from_slice(&x);
        assert!(matches!(
            w.parse(&b),
            Err(KallsymsError::Inconsistent { .. })
        ));
        // relative_base not a kernel pointer: no table order fits.
        let mut b = w.bytes.clone();
        let rb = w.off(w.layout.relative_base_pa);
        b[rb..rb + 8].copy_from_slice(&0x1234u64.to_le_bytes());
        assert!(w.parse(&b).is_err());
        // Arbitrary token-table offsets into the window never panic.
        for off in (0..w.bytes.len()).step_by(w.bytes.len() / 64) {
            let _ = kallsyms::parse(&w.bytes, w.base, off);
        }
        let _ = kallsyms::parse(&w.bytes, w.base, usize::MAX);
        let _ = kallsyms::parse(&[], 0, 0);
    }
}

fn long_mode_vcpu(cr3: u64, la57: bool) -> VcpuRegs {
    VcpuRegs {
        cr0: 0x8005_0033,
        cr3,
        cr4: if la57 { 0x1000 } else { 0 },
        efer: 0xd01,
        ..VcpuRegs::default()
    }
}

#[test]
fn garbage_ram_and_planted_digit_runs() {
    // 64 MiB of noise with 5000 planted "0\01\0..9\0" runs (some 8-aligned).
    let mut ram = vec![0u8; 64 << 20];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for c in ram.chunks_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    let digits = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
    for _ in 0..5000 {
        let at = rng.below(ram.len() - 64) & !7;
        ram[at..at + 20].copy_from_slice(digits);
    }
    let mem = SliceMemory::flat(&ram);
    let t = Instant::now();
    let c = kallsyms::scan_token_tables(&mem);
    assert!(c.len() <= kallsyms::MAX_CANDIDATES);
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(kallsyms::find(&mem).is_err());
    let r = Kernel::open(&mem, &[long_mode_vcpu(0x1000, false)]);
    assert!(r.is_err());
    // All-zero RAM: no token table.
    let zeros = vec![0u8; 8 << 20];
    let mem = SliceMemory::flat(&zeros);
    assert!(matches!(
        Kernel::open(&mem, &[long_mode_vcpu(0x1000, true)]),
        Err(KernelError::Kallsyms(KallsymsError::NoTokenTable))
    ));
    // No vCPU in long mode.
    assert!(matches!(
        Kernel::open(&mem, &[VcpuRegs::default()]),
        Err(KernelError::NoLongModeVcpu)
    ));
    assert!(matches!(
        Kernel::open(&mem, &[]),
        Err(KernelError::NoLongModeVcpu)
    ));
}

/// Real snapshot with its top-level kernel entry made to point at the PGD itself (a loop), then
/// outside RAM: walks end in errors, Kernel::open fails cleanly (no hang), and the real kallsyms
/// (found by the full-RAM fallback scan) is not accepted without a page-table confirmation.
#[test]
fn looping_and_out_of_ram_page_tables() {
    let d = common::dump_6_12();
    let mem = SliceMemory::flat(&d.ram);
    let k = Kernel::open(&mem, &d.vcpus).unwrap();
    let root = k.page_root();
    // Every vCPU's PGD has its own copy of the top-level kernel entries: corrupt all of them.
    // ... and that of swapper_pg_dir, the root the model keeps.
    let slots: Vec<u64> = d
        .vcpus
        .iter()
        .map(PageRoot::from_regs)
        .chain([root])
        .map(|r| r.pgd_pa + 8 * paging::table_index(k.text(), root.levels) as u64)
        .collect();
    let slot = slots[0];
    let orig = u64::from_le_bytes(d.ram[slot as usize..slot as usize + 8].try_into().unwrap());
    let mut ram = d.ram.clone();
    for bad in [root.pgd_pa | 0x63, 0x7f_0000_0000 | 0x63, orig | 0x80, 0] {
        for &slot in &slots {
            ram[slot as usize..slot as usize + 8].copy_from_slice(&bad.to_le_bytes());
        }
        let mem = SliceMemory::flat(&ram);
        let t = Instant::now();
        assert!(
            paging::translate(&mem, root, k.text()).is_err(),
            "entry {bad:#x}"
        );
        let mut b = [0u8; 64];
        assert!(paging::read_virt(&mem, root, k.text(), &mut b).is_err());
        let ranges =
            paging::mapped_ranges(&mem, root, 0xffff_ffff_8000_0000, 0xffff_ffff_c000_0000);
        assert!(ranges.iter().all(|m| m.pa + m.len <= ram.len() as u64));
        let r = Kernel::open(&mem, &d.vcpus);
        assert!(
            r.is_err(),
            "entry {bad:#x}: kernel accepted without its mapping"
        );
        assert!(t.elapsed() < Duration::from_secs(30));
    }
    // Garbage page tables: random roots into the snapshot never panic.
    let mem = SliceMemory::flat(&d.ram);
    let mut rng = Rng(77);
    for _ in 0..2000 {
        let root = PageRoot {
            pgd_pa: (rng.next() % (d.ram.len() as u64)) & !0xfff,
            levels: 4 + (rng.below(2) as u8),
        };
        let va = rng.next();
        let _ = paging::walk(&mem, root, va);
        let _ = paging::walk_or_hole(&mem, root, va | 0xffff_0000_0000_0000);
    }
}

/// The mapped ranges of the kernel-image window are the kernel image: _text is in them and
/// the paging hint is what makes `Kernel::open` fast.
#[test]
fn kernel_image_mapping() {
    let d = common::dump_6_1();
    let mem = SliceMemory::flat(&d.ram);
    let k = Kernel::open(&mem, &d.vcpus).unwrap();
    let ranges = paging::mapped_ranges(
        &mem,
        k.page_root(),
        0xffff_ffff_8000_0000,
        0xffff_ffff_c000_0000,
    );
    let total: u64 = ranges.iter().map(|m| m.len).sum();
    let text_pa = k.info().text_pa;
    assert!(
        ranges.iter().any(|m| m.va == k.text() && m.pa == text_pa),
        "{ranges:x?}"
    );
    assert!(total < 256 << 20, "image mapping is {total:#x} bytes");
    let tt = k.info().kallsyms.token_table_pa;
    assert!(ranges.iter().any(|m| tt >= m.pa && tt < m.pa + m.len));
}
