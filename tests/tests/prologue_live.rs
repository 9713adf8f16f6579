//! The prologue rewrite (issue 9) on booted 6.1 and 6.12 guests, through `hvpatch attach` and
//! the CLI, checked against the guest's own view:
//! - **no ftrace site**: `rb_simple_read` (kernel/trace is built without `-pg`; the guest's
//!   `available_filter_functions` does not list it, and its text has no NOP5 or call at the
//!   site) is patched by `patch load --immediate` while a `hammer` on every vCPU reads
//!   `/sys/kernel/tracing/tracing_on`; `patch info` shows the `prologue` method and the moved
//!   instructions; the console shows the new output; unload restores the function byte for
//!   byte;
//! - **after ftrace**: `version_proc_show` traced by the guest's function tracer
//!   (`set_ftrace_filter`, `current_tracer`) is patched (`after-ftrace`: the jmp after
//!   ftrace's call) under a `/proc/version` hammer; the trace still records its calls; the
//!   tracer goes off and on again with no ftrace warning; unload restores everything and, with
//!   the tracer off, the function's text is the original.
//!
//! - **consistency model** (`prologue_consistent_*`): a `cat` blocked in `trace_pipe` (inside
//!   `tracing_read_pipe`, no ftrace site) holds the transition of a consistent patch (which a
//!   disable reverses at once, and an enable starts again) wrapping
//!   `tracing_read_pipe` (its `HVPATCH_ORIG` runs the trampoline) while a new process already
//!   sees the new `tracing_on`; a `trace_marker` write lets it return and switch, and the
//!   transition completes; the disable transition is held by the reader inside the new
//!   function until it returns again; then 10 enable/disable transitions of a patch of
//!   `rb_simple_read` under a `tracing_on` hammer on every vCPU.
//!
//! Every step fails on any oops/BUG/WARNING on the console.

use std::time::{Duration, Instant};

use harness::soak::{assert_no_new_complaints, kernel_complaints, parse_hammer, SoakTarget};
use harness::{AttachServer, Guest, GuestSpec, KernelSeries};
use patcher::GuestControl;
use serde_json::Value;

const TRACING: &str = "/sys/kernel/tracing";
const NO_FTRACE: &str = "rb_simple_read";
const TRACED: &str = "version_proc_show";
const MSG_PROLOGUE: &str = "hvpatch prologue: patched";
const MSG_AFTER: &str = "hvpatch after-ftrace: patched";

/// Each function's address and whole text (its kallsyms size), read through a short attach of
/// our own (no server may be attached).
fn texts(g: &Guest, funcs: &[&str]) -> Vec<(u64, Vec<u8>)> {
    let (ctl, k, _) = harness::patching::attach_and_open(g);
    funcs
        .iter()
        .map(|f| {
            let a = k.lookup(f, None).unwrap_or_else(|e| panic!("{f}: {e}"));
            let size = k.symbolize(a).expect("symbol").size;
            assert!((16..=4096).contains(&size), "{f}: size {size}");
            let mut b = vec![0u8; size as usize];
            k.read_virt(ctl.memory(), a, &mut b)
                .unwrap_or_else(|e| panic!("reading {f}: {e}"));
            (a, b)
        })
        .collect()
}

/// The 5 bytes at the function's entry site (after the ENDBR or its poison).
fn site_bytes(text: &[u8]) -> [u8; 5] {
    let off = patcher::site::site_offset(text) as usize;
    text[off..off + 5].try_into().unwrap()
}

struct Live {
    g: Guest,
    srv: Option<AttachServer>,
    before: Vec<String>,
}

impl Live {
    fn run(&mut self, cmd: &str) -> String {
        self.g
            .run(cmd)
            .unwrap_or_else(|e| panic!("{cmd}: {e}\n{}", self.g.tail()))
    }

    fn srv(&self) -> &AttachServer {
        self.srv.as_ref().expect("server")
    }

    fn json(&self, args: &[&str]) -> Value {
        self.srv()
            .json(args)
            .unwrap_or_else(|e| panic!("hvpatch {args:?}: {e}\n{}", self.srv().log_text()))
    }

