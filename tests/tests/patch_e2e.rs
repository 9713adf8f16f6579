//! End-to-end live patching of booted 6.1 and 6.12 guests through QEMU attach (gdbstub +
//! shared RAM file): the klp sample on /proc/cmdline, a patch with state calling a
//! non-exported function, klp's multiple-livepatch scenarios, and refused patches — each
//! checked against what the guest itself prints and against kernel text read before and after.

use harness::patching::build_patch as build;
use harness::{Guest, GuestSpec, KernelSeries};
use introspect::Kernel;
use patcher::kernel::KernelSymbols;
use std::time::Duration;

use patcher::{Engine, GuestControl, KernelPaging, PatchError, SymbolMap, SymbolSource, Target};

/// How long unloads here may wait for a patch to become unreachable.
const WAIT: Duration = Duration::from_secs(10);

fn show_patch(name: &str, funcs: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("HVPATCH_NAME(\"{name}\");\n");
    for (i, (f, msg)) in funcs.iter().enumerate() {
        s += &format!(
            "static int new{i}(struct seq_file *m, void *v) {{ seq_printf(m, \"%s\\n\", \"{msg}\"); return 0; }}\n\
             HVPATCH_FUNC({f}, new{i});\n"
        );
    }
    build(name, &s)
}

/// The guest, its attach control, and its kernel.
struct Rig {
    g: Guest,
    ctl: vmm::attach::QemuAttach,
    kernel: Kernel,
    /// The guest's own /proc/kallsyms.
    truth: SymbolMap,
}

impl Rig {
    fn boot(series: KernelSeries) -> Rig {
        let mut g = Guest::boot(GuestSpec::new(series))
            .expect("boot (images: run `cargo run -p hvpatch-guest-images -- fetch`)");
        let truth = SymbolMap::from_kallsyms(&g.run_bulk("cat /proc/kallsyms").unwrap());
        let (ctl, kernel, _) = harness::patching::attach_and_open(&g);
        Rig {
            g,
            ctl,
            kernel,
            truth,
        }
    }

    fn nx(&mut self) -> bool {
        let was = self.ctl.is_paused();
        if !was {
            self.ctl.pause().unwrap();
        }
        let r = self.ctl.regs(0).unwrap();
        if !was {
            self.ctl.resume().unwrap();
        }
        r.nx_enabled()
    }

    fn load(
        &mut self,
        e: &mut Engine,
        obj: &[u8],
        file: &str,
    ) -> Result<patcher::PatchInfo, PatchError> {
        let nx = self.nx();
        let ks = KernelSymbols::new(&self.kernel, self.ctl.memory());
        let t = Target {
            symbols: &ks,
            paging: ks.paging(nx),
        };
        e.load(&mut self.ctl, &t, obj, file)
    }

    fn addr(&self, name: &str) -> u64 {
        let a = self.kernel.lookup(name, None).unwrap();
        assert_eq!(
            self.truth.addresses(name),
            vec![a],
            "{name}: introspect vs /proc/kallsyms"
        );
        a
    }

    fn read_virt(&self, va: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.kernel
            .read_virt(self.ctl.memory(), va, &mut b)
            .unwrap();
        b
    }

    /// The whole kernel text `[_text, _etext)` plus the low-memory arena window and the
    /// kernel-image page directory: everything a failed load could have touched.
    fn snapshot(&self) -> Vec<u8> {
        let text = self.addr("_text");
        let etext = self.addr("_etext");
        let mut v = self.read_virt(text, (etext - text) as usize);
        let mut low = vec![0u8; 0x90000 - 0x10000];
        self.ctl.memory().read_phys(0x10000, &mut low).unwrap();
        v.extend(low);
        let p = KernelPaging {
            pgd_pa: self.kernel.page_root().pgd_pa,
            la57: self.kernel.page_root().levels == 5,
            nx: true,
        };
        let (pmd_pa, _) = p.pmd_entry(self.ctl.memory(), text).unwrap().unwrap();
        let mut pd = vec![0u8; 4096];
        self.ctl
            .memory()
            .read_phys(pmd_pa & !0xfff, &mut pd)
            .unwrap();
        v.extend(pd);
        v
    }
}

