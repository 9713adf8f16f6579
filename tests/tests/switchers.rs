//! The two mechanisms that switch tasks at the kernel-exit and idle boundaries, on booted 6.1
//! and 6.12 guests (2 vCPUs), through `hvpatch attach` and the CLI:
//! - **guest hooks** (`--switcher guest-hooks`, the default): `klp_target_state` plus
//!   `TIF_PATCH_PENDING`, acted on by the guest's own `klp_update_patch_state()`;
//! - **boundary breakpoints** (`--switcher breakpoints`): hardware breakpoints at
//!   `syscall_exit_to_user_mode`, `irqentry_exit_to_user_mode` and `do_idle`; each hit is a VM
//!   exit in which hvpatch switches the vCPU's task.
//!
//! For each mechanism:
//! - **a reader that blocks again at once**: `cat` on a fifo that a writer keeps open sleeps in
//!   `pipe_read` and holds a patch of `pipe_read`. A stack check can never switch it (the old
//!   `pipe_read` is on its stack whenever it is not running); only its return to user space
//!   can. One write wakes it: it returns to user space, switches there, and reads again, now in
//!   the new `pipe_read`, which counts the read. The transition completes by itself; with
//!   breakpoints, `status` counted boundary hits meanwhile and the guest's own klp
//!   (`/proc/PID/patch_state`) agrees.
//! - **sleepers**: four `hammer N nanosleep` tasks (asleep in `hrtimer_nanosleep` nearly always,
//!   back in user space every millisecond) hold a wrapper patch of `hrtimer_nanosleep`; enable
//!   and disable transitions complete through their boundary crossings. Timed per mechanism
//!   (`last_transition`: elapsed time, vCPU pause, hits), printed side by side for the README.
//! - **the cost of one dispatched call**: calls of `nr_processes` through its entry, timed in the
//!   guest against calls of its original body in interleaved rounds (an immediate patch of
//!   `/proc/cmdline` runs the loops), unpatched, wrapped by a patch whose transition a fifo
//!   reader holds (every call goes through the dispatcher stub), and wrapped after the
//!   transition (the entry jumps straight to the new function); printed.
//!
//! Every step fails on any oops/BUG/WARNING on the console, and the patched entries are byte for
//! byte the original at the end.

use std::time::{Duration, Instant};

use harness::patching::{entry_bytes, patch_file, PIPE_COUNT_PATCH};
use harness::soak::kernel_complaints;
use harness::{AttachServer, Guest, GuestSpec, KernelSeries};
use serde_json::Value;

/// `hrtimer_nanosleep` counting its calls; `/proc/version` prints the count.
const SLEEP_PATCH: &str = "typedef long long ktime_t;\n\
    HVPATCH_ORIG(long, hrtimer_nanosleep, (ktime_t rqtp, int mode, int clockid));\n\
    static unsigned long sleeps;\n\
    static long new_sleep(ktime_t rqtp, int mode, int clockid)\n\
    { __atomic_fetch_add(&sleeps, 1, __ATOMIC_RELAXED); return hvpatch_orig_hrtimer_nanosleep(rqtp, mode, clockid); }\n\
    static int show(struct seq_file *m, void *v) { seq_printf(m, \"sleeps %lu\\n\", sleeps); return 0; }\n\
    HVPATCH_FUNC(hrtimer_nanosleep, new_sleep);\n\
    HVPATCH_FUNC(version_proc_show, show);";

/// Immediate: reading `/proc/cmdline` times, in 10 interleaved rounds, 20 000 calls of
/// `nr_processes` through its entry and 20 000 of its original body past the entry (what the
/// entry costs is the difference, measured under the same conditions): `loop <entry ns>
/// <body ns>`.
const TIMER_PATCH: &str = "HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE);\n\
    extern int nr_processes(void); extern long long ktime_get(void);\n\
    HVPATCH_ORIG(int, nr_processes, (void));\n\
    static int show(struct seq_file *m, void *v) { long long a = 0, b = 0, t0, t1; long s = 0; int i, r;\n\
      for (r = 0; r < 10; r++) {\n\
        t0 = ktime_get(); for (i = 0; i < 20000; i++) s += nr_processes();\n\
        t1 = ktime_get(); for (i = 0; i < 20000; i++) s += hvpatch_orig_nr_processes();\n\
        a += t1 - t0; b += ktime_get() - t1; }\n\
      seq_printf(m, \"loop %lld %lld %ld\\n\", a, b, s); return 0; }\n\
    HVPATCH_FUNC(cmdline_proc_show, show);";