    fn healthy(&mut self, when: &str) {
        assert_no_new_complaints(&mut self.g, &self.before, when);
        let dmesg = self.run("dmesg");
        let ftrace: Vec<&str> = dmesg
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("ftrace") && (l.contains("bug") || l.contains("fail"))
            })
            .collect();
        assert!(ftrace.is_empty(), "{when}: ftrace complained: {ftrace:?}");
    }

    /// `patch load --immediate` of `obj`, retried while it is refused as busy (a context inside
    /// the bytes the rewrite moves); the loaded patch.
    fn load_immediate(&self, obj: &str) -> Value {
        for _ in 0..20 {
            let out = self
                .srv()
                .cli(&["patch", "load", obj, "--immediate", "--json"])
                .expect("hvpatch");
            if out.success {
                return serde_json::from_str(&out.stdout).expect("json");
            }
            assert!(
                out.stderr.contains("retry"),
                "load of {obj} failed: {}",
                out.stderr
            );
            eprintln!("busy, retried: {}", out.stderr.trim());
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("load of {obj}: busy 20 times");
    }

    /// Starts a `hammer` reading `path` on every vCPU, reporting to /tmp/`tag`N.out.
    fn hammers(&mut self, path: &str, tag: &str) {
        for cpu in 0..self.g.vcpus() {
            self.g
                .spawn(&format!(
                    "exec hammer {cpu} read {path} > /tmp/{tag}{cpu}.out 2>&1"
                ))
                .expect("hammer");
        }
    }

    /// Stops the hammers and checks that each saw exactly `want` (every one of them), without
    /// a failed read.
    fn hammers_saw(&mut self, tag: &str, want: &[&str]) {
        self.run("killall -TERM hammer; sleep 1");
        for cpu in 0..self.g.vcpus() {
            let out = self.run(&format!("cat /tmp/{tag}{cpu}.out"));
            let h = parse_hammer(&out, cpu).unwrap_or_else(|| panic!("no hammer report: {out:?}"));
            eprintln!(
                "hammer {tag} cpu {cpu}: {} reads, saw {:?}",
                h.calls, h.seen
            );
            assert_eq!(h.errors, 0, "hammer on cpu {cpu}: failed reads");
            for w in want {
                assert!(
                    h.seen.iter().any(|(_, s)| s == w),
                    "hammer on cpu {cpu} never saw {w:?}: {:?}",
                    h.seen
                );
            }
            assert!(
                h.seen.iter().all(|(_, s)| want.contains(&s.as_str())),
                "hammer on cpu {cpu} saw other output: {:?}",
                h.seen
            );
        }
    }

    /// The number of `func` lines in the trace buffer after clearing it and reading `path`.
    fn traced_calls(&mut self, func: &str, path: &str) -> usize {
        self.run(&format!("echo > {TRACING}/trace; cat {path} > /dev/null"));
        let out = self.run(&format!("grep -c ' {func} <-' {TRACING}/trace || true"));
        out.trim().parse().unwrap_or(0)
    }
}

fn object(tag: &str, target: SoakTarget, msg: &str) -> String {
    let p = std::env::temp_dir().join(format!("hvpatch-{}-{tag}.o", std::process::id()));
    std::fs::write(&p, target.patch(tag, msg)).expect("write object");
    p.display().to_string()
}

