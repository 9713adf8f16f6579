//! The kernel model on real guest snapshots (6.1 with 4-level paging, 6.12 with 5-level; KASLR
//! and PTI on), compared with the guest's own /proc/kallsyms, /proc/PID/stack, uname and ps.
//!
//! Snapshots: see `common/snapshot_dir.rs` (`cargo run --release -p hvpatch-tests --example snapshots`).
//! These are a stopgap until the harness-driven acceptance tests on booted guests; the checks
//! are in reusable functions (`kallsyms::compare_with_proc`, `check_*` below).

mod common;

use std::collections::HashMap;

use common::Dump;
use introspect::kallsyms::{self, TableOrder};
use introspect::slide::{CheckKind, CheckOutcome, START_KERNEL_MAP};
use introspect::{Kernel, KernelError, PhysMemory, SliceMemory, SlideError, SymbolError};

fn open(d: &Dump) -> Kernel {
    let mem = SliceMemory::flat(&d.ram);
    Kernel::open(&mem, &d.vcpus).unwrap_or_else(|e| panic!("{}: Kernel::open: {e}", d.version))
}

/// Parses /proc/kallsyms lines without a `[tag]` into (addr, type, name).
fn proc_core(text: &str) -> Vec<(u64, char, &str)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let kind = it.next()?.chars().next()?;
            let name = it.next()?;
            it.next().is_none().then_some((addr, kind, name))
        })
        .collect()
}

fn check_kallsyms(d: &Dump, k: &Kernel) {
    let cmp = kallsyms::compare_with_proc(k.symbols(), &d.kallsyms).unwrap_or_else(|e| {
        panic!(
            "{}: decoded kallsyms differ from /proc/kallsyms: {e}",
            d.version
        )
    });
    let lines = d.kallsyms.lines().count();
    eprintln!(
        "{}: {} core symbols match /proc/kallsyms line by line; {} more lines: {:?}",
        d.version,
        cmp.core,
        lines - cmp.core,
        cmp.extra
    );
    assert_eq!(cmp.core, k.symbols().len());
    assert_eq!(cmp.core, k.info().num_syms);
    assert_eq!(
        cmp.core + cmp.extra.iter().map(|e| e.1).sum::<usize>(),
        lines
    );
    let want = if d.version == "6.1" {
        TableOrder::Old
    } else {
        TableOrder::New
    };
    assert_eq!(k.info().kallsyms.order, want);
    assert!(k.info().kallsyms.seqs_of_names_pa.is_some());
}

