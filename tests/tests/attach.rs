//! QEMU attach backend (`vmm::attach::QemuAttach`) on booted 6.1 and 6.12 guests: pause and
//! registers, pause/resume while the guest works, physical writes seen by the guest, hardware
//! breakpoints reported with vCPU and RIP, wait timeouts, batched writes, single-stepping one
//! vCPU, and QEMU vanishing underneath.

use std::time::{Duration, Instant};

use harness::{Guest, GuestSpec, KernelSeries};
use introspect::PhysMemory;
use patcher::{GuestControl, GuestError, GuestEvent};
use vmm::attach::QemuAttach;

/// Address of `name` from the guest's own /proc/kallsyms.
fn ksym(g: &mut Guest, name: &str) -> u64 {
    let out = g
        .run(&format!(
            "awk '$3 == \"{name}\" {{ print $1; exit }}' /proc/kallsyms"
        ))
        .unwrap();
    let addr = out
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("{name} not in kallsyms"));
    u64::from_str_radix(addr, 16).unwrap()
}

fn check_regs(series: KernelSeries, g: &mut Guest, a: &mut QemuAttach) {
    let stext = ksym(g, "_stext");
    let etext = ksym(g, "_etext");
    a.pause().unwrap();
    assert!(a.is_paused());
    assert_eq!(a.vcpu_count(), 2);
    for vcpu in 0..2 {
        let r = a.regs(vcpu).unwrap();
        eprintln!(
            "{series:?} vCPU{vcpu}: rip {:#x} cs {:#x} cr3 {:#x} cr4 {:#x}",
            r.rip, r.cs, r.cr3, r.cr4
        );
        assert_eq!(r.la57(), series.la57(), "CR4.LA57 on vCPU{vcpu}");
        assert_ne!(r.cr3 & !0xfff, 0, "CR3");
        assert_ne!(r.cr0 & (1 << 31), 0, "CR0.PG");
        assert_ne!(r.efer & (1 << 10), 0, "EFER.LMA");
        match r.cpl() {
            0 => {
                assert!(
                    (stext..etext).contains(&r.rip),
                    "kernel RIP {:#x} outside text",
                    r.rip
                );
                assert!(
                    r.gs_base >= 0xff00_0000_0000_0000,
                    "kernel GS base {:#x}",
                    r.gs_base
                );
            }
            3 => assert!(r.rip < 0x0100_0000_0000_0000, "user RIP {:#x}", r.rip),
            cpl => panic!("CPL {cpl}"),
        }
        assert_eq!(r.lstar, None);
    }
    assert!(matches!(a.regs(2), Err(GuestError::NoSuchVcpu(2))));
    a.resume().unwrap();
    assert!(matches!(a.regs(0), Err(GuestError::NotPaused)));
}

fn pause_resume_loop(g: &mut Guest, a: &mut QemuAttach) {
    for i in 0..5 {
        a.pause().unwrap();
        let r0 = a.regs(0).unwrap();
        assert_ne!(r0.cr3, 0);
        a.resume().unwrap();
        assert_eq!(
            g.run(&format!("echo round{i}")).unwrap(),
            format!("round{i}\n")
        );
    }
}

fn find_all(mem: &dyn PhysMemory, needle: &[u8], page_aligned: bool) -> Vec<u64> {
    let mut hits = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for (start, len) in mem.regions() {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            mem.read_phys(start + off, &mut buf[..n]).unwrap();
            if page_aligned {
                for p in (0..n).step_by(4096) {
                    if buf[p..].starts_with(needle) {
                        hits.push(start + off + p as u64);
                    }
                }
            } else {
                for (i, w) in buf[..n].windows(needle.len()).enumerate() {
                    if w == needle {
                        hits.push(start + off + i as u64);
                    }
                }
            }
            off += n as u64;
        }
    }
    hits
}