fn prologue_live(series: KernelSeries) {
    let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
    let before = kernel_complaints(&g.run("dmesg").expect("dmesg"));
    g.run(&format!(
        "[ -e {TRACING}/tracing_on ] || mount -t tracefs nodev {TRACING}"
    ))
    .expect("tracefs");
    // The guest's ftrace cannot trace the first function, and can trace the second.
    let (st, _) = g
        .run_status(&format!(
            "grep -qx {NO_FTRACE} {TRACING}/available_filter_functions"
        ))
        .unwrap();
    assert_eq!(st, 1, "{NO_FTRACE} is traceable on {series:?}");
    g.run(&format!(
        "grep -qx {TRACED} {TRACING}/available_filter_functions"
    ))
    .unwrap_or_else(|e| panic!("{TRACED} is not traceable: {e}"));
    let text0 = texts(&g, &[NO_FTRACE, TRACED]);
    let site = site_bytes(&text0[0].1);
    assert!(
        site != patcher::site::NOP5 && site[0] != 0xe8,
        "{NO_FTRACE} has an ftrace site: {site:02x?}"
    );
    assert_eq!(site_bytes(&text0[1].1), patcher::site::NOP5, "{TRACED}");
    let orig_on = g.run(&format!("cat {TRACING}/tracing_on")).unwrap();
    let orig_version = g.run("cat /proc/version").unwrap();
    let mut c = Live {
        g,
        srv: None,
        before,
    };

    // --- No ftrace site: a prologue rewrite, under a hammer on every vCPU.
    c.hammers(&format!("{TRACING}/tracing_on"), "pro");
    c.srv = Some(AttachServer::start(&c.g).expect("hvpatch attach"));
    let obj = object("noftrace", SoakTarget::Prologue, MSG_PROLOGUE);
    let v = c.load_immediate(&obj);
    let f = &v["functions"][0];
    assert_eq!(f["method"], "prologue", "{v:#}");
    let moved = f["moved"].as_array().expect("moved instructions");
    assert!(!moved.is_empty(), "{v:#}");
    let info = c.srv().cli_ok(&["patch", "info", "noftrace"]).unwrap();
    eprintln!("{series:?}: {info}");
    assert!(
        info.contains("prologue") && info.contains("moved to the trampoline"),
        "{info}"
    );
    for m in moved {
        let text = m["text"].as_str().expect("text");
        assert!(info.contains(text), "{text:?} not in {info}");
    }
    assert_eq!(
        c.run(&format!("cat {TRACING}/tracing_on")),
        format!("{MSG_PROLOGUE}\n")
    );
    std::thread::sleep(Duration::from_millis(1500));
    c.healthy("patched (prologue)");
    let u = c.json(&["patch", "unload", "noftrace"]);
    eprintln!("{series:?}: unload {u}");
    assert_eq!(c.run(&format!("cat {TRACING}/tracing_on")), orig_on);
    c.hammers_saw("pro", &[orig_on.trim_end(), MSG_PROLOGUE]);
    c.healthy("unloaded (prologue)");

    // --- The guest traces the function: the jmp goes after ftrace's call.
    // A small trace buffer: reading a full default one, formatted under TCG while the hammers
    // run, takes minutes.
    c.run(&format!(
        "echo 64 > {TRACING}/buffer_size_kb; echo {TRACED} > {TRACING}/set_ftrace_filter; \
         echo function > {TRACING}/current_tracer"
    ));
    assert!(c.traced_calls(TRACED, "/proc/version") > 0, "not traced");
    c.hammers("/proc/version", "aft");
    let obj = object("afterftrace", SoakTarget::FtraceSite, MSG_AFTER);
    let v = c.load_immediate(&obj);
    let f = &v["functions"][0];
    assert_eq!(f["method"], "after-ftrace", "{v:#}");
    let info = c.srv().cli_ok(&["patch", "info", "afterftrace"]).unwrap();
    eprintln!("{series:?}: {info}");
    assert!(info.contains("after-ftrace"), "{info}");
    assert_eq!(c.run("cat /proc/version"), format!("{MSG_AFTER}\n"));
    let n = c.traced_calls(TRACED, "/proc/version");
    assert!(n > 0, "the patched function is no longer traced");
    c.healthy("patched (after ftrace)");
    // Tracer off and on again while patched: ftrace rewrites its own 5 bytes, which it
    // verifies first. The hammers are stopped meanwhile: the guest's own text_poke_bp is not
    // safe under multi-threaded TCG (KLP-INTERNALS §10), and these are not hvpatch's writes.
    c.run("killall -STOP hammer");
    c.run(&format!("echo nop > {TRACING}/current_tracer"));
    assert_eq!(c.run("cat /proc/version"), format!("{MSG_AFTER}\n"));
    assert_eq!(c.traced_calls(TRACED, "/proc/version"), 0, "tracer off");
    c.run(&format!("echo function > {TRACING}/current_tracer"));
    c.run("killall -CONT hammer");
    assert_eq!(c.run("cat /proc/version"), format!("{MSG_AFTER}\n"));
    assert!(
        c.traced_calls(TRACED, "/proc/version") > 0,
        "not traced after the tracer came back"
    );
    std::thread::sleep(Duration::from_millis(1500));
    c.healthy("tracer off and on (after ftrace)");
    let u = c.json(&["patch", "unload", "afterftrace"]);
    eprintln!("{series:?}: unload {u}");
    assert_eq!(c.run("cat /proc/version"), orig_version);
    assert!(
        c.traced_calls(TRACED, "/proc/version") > 0,
        "not traced after unload"
    );
    // The hammer keeps the first 120 bytes of a line.
    let first: String = orig_version
        .lines()
        .next()
        .unwrap()
        .chars()
        .take(120)
        .collect();
    c.hammers_saw("aft", &[first.as_str(), MSG_AFTER]);
    c.run(&format!(
        "echo nop > {TRACING}/current_tracer; echo > {TRACING}/set_ftrace_filter"
    ));
    c.healthy("at the end");
    let list = c.json(&["patch", "list"]);
    assert_eq!(list, serde_json::json!([]), "patches left");
    drop(c.srv.take());
    let text1 = texts(&c.g, &[NO_FTRACE, TRACED]);
    for ((name, (a, t0)), (_, t1)) in [NO_FTRACE, TRACED].iter().zip(&text0).zip(&text1) {
        assert!(t0 == t1, "{name} at {a:#x} differs at the end");
    }
    assert!(
        kernel_complaints(&c.g.transcript()).is_empty(),
        "console: {:?}",
        kernel_complaints(&c.g.transcript())
    );
}

