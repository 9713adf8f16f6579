//! `prologue_plan::plan_entry` on the memory of booted 6.1 and 6.12 guests (the snapshots of
//! `scripts/setup`): runtime bytes, i.e. ftrace NOPs, sealed ENDBRs on 6.12, `ret` where the
//! image has `jmp __x86_return_thunk`. Every function of the core kernel's text is planned;
//! each relocation is checked against guest memory by the tests' own decode. A missing
//! snapshot fails the test (naming `scripts/setup`).

mod common;
#[path = "prologue_check/mod.rs"]
mod prologue_check;

use std::collections::BTreeMap;

use common::{snap_6_1, snap_6_12, Snapshot};
use introspect::{MemError, PhysMemory, SliceMemory};
use patcher::engine::Target;
use patcher::prologue::{Method, JMP_LEN};
use patcher::prologue_plan::{plan_entry, EntryPlan, EntryPlanError};
use patcher::site::{ENDBR_SEALED, NOP5};
use patcher::{KernelPaging, SymbolSource};

const TRAMP: u64 = 0xffff_ffff_c040_0000;

fn target(s: &Snapshot) -> Target<'_> {
    Target {
        symbols: &s.syms,
        paging: KernelPaging::from_regs(&s.vcpus[0]),
    }
}

/// Core-kernel text functions of the snapshot's kallsyms: (name, address), unique addresses.
fn text_funcs(s: &Snapshot) -> Vec<(String, u64)> {
    let lo = s.syms.addresses("_stext")[0];
    let hi = s.syms.addresses("_etext")[0];
    let mut seen = std::collections::BTreeSet::new();
    s.kallsyms
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, ty, n) = (f.next()?, f.next()?, f.next()?);
            let a = u64::from_str_radix(a, 16).ok()?;
            (matches!(ty, "t" | "T")
                && f.next().is_none()
                && !n.starts_with("__pfx_")
                && (lo..hi).contains(&a))
            .then(|| (n.to_string(), a))
        })
        .filter(|&(_, a)| seen.insert(a))
        .collect()
}

/// Guest memory with some bytes replaced (what ftrace or a kprobe would write), by VA.
struct Overlay<'a> {
    ram: &'a dyn PhysMemory,
    pa: u64,
    bytes: Vec<u8>,
}

impl PhysMemory for Overlay<'_> {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.ram.read_phys(pa, buf)?;
        for (i, b) in self.bytes.iter().enumerate() {
            let at = self.pa + i as u64;
            if at >= pa && at < pa + buf.len() as u64 {
                buf[(at - pa) as usize] = *b;
            }
        }
        Ok(())
    }
    fn regions(&self) -> Vec<(u64, u64)> {
        self.ram.regions()
    }
}

fn read(mem: &dyn PhysMemory, t: &Target, va: u64, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; n as usize];
    t.paging.read_virt(mem, va, &mut b).unwrap();
    b
}

/// Checks a prologue/after-ftrace plan against guest memory.
fn check(mem: &dyn PhysMemory, t: &Target, p: &EntryPlan, ctx: &str) {
    let pr = p.prologue.as_ref().unwrap();
    assert_eq!(pr.site, p.site, "{ctx}");
    assert!(pr.moved_len >= JMP_LEN, "{ctx}");
    let moved = read(mem, t, pr.site, pr.moved_len);
    prologue_check::check_tramp(&moved, pr, TRAMP, ctx);
}