/// An `nr_processes` wrapper (whose calls are timed) and a `pipe_read` wrapper (whose blocked
/// reader holds the transition, so that `nr_processes` goes through its dispatcher).
const DISPATCH_PATCH: &str = "struct kiocb; struct iov_iter;\n\
    HVPATCH_ORIG(int, nr_processes, (void));\n\
    HVPATCH_ORIG(ssize_t, pipe_read, (struct kiocb *iocb, struct iov_iter *to));\n\
    static int new_nr(void) { return hvpatch_orig_nr_processes(); }\n\
    static ssize_t new_pipe_read(struct kiocb *iocb, struct iov_iter *to) { return hvpatch_orig_pipe_read(iocb, to); }\n\
    HVPATCH_FUNC(nr_processes, new_nr);\n\
    HVPATCH_FUNC(pipe_read, new_pipe_read);";

const FUNCS: &[&str] = &[
    "pipe_read",
    "cmdline_proc_show",
    "version_proc_show",
    "hrtimer_nanosleep",
    "nr_processes",
];

struct Ctx {
    g: Guest,
    srv: AttachServer,
    before: Vec<String>,
}

impl Ctx {
    fn json(&self, args: &[&str]) -> Value {
        self.srv
            .json(args)
            .unwrap_or_else(|e| panic!("hvpatch {args:?}: {e}\n{}", self.srv.log_text()))
    }