fn check_slide(d: &Dump, k: &Kernel) {
    let mem = SliceMemory::flat(&d.ram);
    let info = k.info();
    let proc = proc_core(&d.kallsyms);
    let text = proc
        .iter()
        .find(|s| s.2 == "_text")
        .expect("_text in /proc/kallsyms")
        .0;
    assert_eq!(info.text, text, "runtime _text");
    assert_eq!(info.slide, text - 0xffff_ffff_8100_0000);
    assert_eq!(info.slide % 0x20_0000, 0);
    let r = &info.slide_report;
    for kind in [
        CheckKind::PhysLayout,
        CheckKind::IdtPageFault,
        CheckKind::IdtDivideError,
    ] {
        assert!(
            r.passed_check(kind),
            "{}: check {kind:?} did not pass: {r:?}",
            d.version
        );
    }
    // HMP does not give LSTAR: that check must say it was skipped, not pretend.
    assert!(r
        .checks
        .iter()
        .any(|c| c.kind == CheckKind::Lstar && matches!(c.outcome, CheckOutcome::Skipped(_))));
    assert_eq!(
        info.text_pa,
        info.phys_base.wrapping_add(text - START_KERNEL_MAP)
    );
    assert_eq!(info.text_pa % 0x20_0000, 0);

    // LSTAR given (as our KVM host does): right value passes, wrong value is an error naming both.
    let syscall = k.lookup("entry_SYSCALL_64", None).unwrap();
    let mut vcpus = d.vcpus.clone();
    for v in &mut vcpus {
        v.lstar = Some(syscall);
    }
    let k2 = Kernel::open(&mem, &vcpus).expect("open with LSTAR");
    assert!(k2.info().slide_report.passed_check(CheckKind::Lstar));
    vcpus[0].lstar = Some(syscall + 0x20_0000);
    match Kernel::open(&mem, &vcpus) {
        Err(KernelError::Slide(SlideError::Disagree {
            expected, found, ..
        })) => {
            assert_eq!((expected, found), (syscall, syscall + 0x20_0000));
        }
        other => panic!("wrong LSTAR accepted: {other:?}"),
    }
    // vCPUs caught in user mode under PTI hold the user PGD (bit 12) and a user PCID (bit 11
    // + ASID): the kernel root is still found. A vCPU with a garbage CR3 is skipped.
    let mut vcpus = d.vcpus.clone();
    vcpus[0].cr3 |= 0x1000 | 0x800 | 0x3;
    let garbage = introspect::VcpuRegs {
        cr3: 0x7ff_f000,
        ..d.vcpus[0]
    };
    vcpus.insert(0, garbage);
    let k4 = Kernel::open(&mem, &vcpus).expect("open with user CR3 + garbage CR3");
    assert_eq!(k4.info().text, info.text);
    assert_eq!(k4.page_root(), k.page_root());
    // Without IDTR, the fixed cpu_entry_area IDT alias is used.
    let mut vcpus = d.vcpus.clone();
    for v in &mut vcpus {
        v.idtr_base = None;
    }
    let k3 = Kernel::open(&mem, &vcpus).expect("open without IDTR");
    assert!(k3.info().slide_report.passed_check(CheckKind::IdtPageFault));
}

fn check_release(d: &Dump, k: &Kernel) {
    let release = d
        .uname
        .split_whitespace()
        .nth(2)
        .expect("uname -a has a release");
    assert_eq!(k.info().release.as_deref(), Some(release));
    assert!(k
        .info()
        .banner
        .as_deref()
        .unwrap_or("")
        .starts_with("Linux version "));
    let v = serde_json::to_value(k.info()).expect("KernelInfo serializes");
    assert_eq!(v["release"], release);
}

/// Offsets from KERNEL-FACTS §5.1, used in tests only (product code gets them from BTF).
struct TaskOffsets {
    tasks: u64,
    pid: u64,
    comm: u64,
}

fn task_offsets(version: &str) -> TaskOffsets {
    match version {
        "6.1" => TaskOffsets {
            tasks: 0x890,
            pid: 0x970,
            comm: 0xba0,
        },
        _ => TaskOffsets {
            tasks: 0x8b0,
            pid: 0x980,
            comm: 0xba0,
        },
    }
}

