//! Engine scenarios on a guest memory snapshot (shared by patcher/tests/engine_snapshot.rs on
//! saved dumps and tests/tests/patch_snapshot.rs on snapshots taken from live guests).

#![allow(dead_code)]

use super::{build_c, cmdline_patch, show_patch, SnapGuest, Snapshot};
use patcher::engine::guest_release;
use patcher::site::{ENDBR64, ENDBR_SEALED, NOP5};
use patcher::{Engine, KernelPaging, PatchError, SymbolSource, Target};

fn target<'a>(s: &'a Snapshot) -> Target<'a> {
    Target {
        symbols: &s.syms,
        paging: KernelPaging::from_regs(&s.vcpus[0]),
    }
}

fn addr(s: &Snapshot, name: &str) -> u64 {
    s.syms.addresses(name)[0]
}

fn read_virt(g: &SnapGuest, p: &KernelPaging, va: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    p.read_virt(&g.ram, va, &mut b).unwrap();
    b
}

/// The patch site of `func` and the bytes there.
fn site(s: &Snapshot, g: &SnapGuest, func: &str) -> (u64, [u8; 5]) {
    let p = KernelPaging::from_regs(&s.vcpus[0]);
    let a = addr(s, func);
    let head = read_virt(g, &p, a, 4);
    let site = if head == ENDBR64 || head == ENDBR_SEALED {
        a + 4
    } else {
        a
    };
    let b = read_virt(g, &p, site, 5);
    (site, b.try_into().unwrap())
}

fn jmp_target(site: u64, b: &[u8; 5]) -> u64 {
    assert_eq!(b[0], 0xe9, "not a jmp: {b:02x?}");
    site.wrapping_add(5)
        .wrapping_add(i32::from_le_bytes(b[1..5].try_into().unwrap()) as i64 as u64)
}

fn assert_ram_eq(g: &SnapGuest, orig: &[u8]) {
    if g.ram.0 != orig {
        let first = g.ram.0.iter().zip(orig).position(|(a, b)| a != b).unwrap();
        panic!("guest RAM differs from the original, first at {first:#x}");
    }
}

