//! The unload soak: load and unload a patch of a hammered function many times over while a
//! `hammer` process on every vCPU reads the patched `/proc` file, and check that the guest
//! never notices anything but the change of output. Used by the `unload_soak` test (200 cycles
//! per kernel) and the `unload_soak` example (any count, for the README numbers).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use introspect::Kernel;
use patcher::kernel::KernelSymbols;
use patcher::{Engine, GuestControl, Target};

use crate::{Guest, GuestSpec, KernelSeries};

/// How much of a line `hammer` keeps (`MAX_LEN` in hammer.c).
const HAMMER_LEN: usize = 120;

/// Output of the patched `/proc/version`.
pub const PATCHED: &str = "hvpatch soak: patched";

/// The patch: `version_proc_show` with a static counter and its strings in the patch's data
/// pages (the format string is read by `seq_printf` while the patch runs).
pub fn soak_patch() -> Vec<u8> {
    soak_patch_named("soak", PATCHED)
}

/// What a soak patches and hammers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoakTarget {
    /// `version_proc_show`, which has an ftrace site, hammered through `/proc/version`; every
    /// other cycle runs under the consistency model.
    FtraceSite,
    /// `rb_simple_read` (kernel/trace is built without `-pg`: no ftrace site), patched by a
    /// prologue rewrite and hammered through `/sys/kernel/tracing/tracing_on` (tracefs mounted
    /// first); every other cycle runs under the consistency model (the dispatcher's old path
    /// is the trampoline).
    Prologue,
}

impl SoakTarget {
    /// The function patched.
    pub fn func(self) -> &'static str {
        match self {
            SoakTarget::FtraceSite => "version_proc_show",
            SoakTarget::Prologue => "rb_simple_read",
        }
    }

    /// The file the hammers read (its read runs [`SoakTarget::func`]).
    pub fn path(self) -> &'static str {
        match self {
            SoakTarget::FtraceSite => "/proc/version",
            SoakTarget::Prologue => "/sys/kernel/tracing/tracing_on",
        }
    }

    /// The patch `name`, whose replacement prints `msg` (one line) and counts its calls in a
    /// static variable; its strings live in the patch's data pages.
    pub fn patch(self, name: &str, msg: &str) -> Vec<u8> {
        match self {
            SoakTarget::FtraceSite => soak_patch_named(name, msg),
            SoakTarget::Prologue => crate::patching::build_patch(
                name,
                &format!(
                    "HVPATCH_NAME(\"{name}\");\n\
                     extern ssize_t simple_read_from_buffer(void *to, size_t count, long long *ppos, const void *from, size_t available);\n\
                     static unsigned long calls;\n\
                     static const char msg[] = \"{msg}\\n\";\n\
                     static ssize_t rd(struct file *f, char *ubuf, size_t cnt, long long *ppos)\n\
                     {{ calls++; return simple_read_from_buffer(ubuf, cnt, ppos, msg, sizeof(msg) - 1); }}\n\
                     HVPATCH_FUNC(rb_simple_read, rd);"
                ),
            ),
        }
    }
}

/// Output of the second, stacked patch.
pub const PATCHED_TOP: &str = "hvpatch soak: stacked";

/// A soak patch named `name` printing `msg`.
fn soak_patch_named(name: &str, msg: &str) -> Vec<u8> {
    crate::patching::build_patch(
        name,
        &format!(
            "HVPATCH_NAME(\"{name}\");\n\
             static unsigned long calls;\n\
             static const char msg[] = \"{msg}\";\n\
             static int show(struct seq_file *m, void *v) {{ calls++; seq_printf(m, \"%s\\n\", msg); return 0; }}\n\
             HVPATCH_FUNC(version_proc_show, show);"
        ),
    )
}

