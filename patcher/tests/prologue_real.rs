//! The prologue relocator on real functions of the stock Debian 6.1 and 6.12 guest kernels.
//!
//! Each kernel's vmlinux is extracted from the cached vmlinuz (guest-images), its kallsyms
//! decoded from `.rodata` (the image has no ELF symbols), and its `.text` functions classified:
//! those whose site holds `call __fentry__` on disk (NOP5 at runtime) use the ftrace-site path;
//! every other one is a prologue candidate. The tests relocate them all and compare the
//! trampoline with the original instruction by instruction (an independent decode, not the
//! relocator's own check). A missing image fails the test; it never skips.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use iced_x86::FlowControl;
use introspect::{SliceMemory, Symbols};
use object::{Object, ObjectSection};
use patcher::prologue::{relocate, Prologue, PrologueError, JMP_LEN};
use patcher::site::site_offset;

#[path = "prologue_check/mod.rs"]
mod prologue_check;
use prologue_check::decode;

use guest_images::KernelSeries;

/// Trampoline address: module space, like the arena.
const TRAMP: u64 = 0xffff_ffff_c040_0000;

struct Func {
    name: String,
    addr: u64,
    end: u64,
}

struct Image {
    series: KernelSeries,
    text_va: u64,
    text: Vec<u8>,
    fentry: u64,
    funcs: Vec<Func>,
    /// `__ex_table` entries: faulting instruction addresses.
    ex_insns: Vec<u64>,
}

impl Image {
    fn bytes(&self, f: &Func) -> &[u8] {
        let lo = (f.addr - self.text_va) as usize;
        let hi = (f.end - self.text_va) as usize;
        &self.text[lo..hi]
    }

    /// The on-disk ftrace site: `call __fentry__` at the site offset.
    fn is_ftrace(&self, f: &Func) -> bool {
        let b = self.bytes(f);
        let off = site_offset(b) as usize;
        match b.get(off..off + 5) {
            Some(s) if s[0] == 0xe8 => {
                let d = i32::from_le_bytes([s[1], s[2], s[3], s[4]]);
                let site = f.addr + off as u64;
                site.wrapping_add(5).wrapping_add(d as i64 as u64) == self.fentry
            }
            _ => false,
        }
    }

    fn func(&self, name: &str) -> &Func {
        self.funcs
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{}: no function {name}", self.series))
    }
}

fn load(series: KernelSeries) -> Image {
    let k = guest_images::existing_kernel(series).unwrap_or_else(|e| {
        panic!(
            "{series} guest kernel missing ({e}); run `scripts/setup` to fetch it into the cache"
        )
    });
    let bz = std::fs::read(&k.bzimage).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `scripts/setup` to fetch the guest kernels",
            k.bzimage.display()
        )
    });
    let vmlinux = guest_images::decompress_bzimage(&bz).unwrap();
    let elf = object::File::parse(&*vmlinux).unwrap();
    let section = |name: &str| {
        let s = elf
            .section_by_name(name)
            .unwrap_or_else(|| panic!("{series}: no {name}"));
        (s.address(), s.data().unwrap().to_vec())
    };
    let (text_va, text) = section(".text");
    let (_, rodata) = section(".rodata");
    let ks = introspect::kallsyms::find(&SliceMemory::flat(&rodata))
        .unwrap_or_else(|e| panic!("{series}: kallsyms in .rodata: {e}"));
    let symbols: Symbols = ks.symbols;
    let fentry = symbols.lookup("__fentry__", None).unwrap();
    let text_end = text_va + text.len() as u64;
    let mut seen = std::collections::BTreeSet::new();
    let mut funcs = Vec::new();
    for s in symbols.iter() {
        if !matches!(s.kind, 't' | 'T') || s.addr < text_va || s.addr >= text_end {
            continue;
        }
        if s.name.starts_with("__pfx_") || !seen.insert(s.addr) {
            continue;
        }
        let Some(r) = symbols.symbolize(s.addr) else {
            continue;
        };
        let end = (s.addr + r.size).min(text_end);
        funcs.push(Func {
            name: s.name.to_string(),
            addr: s.addr,
            end,
        });
    }
    // struct exception_table_entry { int insn, fixup, data; }, each relative to its field.
    let (ex_va, ex) = section("__ex_table");
    let ex_insns = ex
        .chunks_exact(12)
        .enumerate()
        .map(|(i, e)| {
            let d = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            (ex_va + 12 * i as u64).wrapping_add(d as i64 as u64)
        })
        .collect();
    Image {
        series,
        text_va,
        text,
        fentry,
        funcs,
        ex_insns,
    }
}

