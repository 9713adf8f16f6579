//! Module list and module symbols over a synthetic guest: first a well-formed module (both
//! the 6.4+ `mem[]` and the 6.1 `core_layout` shapes) read exactly as /proc/kallsyms and
//! /proc/modules would show it, then hostile values — null, user-space, unmapped and wrapping
//! pointers, huge counts, unterminated names, loops in the module list, sizes out of order,
//! a string table spread over every page of the address space, and random byte flips. Each
//! must end in a typed [`ModuleError`] (or a harmless result), never a panic or a hang.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use introspect::model::GuestAccess;
use introspect::modsyms::{
    lookup_in, read_module_symbols, symbol_size, ElfSymLayout, KernelSymbolLayout,
    ModKallsymsLayout, MAX_MODULE_SYMS, MAX_PAGES,
};
use introspect::modules::{
    read_module_list, LayoutOffsets, ModuleLayout, RegionLayout, MAX_MODULES,
};
use introspect::{ModuleError, ModuleState, RegionKind, SymbolError};

const HEAD: u64 = 0xffff_ffff_8200_0000;
const MOD: u64 = 0xffff_ffff_c001_0000;
const KS: u64 = MOD + 0x800;
const SYMTAB: u64 = 0xffff_ffff_c002_0000;
const STRTAB: u64 = 0xffff_ffff_c002_1000;
const TYPETAB: u64 = 0xffff_ffff_c002_2000;
const EXPORTS: u64 = 0xffff_ffff_c002_3000;
const TEXT: u64 = 0xffff_ffff_c000_0000;

/// Offsets in our synthetic `struct module` / `struct mod_kallsyms`.
const M_LIST: u64 = 8;
const M_NAME: u64 = 0x18;
const M_STATE: u64 = 0;
const M_KALLSYMS: u64 = 0x200;
const M_SYMS: u64 = 0x210;
const M_NUM_SYMS: u64 = 0x218;
const M_MEM: u64 = 0x100; // mem[i] = base @ +0x10*i, size @ +0x10*i+8

/// Sparse guest memory of 4 KiB pages; reads of missing pages fail.
#[derive(Clone, Default)]
struct Mem {
    pages: HashMap<u64, Vec<u8>>,
    /// Every address reads as this byte when no page holds it (a guest that maps everything).
    everything: Option<u8>,
}

impl Mem {
    fn put(&mut self, va: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let a = va + i as u64;
            let p = self
                .pages
                .entry(a & !0xfff)
                .or_insert_with(|| vec![0; 0x1000]);
            p[(a & 0xfff) as usize] = b;
        }
    }
    fn put_u64(&mut self, va: u64, v: u64) {
        self.put(va, &v.to_le_bytes());
    }
    fn put_u32(&mut self, va: u64, v: u32) {
        self.put(va, &v.to_le_bytes());
    }
}

impl GuestAccess for Mem {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = va.checked_add(i as u64).ok_or("wraps")?;
            *b = match (self.pages.get(&(a & !0xfff)), self.everything) {
                (Some(p), _) => p[(a & 0xfff) as usize],
                (None, Some(x)) => x,
                (None, None) => return Err(format!("{a:#x} not mapped")),
            };
        }
        Ok(())
    }
    fn symbol(&self, _: &str) -> Option<u64> {
        None
    }
    fn symbolize(&self, _: u64) -> Option<(String, u64, u64)> {
        None
    }
}

fn kallsyms_layout() -> ModKallsymsLayout {
    ModKallsymsLayout {
        kallsyms: M_KALLSYMS,
        symtab: 0,
        num_symtab: 8,
        strtab: 16,
        typetab: 24,
        syms: M_SYMS,
        num_syms: M_NUM_SYMS,
        ksym: KernelSymbolLayout::Relative {
            size: 12,
            value: 0,
            name: 4,
        },
        sym: ElfSymLayout::ELF64,
    }
}