/// Console lines that mean the guest kernel complained.
pub fn kernel_complaints(dmesg: &str) -> Vec<String> {
    const BAD: &[&str] = &[
        "Oops",
        "BUG:",
        "WARNING:",
        "Kernel panic",
        "general protection fault",
        "Call Trace",
        "invalid opcode",
        "segfault",
    ];
    dmesg
        .lines()
        .filter(|l| BAD.iter().any(|b| l.contains(b)))
        .map(str::to_string)
        .collect()
}

/// Fails (panics) when the guest's dmesg has a complaint ([`kernel_complaints`]) that is not
/// in `before` (those it had at boot); `when` names the step.
pub fn assert_no_new_complaints(g: &mut Guest, before: &[String], when: &str) {
    let dmesg = g
        .run("dmesg")
        .unwrap_or_else(|e| panic!("{when}: dmesg: {e}"));
    let new: Vec<String> = kernel_complaints(&dmesg)
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert!(
        new.is_empty(),
        "{when}: the guest complained:\n{}",
        new.join("\n")
    );
}

/// What one `hammer` process saw.
#[derive(Debug, Clone, Default)]
pub struct HammerTally {
    /// CPU it was pinned to.
    pub cpu: u32,
    /// Reads.
    pub calls: u64,
    /// Failed reads.
    pub errors: u64,
    /// First line of each distinct content, with its count.
    pub seen: Vec<(u64, String)>,
}

/// Parses a `hammer` report (see guest-images/progs/hammer.c); the last one in `text` wins.
pub fn parse_hammer(text: &str, cpu: u32) -> Option<HammerTally> {
    // The last complete report: from its header line to its "end" line.
    let start = text
        .rfind(" calls, ")
        .and_then(|i| text[..i].rfind("hammer "))?;
    let last = &text[start..];
    last.contains(" end").then_some(())?;
    let mut t = HammerTally {
        cpu,
        ..Default::default()
    };
    for l in last.lines() {
        if let Some(rest) = l.split(": ").nth(1).filter(|_| l.contains(" calls, ")) {
            for part in rest.split(", ") {
                let mut it = part.split(' ');
                let n: u64 = it.next()?.parse().ok()?;
                match it.next()? {
                    "calls" => t.calls = n,
                    "errors" => t.errors = n,
                    _ => {}
                }
            }
        } else if let Some(rest) = l.strip_prefix("  ") {
            let (n, s) = rest.split_once(' ')?;
            t.seen.push((n.parse().ok()?, s.to_string()));
        }
    }
    Some(t)
}