fn check_paging(d: &Dump, k: &Kernel) {
    let mem = SliceMemory::flat(&d.ram);
    let root = k.page_root();
    let levels = if d.version == "6.1" { 4 } else { 5 };
    // The root is swapper_pg_dir (init_top_pgt), not whichever process PGD a vCPU had.
    let swapper = k.lookup("init_top_pgt", None).unwrap();
    assert_eq!(Some(root.pgd_pa), k.image_pa(swapper));
    assert_eq!(k.info().pgd_pa, root.pgd_pa);
    // Both vCPU roots translate the kernel half the same way.
    for v in &d.vcpus {
        let r = introspect::PageRoot::from_regs(v);
        assert_eq!(
            introspect::paging::translate(&mem, r, k.text()),
            Ok(k.info().text_pa)
        );
    }
    k.refresh(&mem).expect("fresh model");
    let mut moved = d.ram.clone();
    let rb = k.info().kallsyms.relative_base_pa as usize;
    moved[rb..rb + 8].copy_from_slice(&(k.text() + 0x20_0000).to_le_bytes());
    assert!(matches!(
        k.refresh(&SliceMemory::flat(&moved)),
        Err(KernelError::Stale { .. })
    ));
    drop(moved);
    assert_eq!(root.levels, levels);
    assert_eq!(k.info().paging_levels, levels);
    // These snapshots booted without PTI (the user half of the PGD pair is empty). Cross-check
    // independently: under PTI the kernel text is not mapped global.
    let text_leaf = k.walk(&mem, k.text()).unwrap().leaf().unwrap().value;
    assert_eq!(
        k.info().pti,
        text_leaf & introspect::paging::PTE_GLOBAL == 0
    );
    if d.cmdline.split_whitespace().any(|a| a == "pti=on") {
        assert!(k.info().pti, "booted with pti=on");
    }

    // Kernel image: _text is a 2 MiB executable page at text_pa; the linear formula agrees.
    let text = k.text();
    let w = k.walk(&mem, text).unwrap();
    assert_eq!(w.pa, k.info().text_pa);
    assert_eq!(w.entries.len() as u8, levels - 1);
    assert_eq!(w.page_size, 0x20_0000);
    assert!(!w.nx && !w.user);
    for name in [
        "init_task",
        "linux_banner",
        "_etext",
        "idt_table",
        "page_offset_base",
    ] {
        let va = k.lookup(name, None).unwrap();
        assert_eq!(
            Some(k.translate(&mem, va).unwrap()),
            k.image_pa(va),
            "{name}"
        );
    }
    let init_task = k.lookup("init_task", None).unwrap();
    let w = k.walk(&mem, init_task).unwrap();
    assert!(w.writable && w.nx, "kernel data is RW+NX");

    // Direct map: GS base of each vCPU (per-cpu area) translates, and equals
    // page_offset_base + pa; *(base + this_cpu_off) == base.
    let pob = k
        .read_u64_virt(&mem, k.lookup("page_offset_base", None).unwrap())
        .unwrap();
    let this_cpu_off = k.lookup("this_cpu_off", None).unwrap();
    // (GS.base is the kernel per-CPU base only at CPL0; HMP does not show KERNEL_GS_BASE.)
    for v in d.vcpus.iter().filter(|v| v.cpl() == 0) {
        let gs = v.gs_base;
        let pa = k.translate(&mem, gs).unwrap();
        assert_eq!(gs - pob, pa, "direct map: gs {gs:#x}");
        assert_eq!(k.read_u64_virt(&mem, gs + this_cpu_off).unwrap(), gs);
    }

    // vmalloc: the kernel stack of PID 1 (init_task.tasks.next), VMAP_STACK.
    let off = task_offsets(d.version);
    let comm = |t: u64| k.read_cstr(&mem, t + off.comm, 16).unwrap_or_default();
    assert_eq!(
        comm(init_task),
        "swapper/0",
        "init_task.comm (test offsets from KERNEL-FACTS)"
    );
    let next = k.read_u64_virt(&mem, init_task + off.tasks).unwrap();
    let task1 = next - off.tasks;
    assert_eq!(
        k.read_u32_virt(&mem, task1 + off.pid).unwrap(),
        1,
        "pid of the first task"
    );
    let ps1 =
        d.ps.lines()
            .find(|l| l.split_whitespace().next() == Some("1"))
            .expect("PID 1 in ps");
    assert_eq!(Some(comm(task1).as_str()), ps1.split_whitespace().nth(1));
    let stack = k.read_u64_virt(&mem, task1 + 0x20).unwrap();
    let vmalloc_base = k
        .read_u64_virt(&mem, k.lookup("vmalloc_base", None).unwrap())
        .unwrap();
    assert!(
        stack >= vmalloc_base && stack - vmalloc_base < 1 << 45,
        "stack {stack:#x} in vmalloc"
    );
    let w = k.walk(&mem, stack).unwrap();
    assert_eq!(w.page_size, 0x1000);
    assert!(w.writable && w.nx);
    // STACK_END_MAGIC at the lowest stack address (set_task_stack_end_magic).
    assert_eq!(k.read_u32_virt(&mem, stack).unwrap(), 0x57ac_6e9d);
    // The 4 pages of a 16 KiB vmap stack are not physically contiguous in general; reading
    // across them must go page by page.
    let mut buf = vec![0u8; 0x4000];
    k.read_virt(&mem, stack, &mut buf).unwrap();
    for page in 0..4u64 {
        let pa = k.translate(&mem, stack + page * 0x1000).unwrap();
        let mut p = vec![0u8; 0x1000];
        mem.read_phys(pa, &mut p).unwrap();
        assert_eq!(&buf[page as usize * 0x1000..][..0x1000], &p[..]);
    }
    // Unmapped addresses give typed errors.
    assert!(k.translate(&mem, 0x1000).is_err());
    assert!(k.translate(&mem, 0x0000_8000_0000_0000).is_err());
}