/// The 6.4+ shape: `mem[]` in `enum mod_mem_type` order.
fn layout_mem() -> ModuleLayout {
    let regions: Vec<(RegionKind, u64, u64)> = RegionKind::ALL
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, M_MEM + 0x10 * i as u64, M_MEM + 0x10 * i as u64 + 8))
        .collect();
    ModuleLayout {
        head: HEAD,
        list: M_LIST,
        state: M_STATE,
        unformed: Some(3),
        states: [Some(0), Some(1), Some(2)],
        name: (M_NAME, 56),
        text: vec![(M_MEM, M_MEM + 8), (M_MEM + 0x40, M_MEM + 0x48)],
        regions: RegionLayout::Mem(regions),
        orc: None,
        kallsyms: Some(kallsyms_layout()),
    }
}

/// The 6.1 shape: `core_layout` at 0x100, `init_layout` at 0x140.
fn layout_61() -> ModuleLayout {
    let lo = |at: u64| LayoutOffsets {
        base: at,
        size: at + 8,
        text_size: at + 12,
        ro_size: at + 16,
        ro_after_init_size: at + 20,
    };
    ModuleLayout {
        regions: RegionLayout::Layouts {
            core: lo(0x100),
            init: lo(0x140),
        },
        text: vec![(0x100, 0x10c), (0x140, 0x14c)],
        ..layout_mem()
    }
}

/// (name, type letter, shndx, value) of the synthetic module's symtab.
const SYMS: &[(&str, u8, u16, u64)] = &[
    ("", 0, 0, 0),
    ("alpha", b't', 2, TEXT + 0x10),
    ("beta", b't', 2, TEXT + 0x20),
    ("", b't', 2, TEXT + 0x28),
    ("dup", b't', 2, TEXT + 0x30),
    ("dup", b't', 2, TEXT + 0x40),
    ("undef_sym", b'U', 0, 0),
    ("gamma", b'd', 3, TEXT + 0x3000),
];

/// A guest with one live module "hvmod" (6.4+ shape unless `l61`) exporting `beta`.
fn guest(l61: bool) -> Mem {
    let mut g = Mem::default();
    g.put_u64(HEAD, MOD + M_LIST);
    g.put_u64(HEAD + 8, MOD + M_LIST);
    g.put_u64(MOD + M_LIST, HEAD);
    g.put_u64(MOD + M_LIST + 8, HEAD);
    g.put_u32(MOD + M_STATE, 0);
    g.put(MOD + M_NAME, b"hvmod\0");
    if l61 {
        // core: text 0x2000, rodata 0x800, ro_after_init 0x800, data 0x1000.
        g.put_u64(MOD + 0x100, TEXT);
        for (o, v) in [(8, 0x4000u32), (12, 0x2000), (16, 0x2800), (20, 0x3000)] {
            g.put_u32(MOD + 0x100 + o, v);
        }
        // init: text 0x1000, data 0x1000 (no rodata).
        g.put_u64(MOD + 0x140, TEXT + 0x10000);
        for (o, v) in [(8, 0x2000u32), (12, 0x1000), (16, 0x1000), (20, 0x1000)] {
            g.put_u32(MOD + 0x140 + o, v);
        }
    } else {
        let regs = [
            (0, TEXT, 0x2000u32),
            (1, TEXT + 0x3000, 0x1000),
            (2, TEXT + 0x2000, 0x1000),
            (4, TEXT + 0x10000, 0x1000),
        ];
        for (i, base, size) in regs {
            g.put_u64(MOD + M_MEM + 0x10 * i, base);
            g.put_u32(MOD + M_MEM + 0x10 * i + 8, size);
        }
    }
    g.put_u64(MOD + M_KALLSYMS, KS);
    g.put_u64(KS, SYMTAB);
    g.put_u32(KS + 8, SYMS.len() as u32);
    g.put_u64(KS + 16, STRTAB);
    g.put_u64(KS + 24, TYPETAB);
    let mut strtab = vec![0u8];
    for (i, &(name, t, shndx, value)) in SYMS.iter().enumerate() {
        let off = if name.is_empty() {
            0
        } else {
            strtab.len() as u32
        };
        strtab.extend_from_slice(name.as_bytes());
        strtab.push(0);
        let e = SYMTAB + 24 * i as u64;
        g.put_u32(e, off);
        g.put(e + 4, &[0x12, 0]);
        g.put(e + 6, &shndx.to_le_bytes());
        g.put_u64(e + 8, value);
        g.put_u64(e + 16, 0x10);
        g.put(TYPETAB + i as u64, &[t]);
    }
    g.put(STRTAB, &strtab);
    // Exports: beta (its value), and dup with a value no symbol has (not "exported").
    let names = STRTAB + 0x800;
    g.put(names, b"beta\0dup\0");
    let exp = [(TEXT + 0x20, names), (TEXT + 0x999, names + 5)];
    for (i, (value, name)) in exp.iter().enumerate() {
        let e = EXPORTS + 12 * i as u64;
        g.put_u32(e, value.wrapping_sub(e) as u32);
        g.put_u32(e + 4, name.wrapping_sub(e + 4) as u32);
    }
    g.put_u64(MOD + M_SYMS, EXPORTS);
    g.put_u32(MOD + M_NUM_SYMS, exp.len() as u32);
    g
}