/// Code addresses of the guest's jump-label sites, from its own `__jump_table` (x86-64
/// relative entries: `s32 code, s32 target, long key`, 16 bytes).
fn jump_label_sites(r: &Rig) -> Vec<u64> {
    let start = r.addr("__start___jump_table");
    let stop = r.addr("__stop___jump_table");
    assert!(
        stop > start && stop - start < 16 << 20 && (stop - start).is_multiple_of(16),
        "__jump_table [{start:#x}, {stop:#x})"
    );
    let t = r.read_virt(start, (stop - start) as usize);
    let mut v: Vec<u64> = t
        .chunks_exact(16)
        .enumerate()
        .map(|(i, e)| {
            let rel = i32::from_le_bytes(e[..4].try_into().unwrap()) as i64;
            (start + 16 * i as u64).wrapping_add_signed(rel)
        })
        .collect();
    v.sort_unstable();
    v
}

/// Asserts that guest memory equals the snapshot `before`, byte for byte. The one tolerated
/// difference is a jump-label site the guest itself toggled meanwhile (a static key flipped
/// by the guest's own timers, e.g. `__sched_clock_stable` when the clocksource watchdog marks
/// the TSC unstable): a 2- or 5-byte change lying inside a site listed in the guest's
/// `__jump_table`. Everything else fails, naming the symbol and bytes.
/// Returns how many such toggles it tolerated.
fn assert_same(r: &Rig, now: &[u8], before: &[u8], what: &str) -> usize {
    assert_eq!(now.len(), before.len(), "{what}: snapshot size");
    if now == before {
        return 0;
    }
    let mut toggled = 0;
    let text = r.addr("_text");
    let text_len = (r.addr("_etext") - text) as usize;
    let sites = jump_label_sites(r);
    // The decoded table must point at jump-label code: NOP5/NOP2, JMP rel32/rel8 (or an int3
    // mid-update).
    let in_text: Vec<u64> = sites
        .iter()
        .copied()
        .filter(|&s| s >= text && s < text + text_len as u64)
        .collect();
    let odd = in_text
        .iter()
        .filter(|&&s| ![0x0f, 0x66, 0xe9, 0xeb, 0xcc].contains(&now[(s - text) as usize]))
        .count();
    assert!(
        in_text.len() > 1000 && odd == 0,
        "{what}: __jump_table decode: {} sites in text, {odd} not at jump-label code",
        in_text.len()
    );
    let mut last_site = None;
    for i in (0..now.len()).filter(|&i| now[i] != before[i]) {
        let end = (i + 16).min(now.len());
        let bytes = format!("now {:02x?}, was {:02x?}", &now[i..end], &before[i..end]);
        if i >= text_len {
            let at = if i < text_len + 0x80000 {
                format!("low memory {:#x}", 0x10000 + i - text_len)
            } else {
                "the kernel-image page directory".to_string()
            };
            panic!("{what}: guest memory changed at {at}: {bytes}");
        }
        let va = text + i as u64;
        let sym = r
            .kernel
            .symbolize(va)
            .map_or("?".to_string(), |s| s.to_string());
        // The nearest site at or below `va`; a jump-label instruction is 2 or 5 bytes.
        let k = sites.partition_point(|&s| s <= va);
        match (k > 0).then(|| sites[k - 1]).filter(|&s| va < s + 5) {
            Some(s) if last_site == Some(s) => {}
            Some(s) => {
                toggled += 1;
                last_site = Some(s);
                if toggled <= 3 {
                    eprintln!(
                        "{what}: the guest toggled its own jump label at {s:#x} ({sym}): {bytes}"
                    );
                }
            }
            None => panic!("{what}: kernel text changed at {va:#x} ({sym}): {bytes}"),
        }
    }
    if toggled > 3 {
        eprintln!("{what}: … {toggled} jump-label sites toggled by the guest in all");
    }
    toggled
}