fn write_phys_seen_by_guest(g: &mut Guest, a: &mut QemuAttach) {
    // Page 2 of a tmpfs file starts with a marker that is never typed in one piece.
    g.run("{ head -c 4096 /dev/zero; printf 'HVPATCH-%s-%s' marker 4242; } > /tmp/m")
        .unwrap();
    let old = b"HVPATCH-marker-4242";
    let new = b"HVPATCH-Patched-777";
    a.pause().unwrap();
    let hits = find_all(a.memory(), old, true);
    assert!(
        !hits.is_empty() && hits.len() <= 8,
        "page-aligned marker copies: {hits:x?}"
    );
    for &pa in &hits {
        a.write_phys(pa, new).unwrap();
        let mut back = [0u8; 19];
        a.memory().read_phys(pa, &mut back).unwrap();
        assert_eq!(&back, new);
    }
    assert!(matches!(
        a.write_phys(a.memory().regions()[0].1 - 4, new),
        Err(GuestError::WriteOutOfRange { .. })
    ));
    a.resume().unwrap();
    assert_eq!(
        g.run("tail -c +4097 /tmp/m").unwrap(),
        "HVPATCH-Patched-777"
    );
    // A write while running (the backend pauses around it).
    assert!(!a.is_paused());
    let back = b"HVPATCH-Running-123";
    for &pa in &hits {
        a.write_phys(pa, back).unwrap();
    }
    assert!(!a.is_paused());
    assert_eq!(
        g.run("tail -c +4097 /tmp/m").unwrap(),
        "HVPATCH-Running-123"
    );
}

/// Guest-physical address of kernel symbol `name`: "Kernel code" in /proc/iomem is
/// `__pa_symbol(_text)`.
fn kernel_pa(g: &mut Guest, name: &str) -> u64 {
    let iomem = g.run("grep 'Kernel code' /proc/iomem").unwrap();
    let start = iomem.trim().split('-').next().unwrap().trim();
    let text_pa = u64::from_str_radix(start, 16).unwrap();
    assert_ne!(text_pa, 0, "/proc/iomem hides addresses: {iomem}");
    text_pa + (ksym(g, name) - ksym(g, "_text"))
}

/// A code write through `write_phys` makes TCG drop code it has already translated: make
/// `cmdline_proc_show` return 0 at once (after it ran, so its translation is cached), then
/// restore it.
fn code_write_invalidates_translations(g: &mut Guest, a: &mut QemuAttach) {
    let expected = g.run("cat /proc/cmdline").unwrap();
    assert!(expected.contains("console=ttyS0"), "{expected}");
    for _ in 0..3 {
        assert_eq!(g.run("cat /proc/cmdline").unwrap(), expected);
    }
    let mut pa = kernel_pa(g, "cmdline_proc_show");
    a.pause().unwrap();
    let mut orig = [0u8; 16];
    a.memory().read_phys(pa, &mut orig).unwrap();
    // Keep an ENDBR64 in place.
    if orig.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        pa += 4;
        a.memory().read_phys(pa, &mut orig).unwrap();
    }
    a.write_phys(pa, &[0x31, 0xc0, 0xc3]).unwrap(); // xor eax, eax; ret
    a.resume().unwrap();
    assert_eq!(
        g.run("cat /proc/cmdline").unwrap(),
        "",
        "stale translation still ran"
    );
    a.pause().unwrap();
    a.write_phys(pa, &orig[..3]).unwrap();
    a.resume().unwrap();
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), expected);
}