fn lines(g: &Mem, l: &ModuleLayout) -> Result<Vec<String>, ModuleError> {
    Ok(read_module_symbols(g, l)?
        .iter()
        .map(|s| format!("{:016x} {} {}\t[{}]", s.addr, s.kind, s.name, s.module))
        .collect())
}

#[test]
fn well_formed_module_reads_like_proc() {
    for l61 in [false, true] {
        let l = if l61 { layout_61() } else { layout_mem() };
        let g = guest(l61);
        let want = [
            format!("{:016x} t alpha\t[hvmod]", TEXT + 0x10),
            format!("{:016x} T beta\t[hvmod]", TEXT + 0x20),
            format!("{:016x} t dup\t[hvmod]", TEXT + 0x30),
            format!("{:016x} t dup\t[hvmod]", TEXT + 0x40),
            "0000000000000000 u undef_sym\t[hvmod]".to_string(),
            format!("{:016x} d gamma\t[hvmod]", TEXT + 0x3000),
        ];
        assert_eq!(lines(&g, &l).unwrap(), want, "6.1 shape: {l61}");
        let syms = read_module_symbols(&g, &l).unwrap();
        assert_eq!(
            lookup_in(&syms, "hvmod", "alpha", None).unwrap(),
            TEXT + 0x10
        );
        assert_eq!(
            lookup_in(&syms, "hvmod", "dup", Some(2)).unwrap(),
            TEXT + 0x40
        );
        assert!(matches!(
            lookup_in(&syms, "hvmod", "dup", None),
            Err(ModuleError::Symbol {
                source: SymbolError::Ambiguous { count: 2, .. },
                ..
            })
        ));
        assert!(matches!(
            lookup_in(&syms, "hvmod", "dup", Some(3)),
            Err(ModuleError::Symbol {
                source: SymbolError::NoSuchPos { .. },
                ..
            })
        ));
        // Undefined symbols never resolve.
        assert!(matches!(
            lookup_in(&syms, "hvmod", "undef_sym", None),
            Err(ModuleError::Symbol {
                source: SymbolError::Unknown { .. },
                ..
            })
        ));

        let mods = read_module_list(&g, &l).unwrap();
        assert_eq!(mods.len(), 1);
        let m = &mods[0];
        assert_eq!(
            (m.name.as_str(), m.state, m.addr),
            ("hvmod", ModuleState::Live, MOD)
        );
        assert_eq!(m.core_text(), Some((TEXT, TEXT + 0x2000)));
        assert_eq!(m.init_text(), Some((TEXT + 0x10000, TEXT + 0x11000)));
        assert_eq!(m.base(), Some(TEXT));
        assert_eq!(
            m.region(RegionKind::Rodata).map(|r| r.0),
            Some(TEXT + 0x2000)
        );
        if l61 {
            assert_eq!(m.size, 0x6000);
            assert_eq!(
                m.region(RegionKind::RoAfterInit),
                Some((TEXT + 0x2800, TEXT + 0x3000))
            );
            assert_eq!(
                m.region(RegionKind::InitData),
                Some((TEXT + 0x11000, TEXT + 0x12000))
            );
        } else {
            assert_eq!(m.size, 0x5000);
            assert_eq!(
                m.region(RegionKind::Data),
                Some((TEXT + 0x3000, TEXT + 0x4000))
            );
        }
        assert!(m.region(RegionKind::InitRodata).is_none());
        // Sizes end at the module's next defined symbol, or at the end of the region.
        assert_eq!(symbol_size(&syms, m, TEXT + 0x10), Some(0x10));
        assert_eq!(symbol_size(&syms, m, TEXT + 0x40), Some(0x2000 - 0x40));
        assert_eq!(symbol_size(&syms, m, 0), None);
        assert!(m.regions.iter().take_while(|r| !r.kind.is_init()).count() >= 2);
    }
}