/// Every frame of every /proc/PID/stack ("name+0xoff/0xsize") must symbolize back to exactly
/// that text from the address `symbol + off` (for one of the symbols with that name).
fn check_symbolize(d: &Dump, k: &Kernel) {
    let mut frames = 0;
    for line in d.stacks.lines().filter(|l| l.starts_with("[<")) {
        let text = line.split("] ").nth(1).expect("frame text");
        let (name, rest) = text.rsplit_once('+').expect("name+off");
        let (off, size) = rest.split_once('/').expect("off/size");
        let off = u64::from_str_radix(off.trim_start_matches("0x"), 16).unwrap();
        let size = u64::from_str_radix(size.trim_start_matches("0x"), 16).unwrap();
        let ok = k.symbols().lookup_all(name).any(|s| {
            k.symbolize(s.addr + off)
                .is_some_and(|r| r.name == name && r.offset == off && r.size == size)
        });
        assert!(ok, "{}: frame {text:?} does not symbolize back", d.version);
        frames += 1;
    }
    assert!(
        frames > 50,
        "{}: only {frames} frames in stacks.txt",
        d.version
    );
    // Nothing inside a function symbolizes to its __pfx_ padding symbol.
    if d.version.starts_with("6.12") {
        let f = k.lookup("cmdline_proc_show", None).unwrap();
        assert_eq!(k.symbolize(f).unwrap().name, "cmdline_proc_show");
        assert_eq!(k.symbolize(f - 1).unwrap().name, "__pfx_cmdline_proc_show");
        assert_eq!(k.symbolize(f - 1).unwrap().size, 16);
    }
    assert!(k.symbolize(0x1000).is_none());
}

/// Every name of /proc/kallsyms resolves with klp sympos semantics.
fn check_lookup(d: &Dump, k: &Kernel) {
    let mut by_name: HashMap<&str, Vec<u64>> = HashMap::new();
    for (addr, _, name) in proc_core(&d.kallsyms) {
        by_name.entry(name).or_default().push(addr);
    }
    let mut dups = 0;
    for (name, addrs) in &by_name {
        if addrs.len() == 1 {
            assert_eq!(k.lookup(name, None), Ok(addrs[0]), "{name}");
            assert_eq!(k.lookup(name, Some(0)), Ok(addrs[0]), "{name}");
            assert_eq!(k.lookup(name, Some(1)), Ok(addrs[0]), "{name}");
        } else {
            dups += 1;
            let count = addrs.len() as u32;
            assert_eq!(
                k.lookup(name, None),
                Err(SymbolError::Ambiguous {
                    name: name.to_string(),
                    count,
                    addrs: addrs.clone()
                })
            );
            for (i, a) in addrs.iter().enumerate() {
                assert_eq!(
                    k.lookup(name, Some(i as u32 + 1)),
                    Ok(*a),
                    "{name} sympos {}",
                    i + 1
                );
            }
            assert_eq!(
                k.lookup(name, Some(count + 1)),
                Err(SymbolError::NoSuchPos {
                    name: name.to_string(),
                    sympos: u64::from(count) + 1,
                    count
                })
            );
        }
    }
    assert!(
        dups > 100,
        "{}: expected many duplicate static names, saw {dups}",
        d.version
    );
    assert!(matches!(
        k.lookup("no_such_symbol_hvpatch", None),
        Err(SymbolError::Unknown { .. })
    ));
}