fn plans_every_function(s: &Snapshot, min_ftrace: usize, min_prologue: usize) {
    let t = target(s);
    let ram = SliceMemory::flat(&s.ram);
    let mem: &dyn PhysMemory = &ram;
    let funcs = text_funcs(s);
    let mut methods: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let mut sealed = 0;
    for (name, a) in &funcs {
        match plan_entry(mem, &t, *a, TRAMP, &[]) {
            Ok(p) => {
                *methods.entry(p.method.to_string()).or_default() += 1;
                match p.method {
                    Method::FtraceSite => {
                        assert_eq!(read(mem, &t, p.site, 5), NOP5, "{name}");
                    }
                    _ => {
                        check(mem, &t, &p, &format!("{} {name}", s.version));
                        if read(mem, &t, *a, 4) == ENDBR_SEALED {
                            assert_eq!(p.site, a + 4, "{name}");
                            sealed += 1;
                        }
                    }
                }
            }
            Err(e) => {
                let k = match &e {
                    EntryPlanError::Prologue { source, .. } => format!("{source:?}")
                        .split([' ', '{'])
                        .next()
                        .unwrap()
                        .to_string(),
                    other => format!("{other:?}")
                        .split([' ', '{'])
                        .next()
                        .unwrap()
                        .to_string(),
                };
                let r = refused.entry(k).or_insert((0, e.to_string()));
                r.0 += 1;
            }
        }
    }
    eprintln!(
        "{}: {} functions: {methods:?}; {sealed} with a sealed ENDBR; refused {refused:#?}",
        s.version,
        funcs.len()
    );
    assert!(
        methods.get("ftrace-site").copied().unwrap_or(0) > min_ftrace,
        "{methods:?}"
    );
    assert!(
        methods.get("prologue").copied().unwrap_or(0) > min_prologue,
        "{methods:?}"
    );
    if s.version == "6.12" {
        assert!(sealed > 100, "{sealed} sealed-ENDBR prologues");
    }
}

#[test]
fn booted_6_1_every_entry_is_planned_and_prologues_relocate() {
    plans_every_function(snap_6_1(), 30_000, 3000);
}

#[test]
fn booted_6_12_every_entry_is_planned_and_prologues_relocate() {
    plans_every_function(snap_6_12(), 35_000, 3000);
}

