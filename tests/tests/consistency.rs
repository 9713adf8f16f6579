//! The consistency model on booted 6.1 and 6.12 guests (2 vCPUs), through `hvpatch attach` and
//! the CLI, checked against the guest's own view (/proc/PID/patch_state, /proc/PID/stack, the
//! output of the patched code, dmesg):
//! - **blocked task**: a reader blocked in `pipe_read` holds the patching transition of a
//!   patch replacing `pipe_read`; `status` names it with its stack while every other task
//!   already runs the new code; writing the fifo lets it return, and the transition completes;
//!   unloading is held by the same reader, now inside the new `pipe_read`, until it returns;
//! - **fork**: a process forked during the transition starts in its parent's state;
//! - **syscall hammer**: `getpid` hammered on both vCPUs is patched; each hammer switches at its
//!   kernel exit and the new function sees every hammer;
//! - **busy target**: `kthreadd` sleeps in the patched function forever; hvpatch is killed
//!   mid-transition (the guest stays consistent) and a new `hvpatch attach` continues it from its
//!   state file, then again with the state file gone, from the journal in guest memory (not
//!   with another host key); disabling reverses the transition at once and the guest is unchanged;
//! - **function pair**: two functions whose new versions are only right together never mix
//!   within a task under repeated enable/disable with hammers; an immediate patch does mix.
//!
//! Every step fails on any oops/BUG/WARNING on the console, and the patched entries are byte for
//! byte the original at the end.

use std::time::{Duration, Instant};

use harness::patching::{patch_file, PIPE_COUNT_PATCH};
use harness::soak::{kernel_complaints, parse_hammer};
use harness::{AttachServer, Guest, GuestSpec, KernelSeries};
use serde_json::Value;

/// `pipe_read` calling the original and counting the calls that returned (so a reader blocked
/// in it has the new function on its stack), and `/proc/cmdline` printing the count.
/// `__x64_sys_getpid` recording the tgids it returns; `/proc/cmdline` lists them.
const GETPID_PATCH: &str = "struct pt_regs;\n\
    HVPATCH_ORIG(long, __x64_sys_getpid, (const struct pt_regs *regs));\n\
    static long seen[64]; static int nseen;\n\
    static long new_getpid(const struct pt_regs *regs) {\n\
      long r = hvpatch_orig___x64_sys_getpid(regs); int i, n = __atomic_load_n(&nseen, __ATOMIC_RELAXED);\n\
      for (i = 0; i < n && i < 64; i++) if (seen[i] == r) return r;\n\
      i = __atomic_fetch_add(&nseen, 1, __ATOMIC_RELAXED); if (i < 64) seen[i] = r; return r; }\n\
    static int show(struct seq_file *m, void *v) { int i;\n\
      seq_printf(m, \"getpid saw\"); for (i = 0; i < nseen && i < 64; i++) seq_printf(m, \" %ld\", seen[i]);\n\
      seq_printf(m, \"\\n\"); return 0; }\n\
    HVPATCH_FUNC(__x64_sys_getpid, new_getpid);\n\
    HVPATCH_FUNC(cmdline_proc_show, show);";

/// `kthreadd` as a wrapper of itself: kthreadd (pid 2) sleeps in it forever.
const KTHREADD_PATCH: &str = "HVPATCH_ORIG(int, kthreadd, (void *unused));\n\
    static int new_kthreadd(void *unused) { return hvpatch_orig_kthreadd(unused); }\n\
    HVPATCH_FUNC(kthreadd, new_kthreadd);";

/// The base of the function-pair test (immediate): `/proc/cmdline` calls `nr_processes` twice,
/// 20 ms apart, and prints `old` + N/O for each call (N: the new `nr_processes` answered).
const PAIR_BASE: &str = "HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE);\n\
    extern int nr_processes(void); extern void msleep(unsigned int);\n\
    static int show(struct seq_file *m, void *v) { int a = nr_processes(); msleep(20); int b = nr_processes();\n\
      seq_printf(m, \"old %c%c\\n\", a == 777777 ? 'N' : 'O', b == 777777 ? 'N' : 'O'); return 0; }\n\
    HVPATCH_FUNC(cmdline_proc_show, show);";