/// Load, check, unload: all RAM is back; state round trip; fresh slot on reload.
pub fn load_unload_roundtrip(s: &Snapshot) {
    let t = target(s);
    let mut g = s.guest();
    let (site0, before) = site(s, &g, "cmdline_proc_show");
    assert_eq!(before, NOP5, "{}: cmdline_proc_show site", s.version);
    let mut e = Engine::new();
    let info = e.load(&mut g, &t, &cmdline_patch(), "cmdline.o").unwrap();
    assert_eq!(info.name, "cmdline-fix");
    assert_eq!(info.functions.len(), 1);
    let f = &info.functions[0];
    assert_eq!(f.old_addr, addr(s, "cmdline_proc_show"));
    assert_eq!(f.site, site0);
    assert!(f.active);
    // The entry jumps to the new function, mapped in the kernel page tables.
    let (_, now) = site(s, &g, "cmdline_proc_show");
    assert_eq!(jmp_target(site0, &now), f.new_addr);
    let p = t.paging;
    assert_eq!(
        read_virt(&g, &p, f.new_addr, 4),
        ENDBR64,
        "new function starts with endbr64"
    );
    // Within ±2 GiB of kernel text, after _end or below _text.
    assert!(f.new_addr >= 0xffff_ffff_8000_0000 && f.new_addr < 0xffff_ffff_c000_0000);
    // Never over the freed `.init.scratch` after `_end` (stale pointers to it linger).
    let (sb, se) = (
        addr(s, "__init_scratch_begin"),
        addr(s, "__init_scratch_end"),
    );
    let slot = e.arena().unwrap().mapping.unwrap().va;
    assert!(
        slot >= se || slot + 0x20_0000 <= sb,
        "{}: arena slot {slot:#x} over .init.scratch {sb:#x}..{se:#x}",
        s.version
    );
    // Its string is readable through the data mapping.
    let data = read_virt(&g, &p, info.data.va, info.data.len as usize);
    assert!(data.windows(26).any(|w| w == b"this has been live patched"));
    // The arena pages are where the info says, PG_reserved low memory on QEMU attach.
    let arena = e.arena().unwrap();
    assert!(info
        .code
        .pages
        .iter()
        .all(|&pa| (0x10000..0x90000).contains(&pa)));
    match &arena.source {
        patcher::arena::ArenaSource::LowMemory {
            pg_reserved_bit, ..
        } => {
            let want = if s.version == "6.1" { 12 } else { 13 };
            assert_eq!(*pg_reserved_bit, want, "PG_reserved for {}", s.version);
        }
        other => panic!("unexpected arena source {other:?}"),
    }
    assert!(e.check(&g).is_empty(), "{:?}", e.check(&g));
    // Someone overwrites our jmp: check names the function.
    let spa = t.paging.translate(&g.ram, site0).unwrap() as usize;
    let ours: [u8; 5] = g.ram.0[spa..spa + 5].try_into().unwrap();
    g.ram.0[spa..spa + 5].copy_from_slice(&NOP5);
    let problems = e.check(&g);
    assert!(
        problems.len() == 1 && problems[0].contains("cmdline_proc_show"),
        "{problems:?}"
    );
    g.ram.0[spa..spa + 5].copy_from_slice(&ours);
    let json = serde_json::to_string(&e.list()).unwrap();
    assert!(json.contains("cmdline_proc_show") && json.contains("cmdline-fix"));
    assert_eq!(e.info("cmdline-fix").unwrap(), info);
    // Unload: every byte of RAM is back.
    e.unload(&mut g, "cmdline-fix", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap();
    assert!(e.list().is_empty());
    assert_ram_eq(&g, &s.ram);
    // A second load maps the same slot again with the same layout (every VA translates to the
    // same page with the same permissions as before, so no stale TLB entry disagrees) and
    // works again; the state survives a round trip through JSON (another host process
    // continues).
    let info2 = e.load(&mut g, &t, &cmdline_patch(), "cmdline.o").unwrap();
    assert_eq!(
        (
            info2.code.va,
            &info2.code.pages,
            info2.data.va,
            &info2.data.pages
        ),
        (
            info.code.va,
            &info.code.pages,
            info.data.va,
            &info.data.pages
        )
    );
    let mut e2 = Engine::from_state(&e.state()).unwrap();
    assert_eq!(e2.list(), e.list());
    e2.unload(&mut g, "cmdline-fix", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap();
    assert_ram_eq(&g, &s.ram);
    // The stale original engine refuses instead of corrupting (our jmp is gone).
    let err = e
        .unload(&mut g, "cmdline-fix", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap_err();
    assert!(err.to_string().contains("verification failed"), "{err}");
    assert_ram_eq(&g, &s.ram);
}

/// klp func stacks, both unload orders.
pub fn stacking(s: &Snapshot) {
    let t = target(s);
    let mut g = s.guest();
    let a = show_patch("stack-a", "cmdline_proc_show", "A");
    let b = build_c(
        "stack-b",
        "HVPATCH_NAME(\"stack-b\");\n\
         static int b1(struct seq_file *m, void *v) { seq_printf(m, \"B\\n\"); return 0; }\n\
         static int b2(struct seq_file *m, void *v) { seq_printf(m, \"B2\\n\"); return 0; }\n\
         HVPATCH_FUNC(cmdline_proc_show, b1);\nHVPATCH_FUNC(version_proc_show, b2);\n",
    );
    for order in [["stack-b", "stack-a"], ["stack-a", "stack-b"]] {
        let mut e = Engine::new();
        let ia = e.load(&mut g, &t, &a, "a.o").unwrap();
        let ib = e.load(&mut g, &t, &b, "b.o").unwrap();
        let (cs, _) = site(s, &g, "cmdline_proc_show");
        let (vs, _) = site(s, &g, "version_proc_show");
        let cur = |g: &SnapGuest, f: &str| {
            let (st, b) = site(s, g, f);
            if b == NOP5 {
                None
            } else {
                Some(jmp_target(st, &b))
            }
        };
        let b_new = |f: &str| {
            ib.functions
                .iter()
                .find(|x| x.old_name == f)
                .unwrap()
                .new_addr
        };
        assert_eq!(
            cur(&g, "cmdline_proc_show"),
            Some(b_new("cmdline_proc_show")),
            "newest wins"
        );
        assert_eq!(
            cur(&g, "version_proc_show"),
            Some(b_new("version_proc_show"))
        );
        assert!(!e.info("stack-a").unwrap().functions[0].active);
        let _ = (cs, vs);
        e.unload(&mut g, order[0], &super::kernel(s), super::UNLOAD_WAIT)
            .unwrap();
        if order[0] == "stack-b" {
            assert_eq!(
                cur(&g, "cmdline_proc_show"),
                Some(ia.functions[0].new_addr),
                "back to A"
            );
            assert_eq!(cur(&g, "version_proc_show"), None);
            assert!(e.info("stack-a").unwrap().functions[0].active);
        } else {
            assert_eq!(
                cur(&g, "cmdline_proc_show"),
                Some(b_new("cmdline_proc_show")),
                "B stays"
            );
        }
        e.unload(&mut g, order[1], &super::kernel(s), super::UNLOAD_WAIT)
            .unwrap();
        assert_eq!(cur(&g, "cmdline_proc_show"), None);
        assert_ram_eq(&g, &s.ram);
    }
}

/// Each bad load leaves RAM unchanged and says why.
pub fn bad_loads(s: &Snapshot) {
    let t = target(s);
    let mut g = s.guest();
    let mut e = Engine::new();
    let err = e.load(&mut g, &t, b"not an elf", "junk.o").unwrap_err();
    assert!(err.to_string().contains("not an ELF"), "{err}");
    let err = e
        .load(
            &mut g,
            &t,
            &build_c(
                "unknown",
                "extern int no_such_fn_xyz(void);\n\
              static int n(struct seq_file *m, void *v) { return no_such_fn_xyz(); }\n\
              HVPATCH_FUNC(cmdline_proc_show, n);",
            ),
            "unknown.o",
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("no_such_fn_xyz") && err.to_string().contains("unknown symbol"),
        "{err}"
    );
    // A duplicated static function name in this guest's kallsyms.
    let dup = s
        .syms
        .duplicated_names()
        .map(|(n, _)| n)
        .find(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !n.starts_with("__"))
        .unwrap();
    let src = format!(
        "extern int {dup}(void);\nstatic int n(struct seq_file *m, void *v) {{ return {dup}(); }}\n\
         HVPATCH_FUNC(cmdline_proc_show, n);"
    );
    let err = e
        .load(&mut g, &t, &build_c("ambig", &src), "ambig.o")
        .unwrap_err();
    assert!(
        err.to_string().contains("ambiguous") && err.to_string().contains(dup),
        "{err}"
    );
    // With HVPATCH_SYMPOS it links.
    let ok = build_c("ambig-pos", &format!("{src}\nHVPATCH_SYMPOS({dup}, 2);"));
    e.load(&mut g, &t, &ok, "ambig-pos.o").unwrap();
    e.unload(&mut g, "ambig-pos", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap();
    assert_ram_eq(&g, &s.ram);
    // Another kernel.
    let other = build_c("other-kernel", "HVPATCH_KERNEL(\"5.10.0-99-amd64\");\n\
        static int n(struct seq_file *m, void *v) { return 0; }\nHVPATCH_FUNC(cmdline_proc_show, n);");
    let err = e.load(&mut g, &t, &other, "other.o").unwrap_err();
    assert!(matches!(err, PatchError::KernelMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&s.release), "{err}");
    assert_eq!(guest_release(&g.ram, &t).unwrap(), s.release);
    // Same release is accepted.
    let same = build_c("same-kernel", &format!("HVPATCH_KERNEL(\"{}\");\n\
        static int n(struct seq_file *m, void *v) {{ return 0; }}\nHVPATCH_FUNC(cmdline_proc_show, n);", s.release));
    e.load(&mut g, &t, &same, "same.o").unwrap();
    assert!(e.info("same").is_some(), "default name = file name");
    e.unload(&mut g, "same", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap();
    assert_ram_eq(&g, &s.ram);
    // A site owned by ftrace: call ftrace_caller at the site (what `echo function >
    // current_tracer` writes).
    let (st, _) = site(s, &g, "cmdline_proc_show");
    let fc = addr(s, "ftrace_caller");
    let rel = (fc.wrapping_sub(st + 5) as i64) as i32;
    let mut call = vec![0xe8];
    call.extend_from_slice(&rel.to_le_bytes());
    let spa = t.paging.translate(&g.ram, st).unwrap() as usize;
    g.ram.0[spa..spa + 5].copy_from_slice(&call);
    let traced = g.ram.0.clone();
    let err = e
        .load(&mut g, &t, &cmdline_patch(), "cmdline.o")
        .unwrap_err();
    assert!(
        err.to_string().contains("ftrace") && err.to_string().contains("ftrace_caller"),
        "{err}"
    );
    assert_ram_eq(&g, &traced);
    g.ram.0[spa..spa + 5].copy_from_slice(&[0xcc, 0x1f, 0x44, 0, 0]);
    let err = e
        .load(&mut g, &t, &cmdline_patch(), "cmdline.o")
        .unwrap_err();
    assert!(err.to_string().contains("kprobe"), "{err}");
    g.ram.0[spa..spa + 5].copy_from_slice(&NOP5);
    assert_ram_eq(&g, &s.ram);
    // A function without an ftrace NOP site (notrace asm entry).
    let err = e
        .load(
            &mut g,
            &t,
            &show_patch("asm", "entry_SYSCALL_64", "x"),
            "asm.o",
        )
        .unwrap_err();
    assert!(err.to_string().contains("unexpected bytes"), "{err}");
    assert_ram_eq(&g, &s.ram);
    assert!(e.list().is_empty());
}

/// A write failing in the middle of the pause window is rolled back.
pub fn failed_write_rollback(s: &Snapshot) {
    let t = target(s);
    for k in 0..5 {
        let mut g = s.guest();
        g.fail_write_at = Some(k);
        let mut e = Engine::new();
        let err = e
            .load(&mut g, &t, &cmdline_patch(), "cmdline.o")
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert_ram_eq(&g, &s.ram);
        assert!(!g.is_paused_for_test(), "resumed after failure");
        // The engine state is unchanged: a clean load still works.
        let batches = g.batches;
        e.load(&mut g, &t, &cmdline_patch(), "cmdline.o").unwrap();
        assert!(g.batches > batches, "load writes through write_phys_batch");
        e.unload(&mut g, "cmdline-fix", &super::kernel(s), super::UNLOAD_WAIT)
            .unwrap();
        assert_ram_eq(&g, &s.ram);
    }
}

/// The same engine with symbols and paging from introspect (no kallsyms text).
pub fn with_introspect(s: &Snapshot, pg_reserved: u32) {
    let mem = super::Ram(s.ram.clone());
    let k = introspect::Kernel::open(&mem, &s.vcpus).unwrap();
    let ks = patcher::kernel::KernelSymbols::new(&k, &mem);
    let t = Target {
        symbols: &ks,
        paging: ks.paging(true),
    };
    let mut g = s.guest();
    let mut e = Engine::new();
    let info = e.load(&mut g, &t, &cmdline_patch(), "cmdline.o").unwrap();
    assert_eq!(info.functions[0].old_addr, addr(s, "cmdline_proc_show"));
    // PG_reserved now comes from the guest's BTF and matches the derived value.
    match e.arena().unwrap().source {
        patcher::arena::ArenaSource::LowMemory {
            pg_reserved_bit,
            pg_reserved_from,
            struct_page_size,
            ..
        } => {
            assert_eq!(
                (pg_reserved_bit, pg_reserved_from.as_str(), struct_page_size),
                (pg_reserved, "btf", 64)
            );
        }
        other => panic!("{other:?}"),
    }
    e.unload(&mut g, "cmdline-fix", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap();
    assert_ram_eq(&g, &s.ram);
    let _ = introspect::PhysMemory::regions(&mem);
}

/// 6.12: a function whose ENDBR was sealed (`66 0f 1f 00`) is patched at fn+4, like a kept one.
pub fn sealed_endbr_site(s: &Snapshot) {
    let t = target(s);
    let mut g = s.guest();
    let p = t.paging;
    let sealed = s
        .kallsyms
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, ty, n) = (f.next()?, f.next()?, f.next()?);
            (ty == "t"
                && f.next().is_none()
                && s.syms.addresses(n).len() == 1
                && !n.starts_with("__pfx_"))
            .then(|| (u64::from_str_radix(a, 16).ok(), n.to_string()))
        })
        .filter_map(|(a, n)| Some((a?, n)))
        .take(20000)
        .find(|&(a, _)| {
            let mut b = [0u8; 9];
            p.read_virt(&g.ram, a, &mut b).is_ok() && b[..4] == ENDBR_SEALED && b[4..] == NOP5
        })
        .expect("a sealed-ENDBR traceable function");
    let obj = build_c(
        "sealed",
        &format!(
            "static int n(void) {{ return 0; }}\nHVPATCH_FUNC({}, n);",
            sealed.1
        ),
    );
    let mut e = Engine::new();
    let info = e.load(&mut g, &t, &obj, "sealed.o").unwrap();
    assert_eq!(info.functions[0].site, sealed.0 + 4, "{}", sealed.1);
    assert_eq!(
        read_virt(&g, &p, sealed.0, 4),
        ENDBR_SEALED,
        "ENDBR poison untouched"
    );
    assert_eq!(read_virt(&g, &p, sealed.0 + 4, 1), [0xe9]);
    e.unload(&mut g, "sealed", &super::kernel(s), super::UNLOAD_WAIT)
        .unwrap();
    assert_ram_eq(&g, &s.ram);
}