#[test]
fn unformed_modules_are_skipped_and_states_named() {
    let l = layout_mem();
    let mut g = guest(false);
    for (v, s) in [
        (1, ModuleState::Coming),
        (2, ModuleState::Going),
        (77, ModuleState::Unknown),
    ] {
        g.put_u32(MOD + M_STATE, v);
        assert_eq!(read_module_list(&g, &l).unwrap()[0].state, s);
    }
    g.put_u32(MOD + M_STATE, 3);
    assert!(read_module_list(&g, &l).unwrap().is_empty());
    assert!(read_module_symbols(&g, &l).unwrap().is_empty());
}

/// Runs `f` on a corrupted copy of the guest and returns the symbols' and the list's results.
fn corrupt(
    l61: bool,
    mut f: impl FnMut(&mut Mem),
) -> (Result<Vec<String>, ModuleError>, Result<usize, ModuleError>) {
    let l = if l61 { layout_61() } else { layout_mem() };
    let mut g = guest(l61);
    f(&mut g);
    let t = Instant::now();
    let r = (lines(&g, &l), read_module_list(&g, &l).map(|m| m.len()));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    r
}

fn is_read(r: &Result<Vec<String>, ModuleError>) -> bool {
    matches!(r, Err(ModuleError::Read { .. }))
}

fn is_corrupt(r: &Result<Vec<String>, ModuleError>) -> bool {
    matches!(r, Err(ModuleError::Corrupt { .. }))
}

#[test]
fn bad_kallsyms_pointers_are_errors() {
    let (s, _) = corrupt(false, |g| g.put_u64(MOD + M_KALLSYMS, 0));
    assert!(is_corrupt(&s), "{s:?}");
    let (s, _) = corrupt(false, |g| g.put_u64(MOD + M_KALLSYMS, 0x7fff_0000_1000));
    assert!(is_corrupt(&s), "{s:?}");
    let (s, _) = corrupt(false, |g| {
        g.put_u64(MOD + M_KALLSYMS, 0xffff_ffff_dead_0000)
    });
    assert!(is_read(&s), "{s:?}");
    for field in [0, 16, 24] {
        let (s, _) = corrupt(false, |g| g.put_u64(KS + field, 0));
        assert!(is_corrupt(&s), "field {field}: {s:?}");
        let (s, _) = corrupt(false, |g| g.put_u64(KS + field, 0xffff_ffff_dead_0000));
        assert!(is_read(&s), "field {field}: {s:?}");
    }
    // A symtab or typetab that starts mapped and runs into unmapped memory.
    let (s, _) = corrupt(false, |g| g.put_u64(KS, MOD + 0xfd0));
    assert!(is_read(&s), "{s:?}");
    let (s, _) = corrupt(false, |g| g.put_u64(KS + 24, MOD + 0xffc));
    assert!(is_read(&s), "{s:?}");
    // A table whose end wraps around the address space.
    let (s, _) = corrupt(false, |g| g.put_u64(KS, u64::MAX - 0x10));
    assert!(is_corrupt(&s) || is_read(&s), "{s:?}");
    // A string table whose names wrap or are unmapped.
    let (s, _) = corrupt(false, |g| g.put_u64(KS + 16, u64::MAX - 2));
    assert!(is_corrupt(&s) || is_read(&s), "{s:?}");
    let (s, _) = corrupt(false, |g| g.put_u32(SYMTAB + 24, 0x00f0_0000));
    assert!(is_read(&s), "{s:?}");
}