/// What ftrace writes when it traces a function (`call ftrace_caller` over the NOP): the plan
/// becomes after-ftrace, the call stays, the instructions after it move, unless the guest's
/// ftrace record says an ftrace user redirects the ip there (klp) or a direct trampoline is
/// attached. Another `call` at an ftrace location, and an `int3` (kprobe), are refused.
#[test]
fn traced_and_kprobed_entries_on_both_booted_guests() {
    for s in [snap_6_1(), snap_6_12()] {
        let t = target(s);
        let ram = SliceMemory::flat(&s.ram);
        let caller = s.syms.addresses("ftrace_caller")[0];
        let func = s.syms.addresses("cmdline_proc_show")[0];
        let clean = plan_entry(&ram, &t, func, TRAMP, &[]).unwrap();
        assert_eq!(clean.method, Method::FtraceSite, "{}", s.version);
        let site = clean.site;
        let site_pa = t.paging.translate(&ram, site).unwrap();
        let call_to = |target: u64| {
            let mut b = patcher::site::jmp_bytes(site, target).unwrap().to_vec();
            b[0] = 0xe8;
            b
        };
        let traced = Overlay {
            ram: &ram,
            pa: site_pa,
            bytes: call_to(caller),
        };
        let p = plan_entry(&traced, &t, func, TRAMP, &[]).unwrap();
        assert_eq!(p.method, Method::AfterFtrace, "{}", s.version);
        assert_eq!(p.site, site + 5);
        check(
            &traced,
            &t,
            &p,
            &format!("{} traced cmdline_proc_show", s.version),
        );
        // The ftrace call itself is not moved.
        assert_eq!(read(&traced, &t, site, 5), call_to(caller));

        // An ftrace user that redirects the ip there (the guest's livepatch, an ipmodify
        // kprobe): the record says FTRACE_FL_IPMODIFY, and a jump after ftrace's call would
        // never run. Refused, with the symbol table's defaults and with the guest's BTF alike.
        let kernel = common::kernel(s);
        let ks = patcher::kernel::KernelSymbols::new(&kernel, &ram);
        let tk = Target {
            symbols: &ks,
            paging: t.paging,
        };
        for (t, how) in [(&t, "defaults"), (&tk, "btf")] {
            let rec = patcher::ftrace_recs::record_at(&ram, t, site)
                .unwrap()
                .expect("cmdline_proc_show's site is an ftrace location");
            assert_eq!(rec.refusal(), None, "{} {how}: {rec:?}", s.version);
            assert_eq!(rec.ipmodify, 1 << 26, "{} {how}", s.version);
            let flags_pa = t.paging.translate(&ram, rec.addr + 8).unwrap();
            let redirected = Overlay {
                ram: &traced,
                pa: flags_pa,
                bytes: (rec.flags | rec.ipmodify).to_le_bytes().to_vec(),
            };
            let e = plan_entry(&redirected, t, func, TRAMP, &[]).unwrap_err();
            assert!(
                matches!(&e, EntryPlanError::Owned { why, .. } if why.contains("FTRACE_FL_IPMODIFY")),
                "{} {how}: {e}",
                s.version
            );
            // A direct trampoline (BPF) is refused too.
            let direct = Overlay {
                ram: &traced,
                pa: flags_pa,
                bytes: (rec.flags | rec.direct).to_le_bytes().to_vec(),
            };
            let e = plan_entry(&direct, t, func, TRAMP, &[]).unwrap_err();
            assert!(
                e.to_string().contains("FTRACE_FL_DIRECT"),
                "{} {how}: {e}",
                s.version
            );
        }
        // A function without an ftrace site has no record.
        let plain = s.syms.addresses("rb_simple_read")[0];
        let plain_site = plan_entry(&ram, &t, plain, TRAMP, &[]).unwrap().site;
        assert_eq!(
            patcher::ftrace_recs::record_at(&ram, &t, plain_site),
            Ok(None)
        );

        // Any other call at an ftrace location is ftrace's (a BPF trampoline called directly):
        // it never moves.
        let other = s.syms.addresses("seq_printf")[0];
        let calls = Overlay {
            ram: &ram,
            pa: site_pa,
            bytes: call_to(other),
        };
        let e = plan_entry(&calls, &t, func, TRAMP, &[]).unwrap_err();
        assert!(
            matches!(&e, EntryPlanError::Owned { why, .. } if why.contains("ftrace location")),
            "{}: {e}",
            s.version
        );

        let kprobed = Overlay {
            ram: &ram,
            pa: site_pa,
            bytes: vec![0xcc],
        };
        let e = plan_entry(&kprobed, &t, func, TRAMP, &[]).unwrap_err();
        assert!(
            matches!(&e, EntryPlanError::Owned { why, .. } if why.contains("kprobe")),
            "{e}"
        );
        // Not a symbol start.
        assert_eq!(
            plan_entry(&ram, &t, func + 1, TRAMP, &[]),
            Err(EntryPlanError::NoSymbol { func: func + 1 })
        );
        assert!(s.syms.size_of(func).unwrap() > 5);
    }
}

/// A unique C-named function of the snapshot's core kernel with a prologue rewrite moving
/// at least two instructions (no ftrace site at runtime).
fn prologue_target(s: &Snapshot) -> (String, EntryPlan) {
    let t = target(s);
    let ram = SliceMemory::flat(&s.ram);
    text_funcs(s)
        .into_iter()
        .filter(|(n, _)| {
            n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with('_')
                && s.syms.addresses(n).len() == 1
        })
        .find_map(|(n, a)| {
            let p = plan_entry(&ram, &t, a, TRAMP, &[]).ok()?;
            let pr = p.prologue.as_ref()?;
            (p.method == Method::Prologue && pr.moved.len() >= 2).then_some((n, p))
        })
        .expect("a function for a prologue rewrite")
}

fn patch_of(func: &str) -> Vec<u8> {
    common::build_c(
        "prologue",
        &format!(
            "HVPATCH_NAME(\"pro\");\nstatic int n(void) {{ return 0; }}\nHVPATCH_FUNC({func}, n);"
        ),
    )
}