fn cmdline_and_stacking(series: KernelSeries) {
    let mut r = Rig::boot(series);
    let orig_cmdline = r.g.run("cat /proc/cmdline").unwrap();
    let orig_version = r.g.run("cat /proc/version").unwrap();
    let f = r.addr("cmdline_proc_show");
    let before = r.read_virt(f, 64);
    let snap = r.snapshot();
    let mut e = Engine::new();

    // klp sample.
    let info = r
        .load(
            &mut e,
            &show_patch(
                "cmdline-fix",
                &[("cmdline_proc_show", "this has been live patched")],
            ),
            "livepatch-sample.o",
        )
        .unwrap();
    eprintln!(
        "{series:?}: loaded {} pause {} µs, total {} µs",
        info.name, info.pause_us, info.load_us
    );
    assert_eq!(info.functions[0].old_addr, f);
    assert_eq!(
        r.g.run("cat /proc/cmdline").unwrap(),
        "this has been live patched\n"
    );
    assert_ne!(r.read_virt(f, 64), before);
    e.unload(&mut r.ctl, "cmdline-fix", &r.kernel, WAIT)
        .unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);
    assert_eq!(
        r.read_virt(f, 64),
        before,
        "cmdline_proc_show bytes after unload"
    );
    assert_same(&r, &r.snapshot(), &snap, "after unload");

    // State + non-exported function + non-exported data.
    let counter = build(
        "counter",
        "HVPATCH_NAME(\"counter\");\n\
         extern int nr_processes(void);\n\
         extern char *saved_command_line;\n\
         static unsigned long calls;\n\
         static int show(struct seq_file *m, void *v) {\n\
           calls++;\n\
           seq_printf(m, \"calls=%lu procs=%d %s\\n\", calls, nr_processes(), saved_command_line);\n\
           return 0; }\n\
         HVPATCH_FUNC(cmdline_proc_show, show);",
    );
    r.load(&mut e, &counter, "counter.o").unwrap();
    let ps_count =
        r.g.run("ps -o pid | tail -n +2 | wc -l")
            .unwrap()
            .trim()
            .parse::<i64>()
            .unwrap();
    for n in 1..=3 {
        let out = r.g.run("cat /proc/cmdline").unwrap();
        let rest = out
            .strip_prefix(&format!("calls={n} procs="))
            .unwrap_or_else(|| panic!("got {out:?}"));
        let (procs, cmd) = rest.split_once(' ').unwrap();
        let procs: i64 = procs.parse().unwrap();
        assert!(
            (procs - ps_count).abs() <= 5,
            "nr_processes {procs} vs ps {ps_count}"
        );
        assert_eq!(format!("{cmd}"), orig_cmdline, "saved_command_line");
    }
    e.unload(&mut r.ctl, "counter", &r.kernel, WAIT).unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);

    // klp multiple livepatches: two patches, two functions, stacked on cmdline_proc_show.
    let a = show_patch("klp-a", &[("cmdline_proc_show", "A cmdline")]);
    let b = show_patch(
        "klp-b",
        &[
            ("cmdline_proc_show", "B cmdline"),
            ("version_proc_show", "B version"),
        ],
    );
    for unload_order in [["klp-b", "klp-a"], ["klp-a", "klp-b"]] {
        r.load(&mut e, &a, "a.o").unwrap();
        assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), "A cmdline\n");
        assert_eq!(r.g.run("cat /proc/version").unwrap(), orig_version);
        r.load(&mut e, &b, "b.o").unwrap();
        assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), "B cmdline\n");
        assert_eq!(r.g.run("cat /proc/version").unwrap(), "B version\n");
        assert_eq!(e.list().len(), 2);
        e.unload(&mut r.ctl, unload_order[0], &r.kernel, WAIT)
            .unwrap();
        if unload_order[0] == "klp-b" {
            assert_eq!(
                r.g.run("cat /proc/cmdline").unwrap(),
                "A cmdline\n",
                "previous patch comes back"
            );
            assert_eq!(r.g.run("cat /proc/version").unwrap(), orig_version);
        } else {
            assert_eq!(
                r.g.run("cat /proc/cmdline").unwrap(),
                "B cmdline\n",
                "top patch stays"
            );
            assert_eq!(r.g.run("cat /proc/version").unwrap(), "B version\n");
        }
        e.unload(&mut r.ctl, unload_order[1], &r.kernel, WAIT)
            .unwrap();
        assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);
        assert_eq!(r.g.run("cat /proc/version").unwrap(), orig_version);
        assert_eq!(r.read_virt(f, 64), before);
    }
    // Load A then B, unload in load order was covered; also the reverse load order.
    r.load(&mut e, &b, "b.o").unwrap();
    r.load(&mut e, &a, "a.o").unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), "A cmdline\n");
    assert_eq!(r.g.run("cat /proc/version").unwrap(), "B version\n");
    e.unload(&mut r.ctl, "klp-a", &r.kernel, WAIT).unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), "B cmdline\n");
    e.unload(&mut r.ctl, "klp-b", &r.kernel, WAIT).unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);
    assert_same(&r, &r.snapshot(), &snap, "after all unloads");

    // A patch that sleeps: while a task sleeps inside it, unload disables it but keeps it.
    let sleeper = build(
        "sleeper",
        "HVPATCH_NAME(\"sleeper\");\n\
         extern void msleep(unsigned int msecs);\n\
         static int show(struct seq_file *m, void *v) { msleep(5000); seq_printf(m, \"slept\\n\"); return 0; }\n\
         HVPATCH_FUNC(cmdline_proc_show, show);",
    );
    r.load(&mut e, &sleeper, "sleeper.o").unwrap();
    r.g.spawn("cat /proc/cmdline > /tmp/slept").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // A short wait times out: the patch is disabled at once (a new cat reads the original)
    // but held, and the error names the sleeping task.
    let err = e
        .unload(&mut r.ctl, "sleeper", &r.kernel, Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    eprintln!("{series:?}: {err}");
    assert!(err.contains("(cat)") && err.contains("sleeper"), "{err}");
    assert_eq!(e.info("sleeper").unwrap().state, patcher::PatchState::Held);
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);
    // Unloading again waits until the sleeper has left the patch, then frees it.
    let rep = e
        .unload(&mut r.ctl, "sleeper", &r.kernel, Duration::from_secs(20))
        .unwrap();
    assert!(rep.checks > 1 && rep.waited_us > 0, "{rep:?}");
    assert_eq!(r.g.run("cat /tmp/slept").unwrap(), "slept\n");
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);
    assert_same(&r, &r.snapshot(), &snap, "after the sleeper");
    // The guest is healthy.
    assert_eq!(r.g.run("echo ok").unwrap(), "ok\n");
    let dmesg = r.g.run("dmesg").unwrap();
    assert!(
        !dmesg.contains("WARNING") && !dmesg.contains("BUG"),
        "guest dmesg:\n{dmesg}"
    );
}