/// A `tracing_read_pipe` wrapper counting the reads that returned, and `tracing_on` printing
/// the count (both functions have no ftrace site).
const READ_PIPE_PATCH: &str = "HVPATCH_NAME(\"readpipe\");\n\
    extern ssize_t simple_read_from_buffer(void *to, size_t count, long long *ppos, const void *from, size_t available);\n\
    HVPATCH_ORIG(ssize_t, tracing_read_pipe, (struct file *f, char *ubuf, size_t cnt, long long *ppos));\n\
    static unsigned long reads;\n\
    static ssize_t new_read_pipe(struct file *f, char *ubuf, size_t cnt, long long *ppos)\n\
    { ssize_t r = hvpatch_orig_tracing_read_pipe(f, ubuf, cnt, ppos); __atomic_fetch_add(&reads, 1, __ATOMIC_RELAXED); return r; }\n\
    static ssize_t rd(struct file *f, char *ubuf, size_t cnt, long long *ppos)\n\
    { char b[48]; int n = snprintf(b, sizeof(b), \"trace_pipe reads %lu\\n\", reads);\n\
      return simple_read_from_buffer(ubuf, cnt, ppos, b, n); }\n\
    HVPATCH_FUNC(tracing_read_pipe, new_read_pipe);\n\
    HVPATCH_FUNC(rb_simple_read, rd);";

const READ_PIPE: &str = "tracing_read_pipe";

impl Live {
    fn status(&self) -> Value {
        self.json(&["patch", "status"])
    }