/// Immediate load and unload of a function without an ftrace site: the jmp over the first 5
/// moved bytes, the trampoline in the arena, `patch info`'s method and moved instructions;
/// unload restores the whole RAM byte for byte. The consistency model refuses it (with a
/// hint), a load without a kernel view refuses it, and a vCPU inside the moved bytes makes
/// it busy, leaving RAM unchanged.
fn prologue_load_unload(s: &Snapshot) {
    let (func, plan) = prologue_target(s);
    let pr = plan.prologue.as_ref().unwrap();
    eprintln!("{}: {func}: {:?}", s.version, pr.moved);
    let t = target(s);
    let kernel = common::kernel(s);
    let obj = patch_of(&func);
    let mut g = s.guest();
    let before = g.ram.0.clone();
    let mut e = patcher::Engine::new();

    let err = e.load(&mut g, &t, &obj, "pro.o").unwrap_err().to_string();
    assert!(
        err.contains("unexpected bytes")
            && err.contains("prologue rewrite can")
            && err.contains(&func),
        "{err}"
    );
    // Under the consistency model the dispatcher's old path is the trampoline. (In a snapshot
    // nothing runs: the transition completes at once, as the disable does.)
    {
        let mut c = s.guest();
        let mut ec = patcher::Engine::new();
        let mut busy = s.guest();
        busy.vcpus[0].rip = pr.site + pr.moved[0].bytes.len() as u64;
        let err = ec
            .load_consistent(&mut busy, &t, &kernel, &obj, "pro.o", Default::default())
            .unwrap_err();
        assert!(
            matches!(&err, patcher::PatchError::Busy(m) if m.contains("points inside") && m.contains(&func)),
            "{err}"
        );
        assert!(busy.ram.0 == before, "a busy consistent load wrote");
        drop(busy);
        let info = ec
            .load_consistent(&mut c, &t, &kernel, &obj, "pro.o", Default::default())
            .unwrap();
        let f = &info.functions[0];
        assert_eq!((f.method, f.site), (Method::Prologue, pr.site));
        let (stub, tramp) = (f.stub.unwrap(), f.tramp.unwrap());
        let code = read(&c.ram, &t, stub, patcher::dispatch::STUB_SIZE);
        let branches: Vec<(iced_x86::Mnemonic, u64)> = prologue_check::decode(&code, stub)
            .iter()
            .filter(|i| {
                matches!(
                    i.mnemonic(),
                    iced_x86::Mnemonic::Je | iced_x86::Mnemonic::Jmp
                )
            })
            .map(|i| (i.mnemonic(), i.near_branch_target()))
            .collect();
        assert_eq!(
            branches,
            vec![
                (iced_x86::Mnemonic::Je, tramp),
                (iced_x86::Mnemonic::Jmp, f.new_addr)
            ],
            "the stub's old path is the trampoline"
        );
        assert_eq!(
            read(&c.ram, &t, pr.site, 5),
            patcher::site::jmp_bytes(pr.site, f.new_addr).unwrap()
        );
        ec.disable(&mut c, &kernel, "pro", patcher::SwitchOptions::default())
            .unwrap();
        assert_eq!(read(&c.ram, &t, pr.site, pr.moved_len), pr.original());
        ec.unload(&mut c, "pro", &kernel, common::UNLOAD_WAIT)
            .unwrap();
        assert!(
            c.ram.0 == before,
            "RAM differs after the consistent load's unload"
        );
    }
    let mut busy = s.guest();
    busy.vcpus[0].rip = pr.site + pr.moved[0].bytes.len() as u64;
    let err = e
        .load_viewed(&mut busy, &t, Some(&kernel), &obj, "pro.o")
        .unwrap_err();
    assert!(
        matches!(&err, patcher::PatchError::Busy(m) if m.contains("points inside") && m.contains(&func)),
        "{err}"
    );
    assert!(busy.ram.0 == before, "a busy load wrote");
    drop(busy);
    assert!(g.ram.0 == before);

    let info = e
        .load_viewed(&mut g, &t, Some(&kernel), &obj, "pro.o")
        .unwrap();
    let f = &info.functions[0];
    assert_eq!(f.method, Method::Prologue);
    assert_eq!(f.site, pr.site);
    let tramp = f.tramp.unwrap();
    assert!(tramp >= info.code.va && tramp < info.code.va + info.code.len);
    assert_eq!(f.moved.len(), pr.moved.len());
    for (a, b) in f.moved.iter().zip(&pr.moved) {
        assert_eq!((a.addr, &a.bytes, &a.text), (b.addr, &b.bytes, &b.text));
    }
    // The site jumps to the new function; the rest of the moved bytes stay.
    let now = read(&g.ram, &t, pr.site, pr.moved_len);
    assert_eq!(
        now[..5],
        patcher::site::jmp_bytes(pr.site, f.new_addr).unwrap()
    );
    assert_eq!(now[5..], pr.original()[5..]);
    // The trampoline in guest memory relocates the original bytes faithfully.
    let mut at = pr.clone();
    at.tramp = read(&g.ram, &t, tramp, pr.tramp.len() as u64);
    at.tramp_va = tramp;
    for (m, o) in at.moved.iter_mut().zip(&f.moved) {
        m.new_addr = o.new_addr;
    }
    prologue_check::check_tramp(&pr.original(), &at, tramp, &func);
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["functions"][0]["method"], "prologue");
    assert!(json["functions"][0]["moved"][0]["text"].is_string());

    // Disable puts the original bytes back; enable writes the jmp again.
    e.disable(&mut g, &kernel, "pro", patcher::SwitchOptions::default())
        .unwrap();
    // (its pages stay: the patch is disabled, not unloaded)
    assert_eq!(read(&g.ram, &t, pr.site, pr.moved_len), pr.original());
    // Enabling writes the jmp over the moved bytes again: not while a vCPU is inside them.
    let rip = g.vcpus[0].rip;
    g.vcpus[0].rip = pr.site + pr.moved[0].bytes.len() as u64;
    let disabled = g.ram.0.clone();
    let err = e
        .enable(&mut g, &kernel, "pro", patcher::SwitchOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, patcher::PatchError::Busy(m) if m.contains("points inside") && m.contains(&func)),
        "{err}"
    );
    assert!(g.ram.0 == disabled, "a busy enable wrote");
    g.vcpus[0].rip = rip;
    e.enable(&mut g, &kernel, "pro", patcher::SwitchOptions::default())
        .unwrap();
    assert_eq!(
        read(&g.ram, &t, pr.site, 5),
        patcher::site::jmp_bytes(pr.site, f.new_addr).unwrap()
    );
    // A second patch stacks on the rewrite: same method and moved instructions.
    let obj2 = common::build_c(
        "prologue-top",
        &format!(
            "HVPATCH_NAME(\"top\");\nstatic int m(void) {{ return 1; }}\nHVPATCH_FUNC({func}, m);"
        ),
    );
    // Not under the consistency model: its old path would continue at site + 5.
    let err = e
        .load_consistent(&mut g, &t, &kernel, &obj2, "top.o", Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("only immediate patches can stack"), "{err}");
    let top = e
        .load_viewed(&mut g, &t, Some(&kernel), &obj2, "top.o")
        .unwrap();
    let f2 = &top.functions[0];
    assert_eq!(
        (f2.method, f2.site, f2.tramp),
        (Method::Prologue, pr.site, None)
    );
    assert_eq!(f2.moved, f.moved);
    assert_eq!(
        read(&g.ram, &t, pr.site, 5),
        patcher::site::jmp_bytes(pr.site, f2.new_addr).unwrap()
    );
    // HVPATCH_ORIG of a function stacked on another patch's rewrite: refused (that
    // trampoline belongs to the other patch).
    let orig = common::build_c(
        "prologue-orig",
        &format!(
            "HVPATCH_NAME(\"orig\");\nHVPATCH_ORIG(int, {func}, (void));\n\
             static int o(void) {{ return hvpatch_orig_{func}() + 1; }}\nHVPATCH_FUNC({func}, o);"
        ),
    );
    let err = e
        .load_viewed(&mut g, &t, Some(&kernel), &orig, "orig.o")
        .unwrap_err()
        .to_string();
    assert!(err.contains("HVPATCH_ORIG"), "{err}");
    e.unload(&mut g, "pro", &kernel, common::UNLOAD_WAIT)
        .unwrap();
    e.unload(&mut g, "top", &kernel, common::UNLOAD_WAIT)
        .unwrap();
    assert!(g.ram.0 == before, "{}: RAM differs after unload", s.version);
    // Alone, HVPATCH_ORIG calls this patch's trampoline (the original code).
    let info = e
        .load_viewed(&mut g, &t, Some(&kernel), &orig, "orig.o")
        .unwrap();
    let f = &info.functions[0];
    let tramp = f.tramp.unwrap();
    let code = read(&g.ram, &t, f.new_addr, f.new_size);
    let calls: Vec<u64> = prologue_check::decode(&code, f.new_addr)
        .iter()
        .map(|i| i.near_branch_target())
        .collect();
    assert!(calls.contains(&tramp), "{calls:x?} lacks {tramp:#x}");
    e.unload(&mut g, "orig", &kernel, common::UNLOAD_WAIT)
        .unwrap();
    assert!(g.ram.0 == before, "{}: RAM differs after unload", s.version);
}