#[test]
fn cmdline_counter_and_stacking_6_1() {
    cmdline_and_stacking(KernelSeries::V6_1);
}

#[test]
fn cmdline_counter_and_stacking_6_12() {
    cmdline_and_stacking(KernelSeries::V6_12);
}

fn refused(series: KernelSeries) {
    let mut r = Rig::boot(series);
    let mut e = Engine::new();
    let release = r.g.run("uname -r").unwrap().trim().to_string();
    let orig_cmdline = r.g.run("cat /proc/cmdline").unwrap();
    let snap = r.snapshot();
    let check = |r: &mut Rig, e: &mut Engine, obj: &[u8], file: &str, want: &[&str]| {
        let err = r.load(e, obj, file).unwrap_err().to_string();
        eprintln!("{series:?}: {file}: {err}");
        for w in want {
            assert!(err.contains(w), "{file}: error {err:?} lacks {w:?}");
        }
        assert!(e.list().is_empty());
    };
    check(
        &mut r,
        &mut e,
        b"\x7fELG not an object",
        "junk.o",
        &["not an ELF"],
    );
    check(
        &mut r,
        &mut e,
        &build(
            "unknown",
            "extern int hvpatch_no_such_function(void);\n\
            static int n(struct seq_file *m, void *v) { return hvpatch_no_such_function(); }\n\
            HVPATCH_FUNC(cmdline_proc_show, n);",
        ),
        "unknown.o",
        &["unknown symbol", "hvpatch_no_such_function"],
    );
    // A static function name that occurs several times in the guest's own kallsyms.
    let dup = r
        .truth
        .duplicated_names()
        .map(|(n, _)| n.to_string())
        .find(|n| {
            n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with("__")
                && n.len() > 4
        })
        .expect("a duplicated name");
    check(
        &mut r,
        &mut e,
        &build(
            "ambiguous",
            &format!(
                "extern int {dup}(void);\n\
            static int n(struct seq_file *m, void *v) {{ return {dup}(); }}\n\
            HVPATCH_FUNC(cmdline_proc_show, n);"
            ),
        ),
        "ambiguous.o",
        &["ambiguous", &dup],
    );
    check(
        &mut r,
        &mut e,
        &build("otherkernel", "HVPATCH_KERNEL(\"4.19.0-27-amd64\");\n\
            static int n(struct seq_file *m, void *v) { return 0; }\nHVPATCH_FUNC(cmdline_proc_show, n);"),
        "otherkernel.o",
        &["4.19.0-27-amd64", &release],
    );
    // The guest flips a static key of its own (schedstats): the comparison must tell those
    // jump-label toggles apart from a change of ours, and see them.
    r.g.run("echo 1 > /proc/sys/kernel/sched_schedstats")
        .unwrap();
    let toggled = assert_same(&r, &r.snapshot(), &snap, "after refused patches");
    assert!(
        toggled > 0,
        "enabling sched_schedstats toggled no jump label in the snapshot"
    );
    r.g.run("echo 0 > /proc/sys/kernel/sched_schedstats")
        .unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);

    // Guest ftrace owns the site.
    r.g.run("echo cmdline_proc_show > /sys/kernel/tracing/set_ftrace_filter")
        .unwrap();
    r.g.run("echo function > /sys/kernel/tracing/current_tracer")
        .unwrap();
    let f = r.addr("cmdline_proc_show");
    let traced = r.read_virt(f, 16);
    assert!(
        traced.windows(1).any(|w| w[0] == 0xe8),
        "ftrace did not take the site: {traced:02x?}"
    );
    let snap_traced = r.snapshot();
    check(
        &mut r,
        &mut e,
        &show_patch("cmdline-fix", &[("cmdline_proc_show", "patched")]),
        "cmdline.o",
        &[
            "owned by ftrace",
            "ftrace ops trampoline",
            "cmdline_proc_show",
        ],
    );
    assert_same(
        &r,
        &r.snapshot(),
        &snap_traced,
        "after refusing the traced function",
    );
    r.g.run("echo nop > /sys/kernel/tracing/current_tracer")
        .unwrap();
    r.g.run("echo > /sys/kernel/tracing/set_ftrace_filter")
        .unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), orig_cmdline);
    // Switching the function tracer on and off may rewrite other text, so the final unload is
    // compared with a snapshot taken after tracing stopped.
    let snap_untraced = r.snapshot();
    // After tracing stops, the same patch loads.
    r.load(
        &mut e,
        &show_patch("cmdline-fix", &[("cmdline_proc_show", "patched")]),
        "cmdline.o",
    )
    .unwrap();
    assert_eq!(r.g.run("cat /proc/cmdline").unwrap(), "patched\n");
    e.unload(&mut r.ctl, "cmdline-fix", &r.kernel, WAIT)
        .unwrap();
    assert_same(&r, &r.snapshot(), &snap_untraced, "after the final unload");
}

#[test]
fn refused_patches_leave_kernel_unchanged_6_1() {
    refused(KernelSeries::V6_1);
}

#[test]
fn refused_patches_leave_kernel_unchanged_6_12() {
    refused(KernelSeries::V6_12);
}