fn image(series: KernelSeries) -> &'static Image {
    static I61: OnceLock<Image> = OnceLock::new();
    static I612: OnceLock<Image> = OnceLock::new();
    match series {
        KernelSeries::V6_1 => I61.get_or_init(|| load(series)),
        KernelSeries::V6_12 => I612.get_or_init(|| load(series)),
    }
}

/// Independent check of a relocation of `f`: the moved bytes are the function's, and the
/// trampoline decodes to the same instructions, then `jmp resume`.
fn check(img: &Image, f: &Func, p: &Prologue, site_off: u64) {
    let b = img.bytes(f);
    let ctx = format!("{} {} at {:#x}", img.series, f.name, f.addr);
    assert_eq!(p.site, f.addr + site_off, "{ctx}");
    assert!(p.moved_len >= JMP_LEN, "{ctx}");
    assert_eq!(p.resume, p.site + p.moved_len, "{ctx}");
    let lo = site_off as usize;
    let hi = lo + p.moved_len as usize;
    assert_eq!(p.original(), b[lo..hi], "{ctx}: moved bytes");
    prologue_check::check_tramp(&b[lo..hi], p, TRAMP, &ctx);
}

#[derive(Default)]
struct Tally {
    ok: usize,
    refused: BTreeMap<&'static str, usize>,
    /// Examples per refusal: (function, message).
    refusals: BTreeMap<&'static str, Vec<(String, String)>>,
    /// Examples per feature of the moved code: (function, instruction).
    features: BTreeMap<&'static str, Vec<(String, String)>>,
}

fn kind(e: &PrologueError) -> &'static str {
    match e {
        PrologueError::BadInput { .. } => "BadInput",
        PrologueError::SiteNotBoundary { .. } => "SiteNotBoundary",
        PrologueError::TooShort { .. } => "TooShort",
        PrologueError::EndsInside { .. } => "EndsInside",
        PrologueError::Undecodable { .. } => "Undecodable",
        PrologueError::BranchIntoMoved { .. } => "BranchIntoMoved",
        PrologueError::RefIntoMoved { .. } => "RefIntoMoved",
        PrologueError::FlowEnd { .. } => "FlowEnd",
        PrologueError::Kprobe { .. } => "Kprobe",
        PrologueError::Trap { .. } => "Trap",
        PrologueError::Unrelocatable { .. } => "Unrelocatable",
        PrologueError::Forbidden { .. } => "Forbidden",
        PrologueError::Reach { .. } => "Reach",
    }
}

/// Relocates `funcs` (at their site offset + `extra`), checks every success, tallies.
fn run(img: &Image, funcs: &[&Func], extra: u64) -> Tally {
    let mut t = Tally::default();
    for f in funcs {
        let b = img.bytes(f);
        let off = site_offset(b) + extra;
        match relocate(f.addr, b, off, TRAMP, &[]) {
            Ok(p) => {
                check(img, f, &p, off);
                t.ok += 1;
                let orig = decode(&p.original(), p.site);
                for (o, m) in orig.iter().zip(&p.moved) {
                    let mut feat = Vec::new();
                    if o.is_ip_rel_memory_operand() {
                        feat.push("rip-relative");
                    }
                    match o.flow_control() {
                        FlowControl::ConditionalBranch if o.len() == 2 => feat.push("short jcc"),
                        FlowControl::ConditionalBranch => feat.push("near jcc"),
                        FlowControl::Call => feat.push("call"),
                        FlowControl::IndirectCall => feat.push("indirect call"),
                        _ => {}
                    }
                    for x in feat {
                        let v = t.features.entry(x).or_default();
                        if v.len() < 3 {
                            v.push((f.name.clone(), m.text.clone()));
                        }
                    }
                }
            }
            Err(e) => {
                *t.refused.entry(kind(&e)).or_default() += 1;
                let v = t.refusals.entry(kind(&e)).or_default();
                if v.len() < 4 {
                    v.push((f.name.clone(), e.to_string()));
                }
            }
        }
    }
    t
}

fn candidates(img: &Image) -> Vec<&Func> {
    img.funcs.iter().filter(|f| !img.is_ftrace(f)).collect()
}