#[test]
fn booted_6_1_prologue_load_unload() {
    prologue_load_unload(snap_6_1());
}

#[test]
fn booted_6_12_prologue_load_unload() {
    prologue_load_unload(snap_6_12());
}

/// A traced function (ftrace's `call ftrace_caller` planted at its site, as ftrace writes
/// it): the jmp goes after the call, which stays; unload restores the traced bytes.
#[test]
fn booted_after_ftrace_load_unload_on_both_guests() {
    for s in [snap_6_1(), snap_6_12()] {
        let t = target(s);
        let kernel = common::kernel(s);
        let func = "cmdline_proc_show";
        let a = s.syms.addresses(func)[0];
        let mut g = s.guest();
        let ram = SliceMemory::flat(&s.ram);
        let site = plan_entry(&ram, &t, a, TRAMP, &[]).unwrap().site;
        let mut call =
            patcher::site::jmp_bytes(site, s.syms.addresses("ftrace_caller")[0]).unwrap();
        call[0] = 0xe8;
        let pa = t.paging.translate(&g.ram, site).unwrap() as usize;
        g.ram.0[pa..pa + 5].copy_from_slice(&call);
        let traced = g.ram.0.clone();
        let mut e = patcher::Engine::new();
        let info = e
            .load_viewed(&mut g, &t, Some(&kernel), &patch_of(func), "pro.o")
            .unwrap();
        let f = &info.functions[0];
        assert_eq!(f.method, Method::AfterFtrace, "{}", s.version);
        assert_eq!(f.site, site + 5);
        assert_eq!(g.ram.0[pa..pa + 5], call, "ftrace's call untouched");
        assert_eq!(
            read(&g.ram, &t, site + 5, 5),
            patcher::site::jmp_bytes(site + 5, f.new_addr).unwrap()
        );
        // A second patch stacks on the after-ftrace rewrite, and goes again.
        let obj2 = common::build_c(
            "prologue2",
            &format!(
                "HVPATCH_NAME(\"pro2\");\nstatic int m(void) {{ return 1; }}\nHVPATCH_FUNC({func}, m);"
            ),
        );
        let info2 = e
            .load_viewed(&mut g, &t, Some(&kernel), &obj2, "pro2.o")
            .unwrap();
        assert_eq!(info2.functions[0].site, site + 5);
        assert_eq!(
            read(&g.ram, &t, site + 5, 5),
            patcher::site::jmp_bytes(site + 5, info2.functions[0].new_addr).unwrap()
        );
        e.unload(&mut g, "pro2", &kernel, common::UNLOAD_WAIT)
            .unwrap();
        e.unload(&mut g, "pro", &kernel, common::UNLOAD_WAIT)
            .unwrap();
        assert!(g.ram.0 == traced, "{}: RAM differs after unload", s.version);
    }
}