fn breakpoints(g: &mut Guest, a: &mut QemuAttach) {
    let addr = ksym(g, "cmdline_proc_show");
    let expected = g.run("cat /proc/cmdline").unwrap();
    assert!(matches!(
        a.set_breakpoints(&[1, 2, 3, 4, 5]),
        Err(GuestError::TooManyBreakpoints(5))
    ));
    a.set_breakpoints(&[addr]).unwrap();
    // Nothing reads /proc/cmdline: the wait times out and the guest keeps running.
    let t = Instant::now();
    assert_eq!(a.wait_event(Duration::from_secs(2)).unwrap(), None);
    assert!(t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(10));
    assert!(!a.is_paused());
    assert_eq!(g.run("echo alive").unwrap(), "alive\n");

    // Two reads, one second apart: two hits, the second after stepping over the first.
    g.spawn("sleep 1; cat /proc/cmdline > /tmp/c1; sleep 1; cat /proc/cmdline > /tmp/c2")
        .unwrap();
    for hit in 0..2 {
        // `wait_event` never resumes: the first hit left the guest paused.
        a.resume().unwrap();
        let ev = a.wait_event(Duration::from_secs(60)).unwrap();
        let Some(GuestEvent::Breakpoint { vcpu, rip }) = ev else {
            panic!("hit {hit}: expected a breakpoint, got {ev:?}");
        };
        assert_eq!(rip, addr, "hit {hit}");
        assert!(vcpu < 2);
        assert!(a.is_paused());
        let r = a.regs(vcpu).unwrap();
        assert_eq!(r.rip, addr);
        assert_eq!(r.cpl(), 0);
    }
    a.set_breakpoints(&[]).unwrap();
    a.resume().unwrap();
    // Let the spawned job finish.
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.run_status("test -s /tmp/c2").unwrap().0 != 0 {
        assert!(Instant::now() < deadline, "second cat never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(g.run("cat /tmp/c1").unwrap(), expected);
    assert_eq!(g.run("cat /tmp/c2").unwrap(), expected);
    // Breakpoints cleared: nothing stops the guest any more.
    g.run("cat /proc/cmdline").unwrap();
    assert_eq!(a.wait_event(Duration::from_millis(500)).unwrap(), None);
}

/// Several writes in one batch cost one physical-memory-mode switch and are all seen by the
/// guest; a batch with a bad range writes nothing.
fn batched_writes(g: &mut Guest, a: &mut QemuAttach) {
    // Pages 2..4 of a tmpfs file start with markers that are never typed in one piece.
    g.run(
        "{ head -c 4096 /dev/zero; for i in 1 2 3; do printf 'HVBATCH-%s-%s' m$i 4242; head -c 4081 /dev/zero; done; } \
         > /tmp/b",
    )
    .unwrap();
    let olds: [&[u8]; 3] = [b"HVBATCH-m1-4242", b"HVBATCH-m2-4242", b"HVBATCH-m3-4242"];
    let news: [&[u8]; 3] = [b"HVBATCH-x1-7777", b"HVBATCH-x2-7777", b"HVBATCH-x3-7777"];
    a.pause().unwrap();
    let mut batch: Vec<(u64, &[u8])> = Vec::new();
    for (old, new) in olds.iter().zip(news) {
        let hits = find_all(a.memory(), old, true);
        assert!(
            !hits.is_empty() && hits.len() <= 8,
            "page-aligned copies of {}: {hits:x?}",
            String::from_utf8_lossy(old)
        );
        batch.extend(hits.into_iter().map(|pa| (pa, new)));
    }
    // A bad range anywhere: nothing is written.
    let end = a.memory().regions()[0].1;
    let mut bad = batch.clone();
    bad.push((end - 4, news[0]));
    let switches = a.phys_mode_switches();
    assert!(matches!(
        a.write_phys_batch(&bad),
        Err(GuestError::WriteOutOfRange { .. })
    ));
    assert_eq!(a.phys_mode_switches(), switches);
    for &(pa, _) in &batch {
        let mut back = [0u8; 15];
        a.memory().read_phys(pa, &mut back).unwrap();
        assert!(olds.contains(&&back[..]), "written despite the bad range");
    }
    // While running (the backend pauses around the batch): one mode switch for all writes.
    a.resume().unwrap();
    a.write_phys_batch(&batch).unwrap();
    assert!(!a.is_paused());
    assert_eq!(
        a.phys_mode_switches(),
        switches + 1,
        "{} writes",
        batch.len()
    );
    for &(pa, new) in &batch {
        let mut back = [0u8; 15];
        a.memory().read_phys(pa, &mut back).unwrap();
        assert_eq!(&back, new);
    }
    let want: String = news
        .iter()
        .map(|n| format!("{}\n", String::from_utf8_lossy(n)))
        .collect();
    let got = g
        .run("for o in 4097 8193 12289; do tail -c +$o /tmp/b | head -c 15; echo; done")
        .unwrap();
    assert_eq!(got, want);
}

/// Single-stepping one vCPU from a breakpoint: it moves one instruction at a time through
/// `cmdline_proc_show` while the other vCPU stays where it is; afterwards the guest runs on.
fn single_step(g: &mut Guest, a: &mut QemuAttach) {
    let addr = ksym(g, "cmdline_proc_show");
    let (etext, stext) = (ksym(g, "_etext"), ksym(g, "_stext"));
    let expected = g.run("cat /proc/cmdline").unwrap();
    let pa = kernel_pa(g, "cmdline_proc_show");
    assert!(matches!(a.single_step(0), Err(GuestError::NotPaused)));
    a.set_breakpoints(&[addr]).unwrap();
    g.spawn("sleep 1; cat /proc/cmdline > /tmp/s1").unwrap();
    let ev = a.wait_event(Duration::from_secs(60)).unwrap();
    let Some(GuestEvent::Breakpoint { vcpu, rip }) = ev else {
        panic!("expected a breakpoint, got {ev:?}");
    };
    assert_eq!(rip, addr);
    assert!(matches!(a.single_step(2), Err(GuestError::NoSuchVcpu(2))));
    let other = 1 - vcpu;
    let other_before = a.regs(other).unwrap();
    let mut code = [0u8; 4];
    a.memory().read_phys(pa, &mut code).unwrap();
    let mut prev = addr;
    for step in 0..6 {
        let r = a.single_step(vcpu).unwrap();
        assert!(a.is_paused(), "step {step}: the guest stays paused");
        assert_eq!(r.rip, a.regs(vcpu).unwrap().rip);
        assert_ne!(r.rip, prev, "step {step}: no progress");
        assert!((stext..etext).contains(&r.rip), "step {step}: {:#x}", r.rip);
        assert_eq!(r.cpl(), 0);
        if step == 0 {
            // The first instruction: ENDBR64 (4 bytes) or at most 15 bytes long.
            if code == [0xf3, 0x0f, 0x1e, 0xfa] {
                assert_eq!(r.rip, addr + 4, "step over ENDBR64");
            } else {
                assert!(r.rip > addr && r.rip <= addr + 15, "{:#x}", r.rip);
            }
        }
        prev = r.rip;
    }
    let o = a.regs(other).unwrap();
    assert_eq!(
        (o.rip, o.gprs),
        (other_before.rip, other_before.gprs),
        "the other vCPU ran during the steps"
    );
    a.set_breakpoints(&[]).unwrap();
    a.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.run_status("test -s /tmp/s1").unwrap().0 != 0 {
        assert!(Instant::now() < deadline, "the stepped cat never finished");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(g.run("cat /tmp/s1").unwrap(), expected);
}

/// QEMU frozen (SIGSTOP): requests time out instead of hanging; after SIGCONT the backend
/// recovers.
fn qemu_freezes(g: &mut Guest, a: &mut QemuAttach) {
    let pid = g.qemu_pid() as libc::pid_t;
    // SAFETY: signals our own child QEMU process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    let r = a.pause();
    let took = t.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(r.is_err(), "pause of a frozen QEMU succeeded");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    a.pause().unwrap();
    assert_ne!(a.regs(0).unwrap().cr3, 0);
    a.resume().unwrap();
    assert_eq!(g.run("echo thawed").unwrap(), "thawed\n");
}

fn qemu_vanishes(g: &mut Guest, mut a: QemuAttach) {
    g.kill_qemu();
    let t = Instant::now();
    let r = a.wait_event(Duration::from_secs(30));
    assert!(matches!(r, Err(GuestError::Gone(_))), "{r:?}");
    assert!(matches!(a.pause(), Err(GuestError::Gone(_))));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    drop(a); // must not hang
}

fn attach_suite(series: KernelSeries) {
    let mut g = Guest::boot(GuestSpec::new(series)).unwrap();
    let t = Instant::now();
    let mut a = QemuAttach::connect(&g.gdb_socket(), &g.mem_file()).unwrap();
    eprintln!("{series:?}: attached in {:?}", t.elapsed());
    assert!(!a.is_paused(), "connect leaves the guest running");
    assert_eq!(g.run("echo attached").unwrap(), "attached\n");
    check_regs(series, &mut g, &mut a);
    pause_resume_loop(&mut g, &mut a);
    write_phys_seen_by_guest(&mut g, &mut a);
    code_write_invalidates_translations(&mut g, &mut a);
    breakpoints(&mut g, &mut a);
    batched_writes(&mut g, &mut a);
    single_step(&mut g, &mut a);
    qemu_freezes(&mut g, &mut a);
    // Detach (drop) leaves the guest running; attaching again works.
    drop(a);
    assert_eq!(g.run("echo detached").unwrap(), "detached\n");
    let a = QemuAttach::connect(&g.gdb_socket(), &g.mem_file()).unwrap();
    assert_eq!(g.run("echo reattached").unwrap(), "reattached\n");
    qemu_vanishes(&mut g, a);
}

#[test]
fn attach_6_1() {
    attach_suite(KernelSeries::V6_1);
}

#[test]
fn attach_6_12() {
    attach_suite(KernelSeries::V6_12);
}