fn relocates_every_candidate(series: KernelSeries) {
    let img = image(series);
    let cands = candidates(img);
    let t = run(img, &cands, 0);
    eprintln!(
        "{series}: {} functions, {} without an ftrace site: {} relocated, refused {:?}",
        img.funcs.len(),
        cands.len(),
        t.ok,
        t.refused
    );
    for (k, v) in t.features.iter().chain(&t.refusals) {
        eprintln!("  {k}: {v:?}");
    }
    // KERNEL-FACTS §4.1: ~9,000 (6.1) / ~5,000 (6.12) functions have no fentry.
    assert!(cands.len() > 3000, "{series}: {} candidates", cands.len());
    assert!(t.ok * 2 > cands.len(), "{series}: only {} relocated", t.ok);
    for feat in ["rip-relative", "short jcc", "near jcc", "call"] {
        assert!(
            t.features.contains_key(feat),
            "{series}: no relocated prologue with a {feat}"
        );
    }
    // The rules that real functions of both images trigger.
    for rule in ["BranchIntoMoved", "FlowEnd", "TooShort", "Trap"] {
        assert!(t.refused.contains_key(rule), "{series}: no {rule} refusal");
    }
}

#[test]
fn v6_1_prologues_without_ftrace_site_relocate_faithfully() {
    relocates_every_candidate(KernelSeries::V6_1);
}

#[test]
fn v6_12_prologues_without_ftrace_site_relocate_faithfully() {
    relocates_every_candidate(KernelSeries::V6_12);
}

/// The after-ftrace case: the `call __fentry__` (at runtime `call ftrace_caller` when traced)
/// stays, the instructions after it move.
#[test]
fn after_ftrace_sites_relocate_faithfully_on_both_kernels() {
    for series in KernelSeries::all() {
        let img = image(series);
        let traced: Vec<&Func> = img.funcs.iter().filter(|f| img.is_ftrace(f)).collect();
        let t = run(img, &traced, JMP_LEN);
        eprintln!(
            "{series}: {} ftrace functions, after-ftrace: {} relocated, refused {:?}",
            traced.len(),
            t.ok,
            t.refused
        );
        assert!(traced.len() > 20_000, "{series}");
        assert!(t.ok * 2 > traced.len(), "{series}: only {} relocated", t.ok);
        for feat in ["rip-relative", "short jcc", "near jcc", "call"] {
            assert!(t.features.contains_key(feat), "{series}: no {feat}");
        }
    }
}

/// Relocates the real function `name` as the planner would (site offset + `extra`).
fn try_real(img: &Image, name: &str, extra: u64) -> Result<Prologue, PrologueError> {
    let f = img.func(name);
    let b = img.bytes(f);
    relocate(f.addr, b, site_offset(b) + extra, TRAMP, &[])
}

/// A C function of the image (no leading `_`, no NOPs moved) that relocates with at least `n`
/// moved instructions and more than 5 bytes moved.
fn relocatable(img: &Image, n: usize) -> (&Func, Prologue) {
    candidates(img)
        .into_iter()
        .filter(|f| !f.name.starts_with('_') && !f.name.contains('.'))
        .find_map(|f| {
            let b = img.bytes(f);
            let p = relocate(f.addr, b, site_offset(b), TRAMP, &[]).ok()?;
            let nops = p.moved.iter().any(|m| m.text.starts_with("nop"));
            (p.moved.len() >= n && p.moved_len > JMP_LEN && !nops).then_some((f, p))
        })
        .unwrap_or_else(|| panic!("{}: no function moving {n} instructions", img.series))
}

/// Real: `native_write_cr0` (noinstr) loops back to its second instruction after the CR0
/// pinning check: `jmp` back into the moved bytes.
#[test]
fn real_loop_back_edge_into_moved_bytes_is_refused_native_write_cr0() {
    for series in KernelSeries::all() {
        let img = image(series);
        let f = img.func("native_write_cr0");
        assert!(
            !img.is_ftrace(f),
            "{series}: native_write_cr0 has an ftrace site"
        );
        let e = try_real(img, "native_write_cr0", 0).unwrap_err();
        let PrologueError::BranchIntoMoved {
            addr,
            target,
            site,
            end,
            ref insn,
        } = e
        else {
            panic!("{series}: {e}");
        };
        assert!(target > site && target < end, "{series}: {e}");
        assert!(addr > f.addr && addr < f.end, "{series}: {e}");
        // The named branch really is there, with that target.
        let b = img.bytes(f);
        let at = decode(b, f.addr)
            .into_iter()
            .find(|i| i.ip() == addr)
            .unwrap_or_else(|| panic!("{series}: no instruction at {addr:#x}"));
        assert_eq!(at.near_branch_target(), target, "{series}");
        assert!(insn.starts_with('j'), "{series}: {e}");
        assert!(e.to_string().contains(&format!("{addr:#x}")), "{e}");
    }
}