#[test]
fn bad_counts_are_errors() {
    let (s, _) = corrupt(false, |g| g.put_u32(KS + 8, u32::MAX));
    assert!(
        matches!(s, Err(ModuleError::TooMany { count, max, .. }) if count == u32::MAX as u64 && max == MAX_MODULE_SYMS),
        "{s:?}"
    );
    // Within the cap but past the mapped table.
    let (s, _) = corrupt(false, |g| g.put_u32(KS + 8, 100_000));
    assert!(is_read(&s), "{s:?}");
    let (s, _) = corrupt(false, |g| g.put_u32(MOD + M_NUM_SYMS, u32::MAX));
    assert!(matches!(s, Err(ModuleError::TooMany { .. })), "{s:?}");
    let (s, _) = corrupt(false, |g| g.put_u32(MOD + M_NUM_SYMS, 5000));
    assert!(is_read(&s), "{s:?}");
    let (s, _) = corrupt(false, |g| g.put_u64(MOD + M_SYMS, 0x1000));
    assert!(is_corrupt(&s), "{s:?}");
    // No symbols at all is fine.
    let (s, _) = corrupt(false, |g| g.put_u32(KS + 8, 0));
    assert_eq!(s.unwrap(), Vec::<String>::new());
}

#[test]
fn unterminated_names_are_cut_like_strscpy() {
    let (s, _) = corrupt(false, |g| {
        g.put_u32(SYMTAB + 24, 0x10000);
        g.put(STRTAB + 0x10000, &[b'x'; 3 * 4096]);
    });
    let s = s.unwrap();
    let long = s.iter().find(|l| l.contains("xxxx")).unwrap();
    assert_eq!(long.matches('x').count(), 511, "{long}");
}