    /// Waits until no transition runs.
    fn wait_complete(&self, within: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if s["transition"].is_null() {
                return s;
            }
            assert!(t0.elapsed() < within, "transition did not complete: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a transition-starting CLI command (`--no-wait` appended), retried while refused as
    /// busy (a context inside the moved bytes).
    fn start(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--no-wait", "--json"]);
        for _ in 0..20 {
            let out = self.srv().cli(&all).expect("hvpatch");
            if out.success {
                return serde_json::from_str(&out.stdout).expect("json");
            }
            assert!(out.stderr.contains("retry"), "{args:?}: {}", out.stderr);
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{args:?}: busy 20 times");
    }

    /// The blocking entry of `pid` in a running transition (panics if it does not block).
    fn blocked_by(&self, pid: u32, target: i64) -> Value {
        let s = self.status();
        let t = &s["transition"];
        assert_eq!(t["target"], target, "{s:#}");
        t["blocking"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["pid"] == pid)
            .cloned()
            .unwrap_or_else(|| panic!("{pid} does not block: {s:#}"))
    }
}

fn prologue_consistent(series: KernelSeries) {
    let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
    let before = kernel_complaints(&g.run("dmesg").expect("dmesg"));
    g.run(&format!(
        "[ -e {TRACING}/tracing_on ] || mount -t tracefs nodev {TRACING}"
    ))
    .expect("tracefs");
    for f in [READ_PIPE, NO_FTRACE] {
        let (st, _) = g
            .run_status(&format!(
                "grep -qx {f} {TRACING}/available_filter_functions"
            ))
            .unwrap();
        assert_eq!(st, 1, "{f} is traceable on {series:?}");
    }
    let text0 = texts(&g, &[READ_PIPE, NO_FTRACE]);
    for (f, (_, t)) in [READ_PIPE, NO_FTRACE].iter().zip(&text0) {
        let site = site_bytes(t);
        assert!(
            site != patcher::site::NOP5 && site[0] != 0xe8,
            "{f} has an ftrace site: {site:02x?}"
        );
    }
    let orig_on = g.run(&format!("cat {TRACING}/tracing_on")).unwrap();
    let mut c = Live {
        g,
        srv: None,
        before,
    };
    // A reader blocked inside tracing_read_pipe.
    c.run("rm -f /tmp/tp.out");
    let reader =
        c.g.spawn(&format!("exec cat {TRACING}/trace_pipe > /tmp/tp.out"))
            .unwrap();
    let t0 = Instant::now();
    while !c
        .run(&format!("cat /proc/{reader}/stack"))
        .contains(READ_PIPE)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no reader in {READ_PIPE}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.srv = Some(AttachServer::start(&c.g).expect("hvpatch attach"));
    let obj = {
        let p = std::env::temp_dir().join(format!("hvpatch-{}-readpipe.o", std::process::id()));
        std::fs::write(
            &p,
            harness::patching::build_patch("readpipe", READ_PIPE_PATCH),
        )
        .expect("write object");
        p.display().to_string()
    };
    // A reversal first: the load's transition, held by the reader, is disabled; every task is
    // back on the original (the trampoline's way) at once.
    let v = c.start(&["patch", "load", &obj]);
    for f in v["functions"].as_array().unwrap() {
        assert_eq!(f["method"], "prologue", "{v:#}");
        assert!(!f["stub"].is_null(), "no dispatcher stub: {v:#}");
    }
    std::thread::sleep(Duration::from_millis(500));
    c.blocked_by(reader, 1);
    c.start(&["patch", "disable", "readpipe"]);
    let s = c.wait_complete(Duration::from_secs(20));
    let last = &s["patches"][0]["last_transition"];
    assert!(last["reversed"] == true && last["target"] == 0, "{s:#}");
    assert_eq!(c.run(&format!("cat {TRACING}/tracing_on")), orig_on);
    assert_eq!(
        c.run(&format!("cat /proc/{reader}/patch_state")).trim(),
        "-1"
    );
    c.healthy("reversed");
    // Enabled again: the reader holds this transition too.
    c.start(&["patch", "enable", "readpipe"]);
    std::thread::sleep(Duration::from_millis(500));
    // The reader holds the transition, with the old tracing_read_pipe on its stack.
    let b = c.blocked_by(reader, 1);
    assert_eq!(b["why"]["kind"], "on_stack", "{b:#}");
    assert!(
        b["why"]["frame"].as_str().unwrap().starts_with(READ_PIPE),
        "{b:#}"
    );
    assert_eq!(
        c.run(&format!("cat /proc/{reader}/patch_state")).trim(),
        "0"
    );
    // Everyone else runs the new code.
    assert_eq!(
        c.run(&format!("cat {TRACING}/tracing_on")),
        "trace_pipe reads 0\n"
    );
    assert_eq!(c.run("cat /proc/self/patch_state").trim(), "1");
    c.healthy("transition held by the reader");
    // The reader returns (the old function, run from the trampoline's way back), switches, and
    // blocks again inside the new function, which calls the original through the trampoline.
    c.run(&format!("echo wake1 > {TRACING}/trace_marker"));
    c.wait_complete(Duration::from_secs(20));
    assert_eq!(
        c.run(&format!("cat {TRACING}/tracing_on")),
        "trace_pipe reads 0\n"
    );
    c.run(&format!("echo wake2 > {TRACING}/trace_marker"));
    let t0 = Instant::now();
    while c.run(&format!("cat {TRACING}/tracing_on")) != "trace_pipe reads 1\n" {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new read never returned"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Disabling: the reader, inside the new function, holds it until it returns.
    c.start(&["patch", "disable", "readpipe"]);
    std::thread::sleep(Duration::from_millis(500));
    let b = c.blocked_by(reader, 0);
    assert_eq!(b["why"]["kind"], "on_stack", "{b:#}");
    assert_eq!(c.run(&format!("cat {TRACING}/tracing_on")), orig_on);
    c.run(&format!("echo wake3 > {TRACING}/trace_marker"));
    c.wait_complete(Duration::from_secs(20));
    assert_eq!(c.run(&format!("cat {TRACING}/tracing_on")), orig_on);
    // The reader reads on in the original.
    c.run(&format!("echo wake4 > {TRACING}/trace_marker"));
    let t0 = Instant::now();
    loop {
        let out = c.run("cat /tmp/tp.out");
        if out.contains("wake4") {
            for w in ["wake1", "wake2", "wake3"] {
                assert!(out.contains(w), "{w} not read: {out}");
            }
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "wake4 not read: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unloaded once the reader is gone: a slot of its sleeping stack may still hold the
    // return address into the new function of an earlier read (the guest's own
    // /proc/PID/stack shows no such frame), which the conservative unload scan counts.
    c.run(&format!("kill {reader}"));
    c.json(&["patch", "unload", "readpipe"]);
    c.healthy("after the blocked-reader transitions");

    // Enable/disable transitions under a hammer on every vCPU.
    c.hammers(&format!("{TRACING}/tracing_on"), "con");
    let obj = object("consoak", SoakTarget::Prologue, MSG_PROLOGUE);
    c.start(&["patch", "load", &obj]);
    c.wait_complete(Duration::from_secs(20));
    for i in 0..10 {
        c.start(&["patch", "disable", "consoak"]);
        c.wait_complete(Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50 + 37 * i));
        c.start(&["patch", "enable", "consoak"]);
        c.wait_complete(Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50 + 23 * i));
    }
    let last = c.json(&["patch", "info", "consoak"]);
    eprintln!("{series:?}: last transition {}", last["last_transition"]);
    c.healthy("enable/disable under load");
    c.start(&["patch", "disable", "consoak"]);
    c.wait_complete(Duration::from_secs(20));
    c.json(&["patch", "unload", "consoak"]);
    c.hammers_saw("con", &[orig_on.trim_end(), MSG_PROLOGUE]);
    c.healthy("at the end");
    drop(c.srv.take());
    let text1 = texts(&c.g, &[READ_PIPE, NO_FTRACE]);
    for ((name, (a, t0)), (_, t1)) in [READ_PIPE, NO_FTRACE].iter().zip(&text0).zip(&text1) {
        assert!(t0 == t1, "{name} at {a:#x} differs at the end");
    }
    assert!(
        kernel_complaints(&c.g.transcript()).is_empty(),
        "console: {:?}",
        kernel_complaints(&c.g.transcript())
    );
}

#[test]
fn prologue_consistent_6_1() {
    prologue_consistent(KernelSeries::V6_1);
}

#[test]
fn prologue_consistent_6_12() {
    prologue_consistent(KernelSeries::V6_12);
}

#[test]
fn prologue_live_6_1() {
    prologue_live(KernelSeries::V6_1);
}

#[test]
fn prologue_live_6_12() {
    prologue_live(KernelSeries::V6_12);
}