/// Real: the shortest functions of the images (`.cold` parts, `srso_untrain_ret`).
#[test]
fn real_functions_shorter_than_the_jump_are_refused() {
    for series in KernelSeries::all() {
        let img = image(series);
        let f = img
            .funcs
            .iter()
            .find(|f| f.end - f.addr < JMP_LEN && !img.is_ftrace(f))
            .unwrap_or_else(|| panic!("{series}: no function under 5 bytes"));
        let b = img.bytes(f);
        let e = relocate(f.addr, b, 0, TRAMP, &[]).unwrap_err();
        eprintln!("{series}: {} ({} bytes): {e}", f.name, b.len());
        assert_eq!(
            e,
            PrologueError::TooShort {
                func: f.addr,
                len: b.len() as u64,
                site: f.addr
            }
        );
    }
}

/// Planted in a real function: its bytes cut inside the second moved instruction (no real
/// function of the images ends inside its moved range; kallsyms sizes include the padding).
#[test]
fn planted_end_inside_the_moved_range_is_refused() {
    for series in KernelSeries::all() {
        let img = image(series);
        let (f, p) = relocatable(img, 2);
        // Exactly 5 bytes after the site: the last moved instruction is cut.
        let cut = (p.site - f.addr + JMP_LEN) as usize;
        let b = &img.bytes(f)[..cut];
        let e = relocate(f.addr, b, p.site - f.addr, TRAMP, &[]).unwrap_err();
        eprintln!("{series}: {} cut to {cut} bytes: {e}", f.name);
        assert!(
            matches!(e, PrologueError::EndsInside { end, .. } if end == f.addr + cut as u64),
            "{series}: {e}"
        );
    }
}

/// Real: `__bpf_trace_*` wrappers tail-call with a `jmp` at their entry.
#[test]
fn real_jmp_at_the_entry_is_refused_bpf_trace_wrapper() {
    for series in KernelSeries::all() {
        let img = image(series);
        let e = try_real(img, "__bpf_trace_initcall_level", 0).unwrap_err();
        assert!(
            matches!(&e, PrologueError::FlowEnd { insn, .. } if insn.starts_with("jmp")),
            "{series}: {e}"
        );
        assert!(e.to_string().contains("jmp"), "{e}");
    }
}

/// Real: `dummy_handler` is a BUG(): `ud2` at its entry, found by address in `__bug_table`.
#[test]
fn real_ud2_in_the_moved_bytes_is_refused_dummy_handler() {
    for series in KernelSeries::all() {
        let img = image(series);
        let e = try_real(img, "dummy_handler", 0).unwrap_err();
        assert!(
            matches!(&e, PrologueError::Trap { insn, .. } if insn == "ud2"),
            "{series}: {e}"
        );
    }
}

/// Planted in a copy of a real function: an `int3` on its second moved instruction, as a
/// kprobe there would write.
#[test]
fn planted_int3_kprobe_in_a_real_function_is_refused() {
    for series in KernelSeries::all() {
        let img = image(series);
        let (f, p) = relocatable(img, 2);
        let mut b = img.bytes(f).to_vec();
        let at = p.moved[1].addr;
        b[(at - f.addr) as usize] = 0xcc;
        let e = relocate(f.addr, &b, p.site - f.addr, TRAMP, &[]).unwrap_err();
        eprintln!("{series}: {}: {e}", f.name);
        assert_eq!(e, PrologueError::Kprobe { addr: at }, "{series}");
        assert!(e.to_string().contains("kprobe"));
    }
}

/// Real: the 6.1 `pvh_start_xen` is 32-bit code in `.text`; a 64-bit decode of the whole
/// function meets `ljmp` (invalid in long mode) and refuses rather than guess the branches.
#[test]
fn real_undecodable_function_is_refused_pvh_start_xen_6_1() {
    let img = image(KernelSeries::V6_1);
    let e = try_real(img, "pvh_start_xen", 0).unwrap_err();
    assert!(
        matches!(&e, PrologueError::Undecodable { bytes, .. } if bytes.starts_with("ea")),
        "{e}"
    );
}

