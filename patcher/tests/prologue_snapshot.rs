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
/// becomes after-ftrace, the call stays, the instructions after it move. A `call` elsewhere
/// moves with the prologue; an `int3` (kprobe) is refused.
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

        let other = s.syms.addresses("seq_printf")[0];
        let calls = Overlay {
            ram: &ram,
            pa: site_pa,
            bytes: call_to(other),
        };
        let p = plan_entry(&calls, &t, func, TRAMP, &[]).unwrap();
        assert_eq!(p.method, Method::Prologue, "{}", s.version);
        let pr = p.prologue.as_ref().unwrap();
        assert_eq!(pr.site, site);
        assert!(pr.moved[0].text.starts_with("call"), "{:?}", pr.moved);
        check(
            &calls,
            &t,
            &p,
            &format!("{} call at cmdline_proc_show", s.version),
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