#[test]
fn a_name_on_every_page_hits_the_page_cap() {
    // A guest that maps everything, with each symbol's name on its own page: the reader stops
    // at MAX_PAGES pages instead of walking 2^18 pages.
    let l = layout_mem();
    let mut g = guest(false);
    let n = 0x20000u32;
    let symtab = 0xffff_ffff_e000_0000u64;
    let mut table = vec![0u8; 24 * n as usize];
    for i in 0..n as usize {
        table[24 * i..24 * i + 4].copy_from_slice(&((i as u32 + 1) * 0x1000).to_le_bytes());
    }
    g.put(symtab, &table);
    g.put_u32(KS + 8, n);
    g.put_u64(KS, symtab);
    g.put_u64(KS + 24, 0xffff_ffff_e100_0000);
    g.put_u64(KS + 16, 0xffff_ffff_e200_0000);
    g.everything = Some(0x41);
    let t = Instant::now();
    let r = read_module_symbols(&g, &l);
    assert!(
        matches!(r, Err(ModuleError::TooMany { max, .. }) if max == MAX_PAGES as u64),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn bad_module_lists_and_regions_are_errors() {
    // A loop that never returns to the head.
    let (_, m) = corrupt(false, |g| g.put_u64(MOD + M_LIST, MOD + M_LIST));
    assert!(matches!(m, Err(ModuleError::List(_))), "{m:?}");
    // A link into user space.
    let (_, m) = corrupt(false, |g| g.put_u64(MOD + M_LIST, 0x4000));
    assert!(matches!(m, Err(ModuleError::List(_))), "{m:?}");
    // An unmapped link.
    let (_, m) = corrupt(false, |g| g.put_u64(MOD + M_LIST, 0xffff_ffff_dead_0008));
    assert!(matches!(m, Err(ModuleError::Read { .. })), "{m:?}");
    // A name that fills its array with no NUL.
    let (_, m) = corrupt(false, |g| g.put(MOD + M_NAME, &[b'n'; 56]));
    assert!(matches!(m, Err(ModuleError::Corrupt { .. })), "{m:?}");
    // A region that wraps, or lies in user space.
    let (_, m) = corrupt(false, |g| g.put_u64(MOD + M_MEM, u64::MAX - 0x100));
    assert!(matches!(m, Err(ModuleError::Corrupt { .. })), "{m:?}");
    let (_, m) = corrupt(false, |g| g.put_u64(MOD + M_MEM, 0x40_0000));
    assert!(matches!(m, Err(ModuleError::Corrupt { .. })), "{m:?}");
    // 6.1: sizes out of order.
    let (_, m) = corrupt(true, |g| g.put_u32(MOD + 0x100 + 12, 0x9000));
    assert!(matches!(m, Err(ModuleError::Corrupt { .. })), "{m:?}");
    // A list of more than MAX_MODULES distinct modules.
    let l = layout_mem();
    let mut g = guest(false);
    let base = 0xffff_ffff_d000_0000u64;
    g.put_u64(HEAD, base + M_LIST);
    for i in 0..(MAX_MODULES as u64 + 2) {
        g.put_u64(base + i * 0x1000 + M_LIST, base + (i + 1) * 0x1000 + M_LIST);
        g.put_u32(base + i * 0x1000 + M_STATE, 3);
    }
    let r = read_module_list(&g, &l);
    assert!(matches!(r, Err(ModuleError::List(_))), "{r:?}");
}

#[test]
fn random_byte_flips_never_panic() {
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let areas: [(u64, u64); 6] = [
        (MOD, 0x220),
        (KS, 32),
        (SYMTAB, 24 * SYMS.len() as u64),
        (STRTAB, 0x20),
        (TYPETAB, SYMS.len() as u64),
        (EXPORTS, 24),
    ];
    let t = Instant::now();
    let (mut ok, mut err) = (0, 0);
    for i in 0..3000 {
        let l61 = i % 2 == 0;
        let (s, m) = corrupt(l61, |g| {
            for _ in 0..1 + rng.next() % 4 {
                let (a, n) = areas[(rng.next() % areas.len() as u64) as usize];
                let at = a + rng.next() % n;
                let v = rng.next() as u8;
                g.put(at, &[v]);
            }
        });
        for r in [s.map(|_| ()), m.map(|_| ())] {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    err += 1
                }
            }
        }
    }
    assert!(err > 100 && ok > 100, "ok {ok}, err {err}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

#[test]
fn bpf_symbols_read_like_proc_and_bad_lists_are_errors() {
    use introspect::bpfsyms::{read_bpf_symbols, BpfKsymLayout};
    const BHEAD: u64 = 0xffff_ffff_8300_0000;
    const K1: u64 = 0xffff_ffff_c100_0000;
    const K2: u64 = 0xffff_ffff_c100_1000;
    let l = BpfKsymLayout {
        head: BHEAD,
        jit_kallsyms: BHEAD + 0x100,
        jit_harden: BHEAD + 0x104,
        start: 0,
        name: (0x10, 512),
        lnode: 0x210,
    };
    let make = || {
        let mut g = Mem::default();
        g.put_u32(BHEAD + 0x100, 1);
        g.put_u32(BHEAD + 0x104, 0);
        g.put_u64(BHEAD, K1 + 0x210);
        g.put_u64(K1 + 0x210, K2 + 0x210);
        g.put_u64(K2 + 0x210, BHEAD);
        g.put_u64(K1, 0xffff_ffff_c000_1000);
        g.put(K1 + 0x10, b"bpf_prog_0123456789abcdef_a\0");
        g.put_u64(K2, 0xffff_ffff_c000_2000);
        g.put(K2 + 0x10, &[b'y'; 512]);
        g
    };
    let g = make();
    let s = read_bpf_symbols(&g, &l).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (
            s[0].addr,
            s[0].kind,
            s[0].name.as_str(),
            s[0].module.as_str()
        ),
        (
            0xffff_ffff_c000_1000,
            't',
            "bpf_prog_0123456789abcdef_a",
            "bpf"
        )
    );
    assert_eq!(s[1].name.len(), 511, "cut at KSYM_NAME_LEN - 1");
    // Hardening or bpf_jit_kallsyms != 1: /proc/kallsyms shows none.
    let mut h = make();
    h.put_u32(BHEAD + 0x104, 1);
    assert!(read_bpf_symbols(&h, &l).unwrap().is_empty());
    let mut h = make();
    h.put_u32(BHEAD + 0x100, 2);
    assert!(read_bpf_symbols(&h, &l).unwrap().is_empty());
    // A loop, a user-space link, an unmapped entry.
    let mut h = make();
    h.put_u64(K2 + 0x210, K1 + 0x210);
    assert!(matches!(
        read_bpf_symbols(&h, &l),
        Err(ModuleError::List(_))
    ));
    let mut h = make();
    h.put_u64(K1 + 0x210, 0x1000);
    assert!(matches!(
        read_bpf_symbols(&h, &l),
        Err(ModuleError::List(_))
    ));
    let mut h = make();
    h.put_u64(K1 + 0x210, 0xffff_ffff_dead_0000);
    assert!(matches!(
        read_bpf_symbols(&h, &l),
        Err(ModuleError::Read { .. })
    ));
}