/// Real: an `__ex_table` entry whose faulting instruction is among the moved bytes (the
/// caller passes the table's entries as forbidden ranges).
#[test]
fn real_exception_table_entry_in_the_moved_bytes_is_refused() {
    for series in KernelSeries::all() {
        let img = image(series);
        let ex: std::collections::BTreeSet<u64> = img.ex_insns.iter().copied().collect();
        let mut found = Vec::new();
        for f in &img.funcs {
            let b = img.bytes(f);
            let extra = if img.is_ftrace(f) { JMP_LEN } else { 0 };
            let off = site_offset(b) + extra;
            let Ok(p) = relocate(f.addr, b, off, TRAMP, &[]) else {
                continue;
            };
            let Some(&insn) = ex.range(p.site..p.resume).next() else {
                continue;
            };
            let forbidden: Vec<(u64, u64, String)> = ex
                .range(f.addr..f.end)
                .map(|&a| (a, a + 1, format!("__ex_table entry for {a:#x}")))
                .collect();
            let e = relocate(f.addr, b, off, TRAMP, &forbidden).unwrap_err();
            let PrologueError::Forbidden { start, addr, .. } = &e else {
                panic!("{series} {}: {e}", f.name);
            };
            assert_eq!(*start, insn, "{series} {}: {e}", f.name);
            assert!(p.moved.iter().any(|m| m.addr == *addr), "{e}");
            assert!(e.to_string().contains("__ex_table"), "{e}");
            found.push(format!("{}: {e}", f.name));
        }
        eprintln!(
            "{series}: {} functions: {:?}",
            found.len(),
            &found[..found.len().min(3)]
        );
        assert!(
            !found.is_empty(),
            "{series}: no __ex_table entry in moved bytes"
        );
    }
}

/// Real function, trampoline placed out of rel32 reach (in the direct map).
#[test]
fn trampoline_out_of_reach_is_refused_on_a_real_function() {
    for series in KernelSeries::all() {
        let img = image(series);
        let (f, p) = relocatable(img, 1);
        let b = img.bytes(f);
        let e = relocate(f.addr, b, p.site - f.addr, 0xffff_8880_0100_0000, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::Reach { .. }), "{series}: {e}");
        // The site one byte into the first moved instruction is not a boundary.
        if p.moved[0].bytes.len() > 1 {
            let e = relocate(f.addr, b, p.site - f.addr + 1, TRAMP, &[]).unwrap_err();
            assert!(matches!(e, PrologueError::SiteNotBoundary { .. }), "{e}");
        }
    }
}

/// 6.12 seals unused ENDBRs at boot (`66 0f 1f 00`): the site stays at +4 and the poison stays
/// in place, exactly as with the ENDBR kept.
#[test]
fn sealed_endbr_6_12_relocates_like_the_kept_one() {
    let img = image(KernelSeries::V6_12);
    let mut n = 0;
    for f in candidates(img) {
        let b = img.bytes(f);
        if b.get(..4) != Some(&patcher::site::ENDBR64[..]) {
            continue;
        }
        let Ok(kept) = relocate(f.addr, b, site_offset(b), TRAMP, &[]) else {
            continue;
        };
        let mut sealed = b.to_vec();
        sealed[..4].copy_from_slice(&patcher::site::ENDBR_SEALED);
        assert_eq!(site_offset(&sealed), 4);
        let p = relocate(f.addr, &sealed, site_offset(&sealed), TRAMP, &[]).unwrap();
        assert_eq!(p, kept, "{}", f.name);
        assert_eq!(p.site, f.addr + 4);
        n += 1;
    }
    assert!(n > 1000, "only {n} ENDBR functions relocated");
}