fn check_all(d: &Dump) {
    let k = open(d);
    check_kallsyms(d, &k);
    check_slide(d, &k);
    check_release(d, &k);
    check_paging(d, &k);
    check_symbolize(d, &k);
    check_lookup(d, &k);
}

#[test]
fn kernel_6_1() {
    check_all(common::dump_6_1());
}

#[test]
fn kernel_6_12() {
    check_all(common::dump_6_12());
}

/// PTI on, one vCPU in user mode holding the user PGD (CR3 bit 12): the kernel root is still
/// found, PTI is detected, and every check above holds.
#[test]
fn kernel_6_12_pti() {
    let d = common::dump_6_12_pti();
    assert!(
        d.vcpus.iter().any(|v| v.cpl() == 3 && v.cr3 & 0x1000 != 0),
        "the snapshot should catch a vCPU in user mode on the PTI user PGD"
    );
    check_all(d);
    assert!(open(d).info().pti);
}

/// A copy of the kallsyms tables planted elsewhere in RAM (as a user process could) with a
/// different relative_base is found by the full scan but rejected by the slide checks.
#[test]
fn planted_fake_kallsyms_is_rejected() {
    let d = common::dump_6_12();
    let k = open(d);
    let l = &k.info().kallsyms;
    let start = l.num_syms_pa as usize;
    let end = (l.seqs_of_names_pa.unwrap() + 3 * u64::from(l.num_syms)) as usize;
    let mut ram = d.ram.clone();
    // Plant at a 2 MiB-aligned low address far from the kernel, with _text moved by 64 MiB.
    let fake_base = 0x0100_0000usize;
    assert!(fake_base + (end - start) < k.info().text_pa as usize || fake_base > end);
    ram.copy_within(start..end, fake_base);
    let rb_off = (l.relative_base_pa as usize - start) + fake_base;
    let fake_text = l.relative_base + (64 << 20);
    ram[rb_off..rb_off + 8].copy_from_slice(&fake_text.to_le_bytes());
    let mem = SliceMemory::flat(&ram);
    let cands = kallsyms::scan_token_tables(&mem);
    let fake_tt = l.token_table_pa - start as u64 + fake_base as u64;
    assert_eq!(cands, vec![fake_tt, l.token_table_pa]);
    let fake = kallsyms::decode_at(&mem, fake_tt).expect("the fake decodes");
    assert_eq!(fake.layout.relative_base, fake_text);
    let err =
        introspect::slide::compute(&mem, k.page_root(), &fake.layout, &fake.symbols, &d.vcpus)
            .expect_err("fake table must fail the slide checks");
    eprintln!("fake rejected: {err}");
    let k2 = Kernel::open(&mem, &d.vcpus).unwrap();
    assert_eq!(k2.info().text, l.relative_base);
}

/// HMP parser sanity (the helper feeds every other test).
#[test]
fn hmp_registers_parse() {
    for d in [common::dump_6_1(), common::dump_6_12()] {
        assert_eq!(d.vcpus.len(), 2);
        for v in &d.vcpus {
            assert_ne!(v.cr3, 0);
            if v.cpl() == 0 {
                assert!(v.gs_base >= 0xff00_0000_0000_0000, "{:#x}", v.gs_base);
            }
            assert_eq!(v.idtr_base, Some(0xffff_fe00_0000_0000));
            assert!(v.efer & (1 << 10) != 0);
            assert_eq!(v.la57(), d.version == "6.12");
        }
    }
}