/// The pair: a new `/proc/cmdline` (`new` + N/O) and a new `nr_processes` (777777). Correct only
/// together: `old N…`, `old …N`, `new O…` or `new …O` is a mix within one call chain.
fn pair(immediate: bool) -> String {
    format!(
        "{}extern void msleep(unsigned int);\n\
         static int new_nr(void) {{ return 777777; }}\n\
         static int show(struct seq_file *m, void *v) {{ int a = new_nr_call(); msleep(20); int b = new_nr_call();\n\
           seq_printf(m, \"new %c%c\\n\", a == 777777 ? 'N' : 'O', b == 777777 ? 'N' : 'O'); return 0; }}\n\
         HVPATCH_FUNC(cmdline_proc_show, show);\n\
         HVPATCH_FUNC(nr_processes, new_nr);",
        if immediate {
            "HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE);\n"
        } else {
            ""
        }
    )
    // The new show calls the guest's `nr_processes` through its entry (so the dispatcher picks
    // the version by the task's state), not `new_nr` directly.
    .replace(
        "static int new_nr(void)",
        "extern int nr_processes(void);\n#define new_nr_call nr_processes\nstatic int new_nr(void)",
    )
}

struct Ctx {
    g: Guest,
    srv: Option<AttachServer>,
    before: Vec<String>,
    /// (function, its first 16 bytes before any patch).
    text: Vec<(String, u64, Vec<u8>)>,
}

const FUNCS: &[&str] = &[
    "pipe_read",
    "cmdline_proc_show",
    "__x64_sys_getpid",
    "kthreadd",
    "nr_processes",
];

impl Ctx {
    fn boot(series: KernelSeries) -> Ctx {
        let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
        let text = read_text(&g, None);
        let before = kernel_complaints(&g.run("dmesg").expect("dmesg"));
        let srv = AttachServer::start(&g).expect("hvpatch attach");
        Ctx {
            g,
            srv: Some(srv),
            before,
            text,
        }
    }

    fn srv(&self) -> &AttachServer {
        self.srv.as_ref().expect("server")
    }