/// Real `.cold` parts (gcc's out-of-line unlikely paths, separate kallsyms symbols on 6.1)
/// jump back into their function: `check_other_code` applies the branch rule to them. (6.12's
/// kallsyms has no `.cold` symbols; see `whole_text_branches_into_moved_bytes`.)
#[test]
fn real_cold_parts_are_checked_against_the_moved_bytes_6_1() {
    {
        let series = KernelSeries::V6_1;
        let img = image(series);
        let by_name: BTreeMap<&str, &Func> =
            img.funcs.iter().map(|f| (f.name.as_str(), f)).collect();
        let (mut pairs, mut back, mut refused) = (0, 0, Vec::new());
        for cold in img.funcs.iter().filter(|f| f.name.ends_with(".cold")) {
            let Some(f) = by_name.get(cold.name.trim_end_matches(".cold")) else {
                continue;
            };
            let b = img.bytes(f);
            let extra = if img.is_ftrace(f) { JMP_LEN } else { 0 };
            let Ok(p) = relocate(f.addr, b, site_offset(b) + extra, TRAMP, &[]) else {
                continue;
            };
            pairs += 1;
            let cb = img.bytes(cold);
            if decode(cb, cold.addr)
                .iter()
                .any(|i| i.near_branch_target() >= f.addr && i.near_branch_target() < f.end)
            {
                back += 1;
            }
            match patcher::prologue::check_other_code(&p, cold.addr, cb) {
                Ok(()) => {}
                Err(e @ PrologueError::BranchIntoMoved { .. }) => {
                    assert!(e.to_string().contains(&format!("{:#x}", p.site)), "{e}");
                    refused.push(format!("{}: {e}", cold.name));
                }
                Err(e @ PrologueError::Undecodable { .. }) => refused.push(e.to_string()),
                Err(e) => panic!("{series} {}: {e}", cold.name),
            }
        }
        eprintln!(
            "{series}: {pairs} relocatable functions with a .cold part, {back} jump back, \
             refused {}: {:?}",
            refused.len(),
            &refused[..refused.len().min(3)]
        );
        assert!(
            pairs > 100 && back * 2 > pairs,
            "{series}: {pairs} / {back}"
        );
    }
}

/// The comparison of the tests fails on a trampoline that copies the bytes verbatim (RIP-
/// relative operands and branches then resolve elsewhere): the tests can fail.
#[test]
fn the_checker_rejects_a_verbatim_copy() {
    for series in KernelSeries::all() {
        let img = image(series);
        let (f, p) = candidates(img)
            .into_iter()
            .find_map(|f| {
                let b = img.bytes(f);
                let p = relocate(f.addr, b, site_offset(b), TRAMP, &[]).ok()?;
                let rel = decode(&p.original(), p.site)
                    .iter()
                    .any(|i| i.is_ip_rel_memory_operand() || i.near_branch_target() != 0);
                rel.then_some((f, p))
            })
            .unwrap();
        check(img, f, &p, p.site - f.addr);
        let mut bad = p.clone();
        bad.tramp = p.original();
        bad.tramp
            .extend(patcher::site::jmp_bytes(TRAMP + p.moved_len, p.resume).unwrap());
        let r = std::panic::catch_unwind(|| check(img, f, &bad, p.site - f.addr));
        assert!(r.is_err(), "{series} {}: verbatim copy passed", f.name);
    }
}

/// Direct branches from anywhere in `.text` (each kallsyms function decoded linearly) into the
/// moved bytes of relocated prologues: code outside the function (6.12's unnamed `.cold`
/// parts, asm) that `relocate` alone cannot see. Reports them; the planner must scan them too.
#[test]
fn whole_text_branches_into_moved_bytes() {
    for series in KernelSeries::all() {
        let img = image(series);
        let mut targets: Vec<(u64, u64)> = Vec::new();
        for f in &img.funcs {
            if f.end - f.addr > 1 << 20 {
                continue;
            }
            for i in decode(img.bytes(f), f.addr) {
                let t = i.near_branch_target();
                if t != 0 && !(t >= f.addr && t < f.end) {
                    targets.push((t, i.ip()));
                }
            }
        }
        targets.sort_unstable();
        let mut hits = Vec::new();
        let mut ok = 0;
        for f in candidates(img) {
            let b = img.bytes(f);
            let Ok(p) = relocate(f.addr, b, site_offset(b), TRAMP, &[]) else {
                continue;
            };
            ok += 1;
            let lo = targets.partition_point(|&(t, _)| t <= p.site);
            if let Some(&(t, from)) = targets.get(lo).filter(|&&(t, _)| t < p.resume) {
                hits.push(format!("{} {t:#x} from {from:#x}", f.name));
            }
        }
        eprintln!(
            "{series}: {} branches between functions; {} of {ok} relocated prologues are \
             entered inside their moved bytes from other code: {:?}",
            targets.len(),
            hits.len(),
            &hits[..hits.len().min(8)]
        );
        assert!(targets.len() > 100_000, "{series}");
        // Found on these images: only gcc's `.cold` parts (entered from their parent
        // function's middle, never patch targets themselves).
        assert!(
            hits.iter()
                .all(|h| h.split(' ').next().unwrap().ends_with(".cold")),
            "{series}: {hits:?}"
        );
    }
}