/// Numbers of one soak run.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// Kernel release.
    pub release: String,
    /// The function patched, and how its entry was redirected (`patch info`'s method).
    pub func: String,
    /// Loads refused as busy (a context inside the bytes a prologue rewrite moves) and retried.
    pub busy_retries: usize,
    /// Load/unload cycles done.
    pub cycles: usize,
    /// Whole loop.
    pub elapsed: Duration,
    /// Unloads done (cycles plus the stacked ones).
    pub unloads: usize,
    /// Unloads whose first check found the patch still reachable (they waited).
    pub waited: usize,
    /// Longest and total wait.
    pub max_wait: Duration,
    /// Sum of all waits.
    pub total_wait: Duration,
    /// Reachability checks made by unloads, in all.
    pub checks: u64,
    /// What held the patch at the first check, by kind, over all waiting unloads.
    pub kinds: BTreeMap<String, usize>,
    /// Waiting unloads whose first hold the check before the unload-safety work would have
    /// missed (it looked only at code, at a vCPU's RIP and the stack its RSP is on, and at
    /// sleeping tasks' stacks; unreadable meant free): each of these freed reachable pages.
    pub old_check_missed: usize,
    /// Median pause of the disable step.
    pub median_unload_pause: Duration,
    /// Median load pause.
    pub median_load_pause: Duration,
    /// What each hammer saw.
    pub hammers: Vec<HammerTally>,
    /// Cycles run under the consistency model (the others are immediate).
    pub consistent_cycles: usize,
    /// Transitions (enable and disable) of the consistent cycles.
    pub transitions: usize,
    /// Median and longest transition, start to completion.
    pub median_transition: Duration,
    /// Longest transition.
    pub max_transition: Duration,
    /// Median vCPU pause added up over one transition.
    pub median_transition_pause: Duration,
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = self.elapsed / self.cycles.max(1) as u32;
        writeln!(
            f,
            "{}: {}: {} load/unload cycles in {:.1?} ({per:.2?} per cycle); load pause median {:.2?}, unload (disable) pause median {:.2?}; {} busy load(s) retried",
            self.release, self.func, self.cycles, self.elapsed, self.median_load_pause, self.median_unload_pause, self.busy_retries
        )?;
        let avg = if self.waited > 0 {
            self.total_wait / self.waited as u32
        } else {
            Duration::ZERO
        };
        writeln!(
            f,
            "  unloads that had to wait: {} of {} ({:.1}%), mean wait {avg:.2?}, longest {:.2?}; {} reachability checks",
            self.waited,
            self.unloads,
            100.0 * self.waited as f64 / self.unloads.max(1) as f64,
            self.max_wait,
            self.checks
        )?;
        writeln!(
            f,
            "  of those, held only by what the earlier check did not look at: {} (it would have freed reachable pages)",
            self.old_check_missed
        )?;
        for (k, n) in &self.kinds {
            writeln!(f, "  held at the first check by {k}: {n} unload(s)")?;
        }
        writeln!(
            f,
            "  consistent cycles: {} ({} transitions), transition median {:.2?}, longest {:.2?}, vCPU pause per transition median {:.2?}",
            self.consistent_cycles,
            self.transitions,
            self.median_transition,
            self.max_transition,
            self.median_transition_pause
        )?;
        for h in &self.hammers {
            let seen: Vec<String> = h
                .seen
                .iter()
                .map(|(n, s)| format!("{n} x {:?}", s.chars().take(40).collect::<String>()))
                .collect();
            writeln!(
                f,
                "  hammer on cpu {}: {} reads, {} errors; saw {}",
                h.cpu,
                h.calls,
                h.errors,
                seen.join(", ")
            )?;
        }
        Ok(())
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Boots a guest of `series`, runs `cycles` load/unload cycles under a hammer on every vCPU and
/// checks everything the unload-safety guarantee promises; `Err` says what went wrong (with
/// the console tail). Every fourth cycle stacks a second patch on the same function and
/// unloads it first, so the entry is retargeted to the first patch under load. `progress` is
/// called every 50 cycles.
pub fn run_soak(
    series: KernelSeries,
    cycles: usize,
    progress: &mut dyn FnMut(usize, &SoakReport),
) -> Result<SoakReport, String> {
    run_soak_target(series, SoakTarget::FtraceSite, cycles, progress)
}

/// [`run_soak`] of `target`'s function and file.
pub fn run_soak_target(
    series: KernelSeries,
    target: SoakTarget,
    cycles: usize,
    progress: &mut dyn FnMut(usize, &SoakReport),
) -> Result<SoakReport, String> {
    let mut g = Guest::boot(GuestSpec::new(series))
        .map_err(|e| format!("boot (images: run `scripts/setup`): {e}"))?;
    let r = soak_on(&mut g, target, cycles, progress);
    r.map_err(|e| format!("{e}\n{}", g.tail()))
}

/// How many times a load refused as busy (see [`SoakReport::busy_retries`]) is tried again.
const BUSY_TRIES: usize = 50;