    fn json(&self, args: &[&str]) -> Value {
        self.srv()
            .json(args)
            .unwrap_or_else(|e| panic!("hvpatch {args:?}: {e}\n{}", self.srv().log_text()))
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

    /// /proc/PID/patch_state of every process in the guest.
    fn proc_states(&mut self) -> Vec<(i32, i32)> {
        let out = self.run(
            "for d in /proc/[0-9]*; do s=$(cat $d/patch_state 2>/dev/null) && echo ${d#/proc/} $s; done",
        );
        out.lines()
            .filter_map(|l| {
                let (a, b) = l.split_once(' ')?;
                Some((a.parse().ok()?, b.trim().parse().ok()?))
            })
            .collect()
    }

    /// Ends the server and checks the patched functions are byte for byte the original.
    fn finish(mut self) {
        self.healthy("at the end");
        drop(self.srv.take());
        let now = read_text(&self.g, Some(&self.text));
        for ((name, addr, a), (_, _, b)) in self.text.iter().zip(&now) {
            assert_eq!(a, b, "{name} at {addr:#x} differs at the end");
        }
    }
}

/// The first 16 bytes of each of [`FUNCS`].
fn read_text(g: &Guest, like: Option<&[(String, u64, Vec<u8>)]>) -> Vec<(String, u64, Vec<u8>)> {
    harness::patching::entry_bytes(g, FUNCS, like)
}

fn pid_of_stack(c: &mut Ctx, comm: &str, frame: &str) -> i32 {
    let t0 = Instant::now();
    loop {
        let out = c.run(&format!(
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

fn blocked_task(c: &mut Ctx) {
    c.run("rm -f /tmp/f /tmp/out; mkfifo /tmp/f");
    c.g.spawn("cat /tmp/f > /tmp/out").unwrap();
    c.g.spawn("sleep 100000 > /tmp/f").unwrap();
    let reader = pid_of_stack(c, "cat", "pipe_read");
    let obj = patch_file("pipecount", PIPE_COUNT_PATCH);
    let v = c.json(&["patch", "load", &obj, "--no-wait"]);
    assert_eq!(v["name"], "pipecount", "{v:#}");
    // The reader holds the transition, with pipe_read on its stack.
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status();
    let t = &s["transition"];
    assert_eq!(t["patch"], "pipecount", "{s:#}");
    assert_eq!(t["target"], 1, "{s:#}");
    let blocking = t["blocking"].as_array().unwrap();
    let b = blocking
        .iter()
        .find(|b| b["pid"] == reader)
        .unwrap_or_else(|| panic!("the reader {reader} does not block: {s:#}"));
    assert_eq!(b["why"]["kind"], "on_stack", "{b:#}");
    assert!(
        b["why"]["frame"].as_str().unwrap().starts_with("pipe_read"),
        "{b:#}"
    );
    assert!(
        b["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().starts_with("vfs_read")),
        "{b:#}"
    );
    // Everyone else runs the new code: a new process sees it, the reader is still unpatched.
    let out = c.run("cat /proc/cmdline");
    assert!(out.starts_with("pipe patched "), "{out}");
    // Fork: a child of a patched shell starts patched.
    assert_eq!(c.run("cat /proc/self/patch_state").trim(), "1");
    // The guest's /proc agrees with status for every task both list.
    let states = |c: &Ctx| -> std::collections::BTreeMap<i64, i64> {
        c.status()["transition"]["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["pid"].as_i64().unwrap(),
                    t["patch_state"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let ours = states(c);
    let proc = c.proc_states();
    let ours2 = states(c);
    let mut compared = 0;
    for (pid, st) in &proc {
        let (pid, st) = (i64::from(*pid), i64::from(*st));
        // Only tasks whose state was the same before and after the /proc read.
        if let (Some(a), Some(b)) = (ours.get(&pid), ours2.get(&pid)) {
            if a == b {
                assert_eq!(*a, st, "pid {pid}: status says {a}, /proc says {st}");
                compared += 1;
            }
        }
    }
    assert!(compared > 10, "only {compared} tasks compared");
    assert_eq!(proc.iter().find(|p| p.0 == reader).map(|p| p.1), Some(0));
    // Unblock the reader: it returns to user space and switches; the transition completes.
    c.run("echo hello > /tmp/f");
    c.wait_complete(Duration::from_secs(20));
    assert!(c.proc_states().iter().all(|&(_, s)| s == -1));
    assert_eq!(c.run("cat /tmp/out"), "hello\n");
    let n1: u64 = c
        .run("cat /proc/cmdline")
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    c.run("echo again > /tmp/f");
    std::thread::sleep(Duration::from_millis(300));
    let n2: u64 = c
        .run("cat /proc/cmdline")
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n2 > n1, "the new pipe_read did not count: {n1} -> {n2}");
    // Unload: the reader now sleeps inside the new pipe_read and holds the unpatching; a short
    // timeout reverses it (the patch stays enabled) and names the reader.
    let _ = pid_of_stack(c, "cat", "pipe_read");
    let r = c
        .srv()
        .cli(&["patch", "unload", "pipecount", "--timeout", "1"])
        .unwrap();
    assert!(
        !r.success,
        "unload should wait for the reader: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("reversed") && r.stderr.contains(&format!("pid {reader} (cat)")),
        "{}",
        r.stderr
    );
    let s = c.status();
    assert!(s["transition"].is_null(), "{s:#}");
    assert_eq!(s["patches"][0]["state"], "Enabled", "{s:#}");
    assert!(c.run("cat /proc/cmdline").starts_with("pipe patched "));
    // With time, the unload waits; the reader returns to user space once the fifo is written,
    // switches back there, and the unload completes.
    let srv = c.srv.as_ref().expect("server");
    let g = &mut c.g;
    let v = std::thread::scope(|sc| {
        let unload = sc.spawn(|| {
            srv.cli(&["patch", "unload", "pipecount", "--timeout", "20"])
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(1500));
        let s = srv.json(&["patch", "status"]).unwrap();
        assert_eq!(s["transition"]["target"], 0, "{s:#}");
        let b = s["transition"]["blocking"].as_array().unwrap();
        let me = b
            .iter()
            .find(|b| b["pid"] == reader)
            .unwrap_or_else(|| panic!("{s:#}"));
        // The new pipe_read (patch code, unwound through its frame pointer) is on its stack.
        assert_eq!(me["why"]["kind"], "on_stack", "{me:#}");
        assert!(
            me["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f.as_str().unwrap().starts_with("vfs_read")),
            "the unwind did not get through the patch frame: {me:#}"
        );
        g.run("echo bye > /tmp/f").unwrap();
        unload.join().unwrap()
    });
    // The transition completed once the reader had returned: the old code runs again. The
    // pages are freed at once, or, when the reader's stack still holds a stale copy of the
    // return address into the new pipe_read (the free check scans every stack slot), held
    // until that is gone: the reader exits here, and the server frees it by itself.
    assert!(c.status()["transition"].is_null());
    assert_ne!(c.run("cat /proc/cmdline").split(' ').next(), Some("pipe"));
    if !v.success {
        assert!(v.stderr.contains("held"), "{}", v.stderr);
        c.run("kill $(pidof cat) 2>/dev/null; true");
        let t0 = Instant::now();
        while !c.json(&["patch", "list"]).as_array().unwrap().is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the held patch was never freed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    c.run("kill $(pidof sleep) 2>/dev/null; true");
    c.healthy("after the blocked-task test");
}

fn syscall_hammer(c: &mut Ctx) {
    let h0 = c.g.spawn("exec hammer 0 getpid > /dev/null").unwrap();
    let h1 = c.g.spawn("exec hammer 1 getpid > /dev/null").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pids = c.run("pidof hammer");
    let obj = patch_file("getpid", GETPID_PATCH);
    for round in 0..3 {
        let v = c.json(&["patch", "load", &obj, "--timeout", "60"]);
        assert_eq!(v["state"], "Enabled", "{v:#}");
        assert!(c.status()["transition"].is_null());
        std::thread::sleep(Duration::from_millis(300));
        let saw = c.run("cat /proc/cmdline");
        for p in pids.split_whitespace() {
            assert!(
                saw.split_whitespace().any(|w| w == p),
                "round {round}: the new getpid never saw hammer {p}: {saw}"
            );
        }
        c.json(&["patch", "unload", "getpid", "--timeout", "60"]);
    }
    let _ = (h0, h1);
    let out = c.run("kill -TERM $(pidof hammer); sleep 1; true");
    let _ = out;
    c.healthy("after the getpid hammer");
}

fn busy_target(c: &mut Ctx) {
    let obj = patch_file("kthreadd", KTHREADD_PATCH);
    c.json(&["patch", "load", &obj, "--no-wait"]);
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status();
    let t = &s["transition"];
    assert_eq!(t["patch"], "kthreadd", "{s:#}");
    assert!(
        t["blocking"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["pid"] == 2 && b["why"]["kind"] == "on_stack"),
        "kthreadd (pid 2) does not block: {s:#}"
    );
    // Others switched: init (pid 1, sleeping in wait) is patched.
    assert_eq!(c.run("cat /proc/1/patch_state").trim(), "1");
    assert_eq!(c.run("cat /proc/2/patch_state").trim(), "0");
    // Restart: hvpatch dies mid-transition. The guest stays consistent (each task keeps its
    // state, new processes start patched), and a new `hvpatch attach` continues from the state
    // file next to its socket.
    c.srv.as_mut().unwrap().kill_hard();
    drop(c.srv.take());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.run("cat /proc/self/patch_state").trim(), "1");
    assert_eq!(c.run("cat /proc/2/patch_state").trim(), "0");
    c.srv = Some(AttachServer::start(&c.g).expect("hvpatch attach again"));
    let s = c.status();
    assert_eq!(
        s["transition"]["patch"], "kthreadd",
        "the new server lost the transition: {s:#}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status();
    assert!(blocked_by(&s, 2), "{s:#}");
    // Restart from guest memory alone: killed again, and this time the state file is gone too.
    // The journal in guest memory brings the transition back, but only to a server holding
    // the host key that authenticated it.
    assert!(
        !journal_records(&c.g).is_empty(),
        "no journal record in guest memory"
    );
    let state = c.srv().state_file();
    c.srv.as_mut().unwrap().kill_hard();
    drop(c.srv.take());
    std::fs::remove_file(&state).expect("the state file");
    let other_key = std::env::temp_dir().join(format!("hvpatch-other-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&other_key);
    let wrong = AttachServer::start_with(&c.g, &["--journal-key", other_key.to_str().unwrap()])
        .expect("hvpatch attach with another key");
    let s = wrong.json(&["patch", "status"]).unwrap();
    assert!(
        s["transition"].is_null(),
        "a journal of another key was trusted: {s:#}"
    );
    assert!(
        wrong
            .log_text()
            .contains("not authenticated by this host's key"),
        "{}",
        wrong.log_text()
    );
    drop(wrong);
    let _ = std::fs::remove_file(&other_key);
    // (That server left an empty state file: an empty state does not hide the journal.)
    c.srv = Some(AttachServer::start(&c.g).expect("hvpatch attach, no state file"));
    let s = c.status();
    assert_eq!(
        s["transition"]["patch"],
        "kthreadd",
        "the journal did not bring the transition back: {s:#}\n{}",
        c.srv().log_text()
    );
    assert!(
        c.srv()
            .log_text()
            .contains("continuing from the journal in guest memory"),
        "{}",
        c.srv().log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status();
    assert!(blocked_by(&s, 2), "{s:#}");
    assert_eq!(c.run("cat /proc/self/patch_state").trim(), "1");
    assert_eq!(c.run("cat /proc/2/patch_state").trim(), "0");
    // Interference: the guest's own livepatch variable changes under us (as if the guest's klp
    // started a transition of its own despite the stand-in). `status` names it, and the
    // reversal below still leaves every task and the guest's klp idle.
    let target_pa = image_pa(c, "klp_target_state");
    assert_eq!(
        read_i32(&c.g, target_pa),
        1,
        "klp_target_state during our patching transition"
    );
    write_i32(&c.g, target_pa, 0);
    std::thread::sleep(Duration::from_millis(300));
    let s = c.status();
    let why = s["transition"]["interference"].as_str().unwrap_or_default();
    assert!(
        why.contains("klp_target_state"),
        "interference not reported: {s:#}"
    );
    // Only one transition at a time: other loads (immediate ones too) are refused meanwhile.
    let other = patch_file("other", "static int show(struct seq_file *m, void *v) { return 0; }\nHVPATCH_FUNC(cmdline_proc_show, show);");
    for extra in [None, Some("--immediate")] {
        let mut args = vec!["patch", "load", other.as_str()];
        args.extend(extra);
        let r = c.srv().cli(&args).unwrap();
        assert!(
            !r.success && r.stderr.contains("in transition"),
            "{}",
            r.stderr
        );
    }
    // Disable reverses, at once: kthreadd never left the old state.
    let t0 = Instant::now();
    let v = c.json(&["patch", "disable", "kthreadd", "--timeout", "10"]);
    assert_eq!(v["state"], "Disabled", "{v:#}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(c.status()["transition"].is_null());
    assert!(c.proc_states().iter().all(|&(_, s)| s == -1));
    assert_eq!(
        read_i32(&c.g, target_pa),
        -1,
        "klp_target_state after the reversal"
    );
    c.json(&["patch", "unload", "kthreadd"]);
    c.healthy("after the busy-target test");
    // Nothing loaded: the journal is cleared, guest memory holds no record.
    assert_eq!(
        journal_records(&c.g),
        Vec::<u64>::new(),
        "journal left behind"
    );
}

/// Whether `pid` is among the tasks holding the transition in `status`.
fn blocked_by(status: &Value, pid: i64) -> bool {
    status["transition"]["blocking"]
        .as_array()
        .is_some_and(|b| b.iter().any(|b| b["pid"] == pid))
}

/// Guest-physical address of a kernel-image symbol (its address from `inspect symbol`, through
/// the image's linear mapping with `phys_base` from `inspect kernel`).
fn image_pa(c: &Ctx, name: &str) -> u64 {
    let hex =
        |v: &Value| u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    let k = c.json(&["inspect", "kernel"]);
    let m = c.json(&["inspect", "symbol", name]);
    hex(&m[0]["addr"]) - 0xffff_ffff_8000_0000 + hex(&k["phys_base"])
}

/// An `i32` of guest RAM, read from the guest's RAM file.
fn read_i32(g: &Guest, pa: u64) -> i32 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    std::fs::File::open(g.mem_file())
        .and_then(|f| f.read_exact_at(&mut b, pa))
        .expect("read guest RAM");
    i32::from_le_bytes(b)
}

/// Writes an `i32` of guest RAM through the guest's RAM file (what a guest store would do).
fn write_i32(g: &Guest, pa: u64, v: i32) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(g.mem_file())
        .and_then(|f| f.write_all_at(&v.to_le_bytes(), pa))
        .expect("write guest RAM");
}

/// Guest-physical pages of the low-memory window that start with a journal record's magic,
/// read from the guest's RAM file.
fn journal_records(g: &Guest) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(g.mem_file()).expect("RAM file");
    let (lo, hi) = patcher::arena::LOW_WINDOW;
    let mut buf = vec![0u8; (hi - lo) as usize];
    f.read_exact_at(&mut buf, lo).expect("read low memory");
    buf.chunks(4096)
        .enumerate()
        .filter(|(_, p)| p[..8] == patcher::journal::MAGIC)
        .map(|(i, _)| lo + i as u64 * 4096)
        .collect()
}

/// Runs enable/disable cycles of `pair` with two hammers reading /proc/cmdline; returns every
/// line the hammers saw.
fn pair_cycles(c: &mut Ctx, immediate: bool, cycles: usize) -> Vec<(u64, String)> {
    let name = if immediate { "pair-imm" } else { "pair" };
    let obj = patch_file(name, &pair(immediate));
    c.json(&["patch", "load", &obj, "--timeout", "60"]);
    c.json(&["patch", "disable", name, "--timeout", "60"]);
    c.run("rm -f /tmp/h0 /tmp/h1");
    c.g.spawn("exec hammer 0 read /proc/cmdline > /tmp/h0 2>&1")
        .unwrap();
    c.g.spawn("exec hammer 1 read /proc/cmdline > /tmp/h1 2>&1")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..cycles {
        c.json(&["patch", "enable", name, "--timeout", "60"]);
        std::thread::sleep(Duration::from_millis(60));
        c.json(&["patch", "disable", name, "--timeout", "60"]);
        std::thread::sleep(Duration::from_millis(60));
    }
    c.run("kill -TERM $(pidof hammer); sleep 1; true");
    let mut seen = Vec::new();
    for (cpu, f) in [(0, "/tmp/h0"), (1, "/tmp/h1")] {
        let out = c.run(&format!("cat {f}"));
        let t = parse_hammer(&out, cpu).unwrap_or_else(|| panic!("no hammer report: {out}"));
        assert_eq!(t.errors, 0, "{out}");
        seen.extend(t.seen);
    }
    c.json(&["patch", "unload", name, "--timeout", "60"]);
    seen
}

fn mixed(seen: &[(u64, String)]) -> Vec<String> {
    seen.iter()
        .filter(|(_, l)| l != "old OO" && l != "new NN")
        .map(|(n, l)| format!("{n}× {l}"))
        .collect()
}

fn function_pair(c: &mut Ctx) {
    let base = patch_file("pair-base", PAIR_BASE);
    c.json(&["patch", "load", &base]);
    let consistent = pair_cycles(c, false, 10);
    assert!(
        consistent.iter().any(|(_, l)| l == "new NN")
            && consistent.iter().any(|(_, l)| l == "old OO"),
        "the hammers did not see both versions: {consistent:?}"
    );
    assert_eq!(
        mixed(&consistent),
        Vec::<String>::new(),
        "the consistent pair mixed"
    );
    let immediate = pair_cycles(c, true, 10);
    assert!(
        !mixed(&immediate).is_empty(),
        "immediate mode never mixed (the test cannot tell): {immediate:?}"
    );
    c.json(&["patch", "unload", "pair-base"]);
    c.healthy("after the function-pair test");
}

fn consistency(series: KernelSeries) {
    let mut c = Ctx::boot(series);
    blocked_task(&mut c);
    syscall_hammer(&mut c);
    busy_target(&mut c);
    function_pair(&mut c);
    c.finish();
}

#[test]
fn consistency_6_1() {
    consistency(KernelSeries::V6_1);
}

#[test]
fn consistency_6_12() {
    consistency(KernelSeries::V6_12);
}