/// The guest's jump labels, static call sites and exception-table entries, read from guest
/// memory: real functions whose moved bytes hold one are refused, naming it.
#[test]
fn booted_guest_sites_in_moved_bytes_are_refused() {
    for s in [snap_6_1(), snap_6_12()] {
        let t = target(s);
        let ram = SliceMemory::flat(&s.ram);
        let sites = patcher::prologue_plan::GuestSites::read(&ram, &t).unwrap();
        assert!(sites.len() > 5000, "{}: {} entries", s.version, sites.len());
        let mut hits: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (name, a) in text_funcs(s) {
            let Ok(p) = plan_entry(&ram, &t, a, TRAMP, &[]) else {
                continue;
            };
            if p.prologue.is_none() {
                continue;
            }
            let forbidden = sites.within(a, a + 128);
            match plan_entry(&ram, &t, a, TRAMP, &forbidden) {
                Ok(_) => {}
                Err(EntryPlanError::Prologue {
                    source: patcher::prologue::PrologueError::Forbidden { what, .. },
                    ..
                }) => {
                    let kind = [
                        "jump label target",
                        "jump label",
                        "static call site",
                        "exception table entry",
                        "exception fixup target",
                    ]
                    .into_iter()
                    .find(|k| what.starts_with(k))
                    .unwrap();
                    hits.entry(kind)
                        .or_default()
                        .push(format!("{name}: {what}"));
                }
                Err(e) => panic!("{} {name}: {e}", s.version),
            }
        }
        eprintln!(
            "{}: {} table entries; refused: {:?}",
            s.version,
            sites.len(),
            hits.iter()
                .map(|(k, v)| (k, v.len(), &v[..v.len().min(3)]))
                .collect::<Vec<_>>()
        );
        assert!(
            hits.contains_key("exception table entry"),
            "{}: {hits:?}",
            s.version
        );
        assert!(hits.contains_key("jump label"), "{}: {hits:?}", s.version);
        // The engine refuses a load of such a function, naming the jump label.
        let func = hits["jump label"]
            .iter()
            .map(|h| h.split(':').next().unwrap())
            .find(|n| {
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && s.syms.addresses(n).len() == 1
            })
            .unwrap();
        let kernel = common::kernel(s);
        let mut g = s.guest();
        let err = patcher::Engine::new()
            .load_viewed(&mut g, &t, Some(&kernel), &patch_of(func), "pro.o")
            .unwrap_err()
            .to_string();
        eprintln!("{}: {err}", s.version);
        assert!(err.contains("jump label") && err.contains(func), "{err}");
        assert!(g.ram.0 == s.ram, "{}: a refused load wrote", s.version);
    }
}

/// The ftrace-site method trusts a NOP5 at the site to be ftrace's: on both booted guests no
/// such NOP5 is also a jump label, static call or exception-table entry.
#[test]
fn booted_ftrace_sites_are_never_other_guest_sites() {
    for s in [snap_6_1(), snap_6_12()] {
        let t = target(s);
        let ram = SliceMemory::flat(&s.ram);
        let sites = patcher::prologue_plan::GuestSites::read(&ram, &t).unwrap();
        let mut v = Vec::new();
        for (name, a) in text_funcs(s) {
            let Ok(p) = plan_entry(&ram, &t, a, TRAMP, &[]) else {
                continue;
            };
            if p.method == Method::FtraceSite && !sites.within(p.site, p.site + 5).is_empty() {
                v.push(format!("{name}: {:?}", sites.within(p.site, p.site + 5)));
            }
        }
        assert!(v.is_empty(), "{}: {v:?}", s.version);
    }
}