    fn run(&mut self, cmd: &str) -> String {
        self.g.run(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    fn healthy(&mut self, when: &str) {
        harness::soak::assert_no_new_complaints(&mut self.g, &self.before, when);
    }

    fn status(&self) -> Value {
        self.json(&["patch", "status"])
    }

    fn wait_complete(&self, within: Duration) {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if s["transition"].is_null() {
                return;
            }
            assert!(t0.elapsed() < within, "transition did not complete: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of a `comm` task whose /proc/PID/stack shows `frame`.
    fn pid_in(&mut self, comm: &str, frame: &str) -> i64 {
        let t0 = Instant::now();
        loop {
            let out = self.run(&format!(
                "for p in $(pidof {comm}); do grep -q {frame} /proc/$p/stack && echo $p; done 2>/dev/null || true"
            ));
            if let Some(p) = out.lines().next().and_then(|l| l.trim().parse().ok()) {
                return p;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no {comm} in {frame}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn last_transition(v: &Value) -> &Value {
    let t = &v["last_transition"];
    assert!(t.is_object(), "no last_transition: {v:#}");
    t
}

/// The reader test for one mechanism (see the module docs).
fn reader_switches_at_its_exit(c: &mut Ctx, switcher: &str) {
    c.run("rm -f /tmp/f /tmp/out; mkfifo /tmp/f");
    c.g.spawn("cat /tmp/f > /tmp/out").unwrap();
    c.g.spawn("sleep 100000 > /tmp/f").unwrap();
    let reader = c.pid_in("cat", "pipe_read");
    let obj = patch_file("pipecount", PIPE_COUNT_PATCH);
    c.json(&["patch", "load", &obj, "--no-wait", "--switcher", switcher]);
    std::thread::sleep(Duration::from_millis(800));
    let s = c.status();
    let t = &s["transition"];
    assert_eq!(t["patch"], "pipecount", "{s:#}");
    assert_eq!(t["switcher"], switcher.replace('-', "_"), "{s:#}");
    assert!(
        t["blocking"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["pid"] == reader),
        "the reader {reader} does not hold the transition: {s:#}"
    );
    assert_eq!(
        c.run(&format!("cat /proc/{reader}/patch_state")).trim(),
        "0"
    );
    if switcher == "breakpoints" {
        // The shell's and cat's syscalls just crossed syscall_exit_to_user_mode.
        let s = c.status();
        assert!(
            s["transition"]["boundary_hits"][0].as_u64().unwrap() > 0,
            "no boundary breakpoint hit: {s:#}"
        );
    }
    // One write: the reader returns to user space (switching there) and reads again at once.
    c.run("echo hello > /tmp/f");
    c.wait_complete(Duration::from_secs(30));
    let info = c.json(&["patch", "info", "pipecount"]);
    let lt = last_transition(&info);
    assert_eq!(lt["switcher"], switcher.replace('-', "_"), "{info:#}");
    assert_eq!(lt["target"], 1, "{info:#}");
    if switcher == "breakpoints" {
        assert!(
            lt["boundary_hits"][1].as_u64().unwrap() >= 1,
            "no task was switched by a boundary breakpoint: {info:#}"
        );
    }
    assert_eq!(c.run("cat /tmp/out"), "hello\n");
    assert_eq!(
        c.run(&format!("cat /proc/{reader}/patch_state")).trim(),
        "-1"
    );
    // The reader now sleeps in the new pipe_read: the next read is counted.
    let count = |c: &mut Ctx| -> u64 {
        let out = c.run("cat /proc/cmdline");
        out.trim()
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let n1 = count(c);
    c.run("echo again > /tmp/f");
    std::thread::sleep(Duration::from_millis(300));
    let n2 = count(c);
    assert!(n2 > n1, "the new pipe_read did not count: {n1} -> {n2}");
    // Unpatching the same way: the reader holds it inside the new pipe_read until a write.
    c.json(&[
        "patch",
        "disable",
        "pipecount",
        "--no-wait",
        "--switcher",
        switcher,
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status();
    assert_eq!(s["transition"]["target"], 0, "{s:#}");
    c.run("echo bye > /tmp/f");
    c.wait_complete(Duration::from_secs(30));
    c.run("kill $(pidof cat) $(pidof sleep) 2>/dev/null; true");
    c.json(&["patch", "unload", "pipecount", "--timeout", "30"]);
    c.healthy(&format!("after the reader test ({switcher})"));
}

/// Median of `v`.
fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Enable/disable cycles of the sleepers' patch under one mechanism; returns the medians of
/// (elapsed ms, pause µs, boundary hits) per transition.
fn sleeper_cycles(c: &mut Ctx, switcher: &str, cycles: usize) -> (u64, u64, u64) {
    let (mut ms, mut pause, mut hits) = (vec![], vec![], vec![]);
    for _ in 0..cycles {
        for op in ["enable", "disable"] {
            let v = c.json(&[
                "patch",
                op,
                "sleepcount",
                "--timeout",
                "60",
                "--switcher",
                switcher,
            ]);
            let lt = last_transition(&v);
            assert_eq!(lt["switcher"], switcher.replace('-', "_"), "{v:#}");
            ms.push(lt["elapsed_ms"].as_u64().unwrap());
            pause.push(lt["pause_us"].as_u64().unwrap());
            hits.push(lt["boundary_hits"][0].as_u64().unwrap());
        }
    }
    eprintln!("sleepers, {switcher}: ms {ms:?}, pause µs {pause:?}, hits {hits:?}");
    (median(ms), median(pause), median(hits))
}

fn sleepers(c: &mut Ctx) -> Vec<String> {
    for cpu in [0, 0, 1, 1] {
        c.g.spawn(&format!("exec hammer {cpu} nanosleep > /dev/null"))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let obj = patch_file("sleepcount", SLEEP_PATCH);
    c.json(&["patch", "load", &obj, "--timeout", "60"]);
    let out = c.run("cat /proc/version");
    assert!(out.starts_with("sleeps "), "{out}");
    c.json(&["patch", "disable", "sleepcount", "--timeout", "60"]);
    let mut rows = Vec::new();
    for switcher in ["guest-hooks", "breakpoints"] {
        let (ms, pause, hits) = sleeper_cycles(c, switcher, 5);
        rows.push(format!(
            "4 nanosleep loops, {switcher}: transition median {ms} ms, vCPU pause {pause} µs, {hits} boundary hits"
        ));
        // The hammers are still fine, and the patch works.
        c.json(&["patch", "enable", "sleepcount", "--timeout", "60"]);
        let n1: u64 = c.run("cat /proc/version").trim()[7..].parse().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let n2: u64 = c.run("cat /proc/version").trim()[7..].parse().unwrap();
        assert!(
            n2 > n1,
            "the new hrtimer_nanosleep is not called: {n1} -> {n2}"
        );
        c.json(&["patch", "disable", "sleepcount", "--timeout", "60"]);
        c.healthy(&format!("after the sleepers ({switcher})"));
    }
    c.json(&["patch", "unload", "sleepcount", "--timeout", "30"]);
    c.run("kill -TERM $(pidof hammer); sleep 1; true");
    rows
}

/// ns per `nr_processes` call through its entry, and what the entry adds to a call of the
/// original body, as the timer patch measures them (medians of 5 reads).
fn ns_per_call(c: &mut Ctx) -> (f64, f64) {
    let (mut entry, mut extra) = (vec![], vec![]);
    for _ in 0..5 {
        let out = c.run("cat /proc/cmdline");
        let n: Vec<i64> = out
            .split_whitespace()
            .skip(1)
            .take(2)
            .filter_map(|n| n.parse().ok())
            .collect();
        let [a, b] = n[..] else {
            panic!("timer patch: {out}")
        };
        entry.push(a as f64 / 200_000.0);
        extra.push((a - b) as f64 / 200_000.0);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (med(entry), med(extra))
}

fn dispatch_cost(c: &mut Ctx) -> String {
    c.json(&["patch", "load", &patch_file("timer", TIMER_PATCH)]);
    let unpatched = ns_per_call(c);
    c.run("rm -f /tmp/f; mkfifo /tmp/f");
    c.g.spawn("cat /tmp/f > /dev/null").unwrap();
    c.g.spawn("sleep 100000 > /tmp/f").unwrap();
    let reader = c.pid_in("cat", "pipe_read");
    let obj = patch_file("dispatch", DISPATCH_PATCH);
    c.json(&["patch", "load", &obj, "--no-wait"]);
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status();
    assert!(
        s["transition"]["blocking"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["pid"] == reader)),
        "the reader does not hold the transition: {s:#}"
    );
    let dispatched = ns_per_call(c);
    assert!(
        !c.status()["transition"].is_null(),
        "the transition ended early"
    );
    c.run("echo x > /tmp/f");
    c.wait_complete(Duration::from_secs(30));
    let direct = ns_per_call(c);
    c.run("kill $(pidof cat) $(pidof sleep) 2>/dev/null; true");
    c.json(&["patch", "unload", "dispatch", "--timeout", "30"]);
    c.json(&["patch", "unload", "timer"]);
    c.healthy("after the dispatch-cost run");
    format!(
        "nr_processes: {:.1} ns/call unpatched; the entry adds {:.1} ns to the original body \
         unpatched, {:.1} ns wrapped through the dispatcher, {:.1} ns wrapped and jumped to \
         directly: one dispatch costs {:.1} ns",
        unpatched.0,
        unpatched.1,
        dispatched.1,
        direct.1,
        dispatched.1 - direct.1
    )
}

/// Median vCPU pause of 10 immediate loads and of 10 consistent ones (their whole transition)
/// of the same one-function patch, on a guest where no task is in the way.
fn pause_vs_immediate(c: &mut Ctx) -> String {
    let obj = patch_file(
        "ver",
        "static int show(struct seq_file *m, void *v) { seq_printf(m, \"v\\n\"); return 0; }\n\
        HVPATCH_FUNC(version_proc_show, show);",
    );
    let (mut imm, mut cons) = (vec![], vec![]);
    for _ in 0..10 {
        let v = c.json(&["patch", "load", &obj, "--immediate"]);
        imm.push(v["pause_us"].as_u64().unwrap());
        c.json(&["patch", "unload", "ver"]);
        let v = c.json(&["patch", "load", &obj]);
        cons.push(last_transition(&v)["pause_us"].as_u64().unwrap());
        c.json(&["patch", "unload", "ver"]);
    }
    if std::env::var("HVPATCH_LOG").is_ok() {
        for l in c
            .srv
            .log_text()
            .lines()
            .filter(|l| l.contains("first check"))
            .take(12)
        {
            eprintln!("{l}");
        }
    }
    let (i, k) = (median(imm), median(cons));
    format!(
        "pause of a load: immediate {i} µs, consistent (whole transition) {k} µs: {:.2}×",
        k as f64 / i.max(1) as f64
    )
}

fn switchers(series: KernelSeries) {
    let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
    let before = kernel_complaints(&g.run("dmesg").expect("dmesg"));
    let text = entry_bytes(&g, FUNCS, None);
    let srv = AttachServer::start(&g).expect("hvpatch attach");
    let release = g.run("uname -r").unwrap().trim().to_string();
    let mut c = Ctx { g, srv, before };
    for switcher in ["guest-hooks", "breakpoints"] {
        reader_switches_at_its_exit(&mut c, switcher);
    }
    let mut rows = sleepers(&mut c);
    rows.push(dispatch_cost(&mut c));
    rows.push(pause_vs_immediate(&mut c));
    c.healthy("at the end");
    let Ctx { g, srv, .. } = c;
    drop(srv);
    let now = entry_bytes(&g, FUNCS, Some(&text));
    for ((name, addr, a), (_, _, b)) in text.iter().zip(&now) {
        assert_eq!(a, b, "{name} at {addr:#x} differs at the end");
    }
    for r in rows {
        eprintln!("switchers {release}: {r}");
    }
}

#[test]
fn switchers_6_1() {
    switchers(KernelSeries::V6_1);
}

#[test]
fn switchers_6_12() {
    switchers(KernelSeries::V6_12);
}