fn soak_on(
    g: &mut Guest,
    target: SoakTarget,
    cycles: usize,
    progress: &mut dyn FnMut(usize, &SoakReport),
) -> Result<SoakReport, String> {
    let e2s = |e: crate::HarnessError| e.to_string();
    let dmesg_before = kernel_complaints(&g.run("dmesg").map_err(e2s)?);
    if target == SoakTarget::Prologue {
        g.run(
            "[ -e /sys/kernel/tracing/tracing_on ] || mount -t tracefs nodev /sys/kernel/tracing",
        )
        .map_err(e2s)?;
    }
    let path = target.path();
    let original = g.run(&format!("cat {path}")).map_err(e2s)?;
    // The hammer keeps the first HAMMER_LEN bytes of a line.
    let original_line: String = original
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(HAMMER_LEN)
        .collect();
    let vcpus = g.vcpus();
    for cpu in 0..vcpus {
        g.spawn(&format!(
            "exec hammer {cpu} read {path} > /tmp/hammer{cpu}.out 2>&1"
        ))
        .map_err(e2s)?;
    }
    let (mut ctl, kernel, regs) = crate::patching::attach_and_open(g);
    let obj = target.patch("soak", PATCHED);
    let top = target.patch("soak-top", PATCHED_TOP);
    let release = kernel.info().release.clone().unwrap_or_default();
    let func = kernel
        .lookup(target.func(), None)
        .map_err(|e| e.to_string())?;
    // The whole function (the prologue rewrite moves instructions), at least 64 bytes.
    let func_len = kernel
        .symbolize(func)
        .map_or(64, |s| s.size.clamp(64, 4096)) as usize;
    let read_text = |k: &Kernel, ctl: &vmm::attach::QemuAttach, n: usize| {
        let mut b = vec![0u8; n];
        k.read_virt(ctl.memory(), func, &mut b).map(|_| b)
    };
    let text_before = read_text(&kernel, &ctl, func_len).map_err(|e| e.to_string())?;
    let ks = KernelSymbols::new(&kernel, ctl.memory());
    let t = Target {
        symbols: &ks,
        paging: ks.paging(regs[0].nx_enabled()),
    };
    let mut e = Engine::new();
    let mut rep = SoakReport {
        release,
        func: target.func().to_string(),
        ..Default::default()
    };
    // Immediate loads with the kernel view (a prologue rewrite needs it to check that no
    // context is inside the moved bytes); a busy refusal is retried.
    let load_immediate = |e: &mut Engine,
                          ctl: &mut vmm::attach::QemuAttach,
                          obj: &[u8],
                          file: &str,
                          busy: &mut usize|
     -> Result<patcher::PatchInfo, String> {
        for _ in 0..BUSY_TRIES {
            match e.load_viewed(ctl, &t, Some(&kernel), obj, file) {
                Err(patcher::PatchError::Busy(_)) => {
                    *busy += 1;
                    std::thread::sleep(Duration::from_micros(300));
                }
                r => return r.map_err(|err| err.to_string()),
            }
        }
        Err(format!("{file}: busy {BUSY_TRIES} times"))
    };
    let (mut load_pauses, mut unload_pauses) = (Vec::new(), Vec::new());
    let mut pages = std::collections::BTreeSet::new();
    let t0 = Instant::now();
    let (mut trans_times, mut trans_pauses) = (Vec::new(), Vec::new());
    // Loads and disables of the consistent cycles: start, wait for the transition, time it.
    let transition_done = |e: &mut Engine,
                           ctl: &mut vmm::attach::QemuAttach,
                           started: Instant,
                           times: &mut Vec<Duration>,
                           pauses: &mut Vec<Duration>|
     -> Result<(), String> {
        while e.in_transition() {
            std::thread::sleep(Duration::from_millis(2));
            if e.transition_step(ctl, &kernel).map_err(|x| x.to_string())?
                == patcher::StepOutcome::Complete
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("transition stuck: {:?}", e.transition_status()));
            }
        }
        times.push(started.elapsed());
        // All the pauses of the transition (its start, when it completed at once, or every check).
        pauses.push(e.last_timing().pause);
        Ok(())
    };
    for i in 0..cycles {
        let consistent = i % 2 == 1;
        let info = if consistent {
            rep.consistent_cycles += 1;
            let s0 = Instant::now();
            let mut tries = 0;
            let info = loop {
                match e.load_consistent(
                    &mut ctl,
                    &t,
                    &kernel,
                    &obj,
                    "soak.o",
                    patcher::LoadOptions::default(),
                ) {
                    Err(patcher::PatchError::Busy(_)) if tries < BUSY_TRIES => {
                        tries += 1;
                        rep.busy_retries += 1;
                        std::thread::sleep(Duration::from_micros(300));
                    }
                    r => break r,
                }
            }
            .map_err(|err| format!("cycle {i}: consistent load failed: {err}"))?;
            transition_done(&mut e, &mut ctl, s0, &mut trans_times, &mut trans_pauses)
                .map_err(|err| format!("cycle {i}: load: {err}"))?;
            rep.transitions += 1;
            info
        } else {
            load_immediate(&mut e, &mut ctl, &obj, "soak.o", &mut rep.busy_retries)
                .map_err(|err| format!("cycle {i}: load failed: {err}"))?
        };
        if i < 2 {
            let f = &info.functions[0];
            rep.func = format!("{} ({})", target.func(), f.method);
            let want = match target {
                SoakTarget::FtraceSite => patcher::prologue::Method::FtraceSite,
                SoakTarget::Prologue => patcher::prologue::Method::Prologue,
            };
            if f.method != want {
                return Err(format!(
                    "{} was patched by {}, not {want}",
                    target.func(),
                    f.method
                ));
            }
        }
        load_pauses.push(Duration::from_micros(info.pause_us));
        pages.extend(info.code.pages.iter().chain(&info.data.pages).copied());
        // Let the hammers run the patch for a varying while (0-4 ms).
        std::thread::sleep(Duration::from_micros(((i * 7919) % 5000) as u64));
        let mut unloads = Vec::new();
        if i % 4 == 3 {
            let info = load_immediate(&mut e, &mut ctl, &top, "soak-top.o", &mut rep.busy_retries)
                .map_err(|err| format!("cycle {i}: stacked load failed: {err}"))?;
            pages.extend(info.code.pages.iter().chain(&info.data.pages).copied());
            std::thread::sleep(Duration::from_micros(((i * 104_729) % 3000) as u64));
            // Back to the first patch (retarget), under load.
            unloads.push(
                e.unload(&mut ctl, "soak-top", &kernel, Duration::from_secs(10))
                    .map_err(|err| format!("cycle {i}: stacked unload failed: {err}"))?,
            );
        }
        if consistent {
            // Disable by a transition, then free.
            let s0 = Instant::now();
            e.disable(&mut ctl, &kernel, "soak", patcher::SwitchOptions::default())
                .map_err(|err| format!("cycle {i}: disable failed: {err}"))?;
            transition_done(&mut e, &mut ctl, s0, &mut trans_times, &mut trans_pauses)
                .map_err(|err| format!("cycle {i}: disable: {err}"))?;
            rep.transitions += 1;
        }
        unloads.push(
            e.unload(&mut ctl, "soak", &kernel, Duration::from_secs(10))
                .map_err(|err| format!("cycle {i}: unload failed: {err}"))?,
        );
        for u in unloads {
            unload_pauses.push(Duration::from_micros(u.pause_us));
            rep.unloads += 1;
            rep.checks += u64::from(u.checks);
            if let Some(h) = &u.first_hold {
                rep.waited += 1;
                let w = Duration::from_micros(u.waited_us);
                rep.max_wait = rep.max_wait.max(w);
                rep.total_wait += w;
                for k in &h.kinds {
                    *rep.kinds.entry(k.clone()).or_default() += 1;
                }
                if !h
                    .kinds
                    .iter()
                    .any(|k| k == "code in rip" || k == "code in task stack")
                {
                    rep.old_check_missed += 1;
                }
            }
        }
        rep.cycles = i + 1;
        rep.elapsed = t0.elapsed();
        if (i + 1) % 50 == 0 {
            rep.median_load_pause = median(load_pauses.clone());
            rep.median_unload_pause = median(unload_pauses.clone());
            progress(i + 1, &rep);
        }
    }
    rep.elapsed = t0.elapsed();
    rep.median_load_pause = median(load_pauses);
    rep.median_unload_pause = median(unload_pauses);
    rep.max_transition = trans_times.iter().copied().max().unwrap_or_default();
    rep.median_transition = median(trans_times);
    rep.median_transition_pause = median(trans_pauses);

    // The guest's text and the arena are as before.
    let text_after = read_text(&kernel, &ctl, func_len).map_err(|e| e.to_string())?;
    if text_after != text_before {
        return Err(format!(
            "{}'s {func_len} bytes changed: {text_before:02x?} -> {text_after:02x?}",
            target.func()
        ));
    }
    if !e.list().is_empty() {
        return Err(format!("patches left after the soak: {:?}", e.list()));
    }
    if let Some(m) = e.arena().and_then(|a| a.mapping) {
        return Err(format!("the arena is still mapped: {m:?}"));
    }
    for &pa in &pages {
        let mut b = vec![0u8; 4096];
        ctl.memory()
            .read_phys(pa, &mut b)
            .map_err(|e| e.to_string())?;
        if b.iter().any(|&x| x != 0) {
            return Err(format!("arena page {pa:#x} is not zero after the soak"));
        }
    }
    drop(ctl);

    // What the hammers saw.
    g.run("killall -TERM hammer; sleep 1").map_err(e2s)?;
    for cpu in 0..vcpus {
        let out = g.run(&format!("cat /tmp/hammer{cpu}.out")).map_err(e2s)?;
        let h = parse_hammer(&out, cpu).ok_or_else(|| format!("no hammer report: {out:?}"))?;
        if h.errors > 0 {
            return Err(format!("hammer on cpu {cpu} had {} failed reads", h.errors));
        }
        for want in [original_line.as_str(), PATCHED, PATCHED_TOP] {
            if !h.seen.iter().any(|(_, s)| s == want) {
                return Err(format!(
                    "hammer on cpu {cpu} never saw {want:?}: {:?}",
                    h.seen
                ));
            }
        }
        if let Some((_, s)) = h
            .seen
            .iter()
            .find(|(_, s)| s != &original_line && s != PATCHED && s != PATCHED_TOP)
        {
            return Err(format!("hammer on cpu {cpu} saw unexpected output {s:?}"));
        }
        rep.hammers.push(h);
    }
    // The guest never complained and is healthy.
    let dmesg = g.run("dmesg").map_err(e2s)?;
    let new: Vec<String> = kernel_complaints(&dmesg)
        .into_iter()
        .filter(|l| !dmesg_before.contains(l))
        .collect();
    if !new.is_empty() || !kernel_complaints(&g.transcript()).is_empty() {
        return Err(format!(
            "the guest kernel complained:\n{}\n{}",
            new.join("\n"),
            kernel_complaints(&g.transcript()).join("\n")
        ));
    }
    if g.run(&format!("cat {path}")).map_err(e2s)? != original {
        return Err(format!("{path} differs after the soak"));
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hammer_reports_parse() {
        let text = "hammer 71 cpu 1: 10 calls, 1 distinct, 0 errors, 0 other\n  10 Linux version 6.1\nhammer 71 end\n\
                    hammer 71 cpu 1: 25 calls, 2 distinct, 1 errors, 0 other\n  20 Linux version 6.1\n  4 hvpatch soak: patched\nhammer 71 end\n";
        let h = parse_hammer(text, 1).unwrap();
        assert_eq!((h.calls, h.errors), (25, 1));
        assert_eq!(
            h.seen,
            vec![
                (20, "Linux version 6.1".to_string()),
                (4, PATCHED.to_string())
            ]
        );
        assert!(parse_hammer("", 0).is_none());
    }

    #[test]
    fn complaints_are_found() {
        let d = "[ 1.0] ok\n[ 2.0] BUG: unable to handle page fault for address: ffffffffa700102d\n[ 2.1] WARNING: CPU: 1 PID: 7 at lib/vsprintf.c:2659\n";
        assert_eq!(kernel_complaints(d).len(), 2);
        assert!(kernel_complaints("[ 1.0] all fine\n").is_empty());
    }
}
