//! Unload of a patch a task is still inside, through `hvpatch attach` and the CLI, on booted
//! 6.1 and 6.12 guests: the patched `cmdline_proc_show` sleeps in `msleep`. The patches are
//! immediate (`--immediate`): the consistency model would not disable the patch while the task
//! is inside it (tests/tests/consistency.rs covers that).
//! - `patch unload` disables the patch at once, waits until the sleeper has left it, then frees;
//! - with a short `--timeout` it fails naming the task; the patch stays disabled and held
//!   (`patch list` / `info` say why) and the server frees it by itself once the task left;
//! - `hvpatch attach` killed with SIGKILL, with a patch loaded and one held: the guest keeps
//!   running, the sleeper finishes inside the held patch's code, the loaded patch stays in force;
//! - killed while the guest is paused: its guard process detaches and QEMU resumes the guest.
//!
//! While an unload waits, other API clients are answered at once (also with a silent client and
//! one sending byte by byte connected).
//!
//! Every step checks the guest's own view (`cat`, `dmesg`) and fails on any kernel complaint.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::soak::kernel_complaints;
use harness::{AttachServer, Guest, GuestSpec, KernelSeries};

/// A patch whose `cmdline_proc_show` sleeps `ms` milliseconds, then prints `slept`.
fn sleeper(name: &str, ms: u32) -> std::path::PathBuf {
    let obj = harness::patching::build_patch(
        name,
        &format!(
            "HVPATCH_NAME(\"{name}\");\n\
             extern void msleep(unsigned int msecs);\n\
             static int show(struct seq_file *m, void *v) {{ msleep({ms}); seq_printf(m, \"slept\\n\"); return 0; }}\n\
             HVPATCH_FUNC(cmdline_proc_show, show);"
        ),
    );
    let p = std::env::temp_dir().join(format!("hvpatch-held-{}-{name}.o", std::process::id()));
    std::fs::write(&p, obj).expect("write patch object");
    p
}

/// One raw `status` request; the response line.
fn status(sock: &Path) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    line
}

/// Waits until the guest file `path` reads `want` (the sleeper finished).
fn wait_file(g: &mut Guest, path: &str, want: &str, within: Duration) {
    let t0 = Instant::now();
    loop {
        let got = g.run(&format!("cat {path} 2>/dev/null || true")).unwrap();
        if got == want {
            return;
        }
        assert!(t0.elapsed() < within, "{path} reads {got:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the cat spawned into `path` sits in the patch (its /proc stack shows msleep).
fn wait_sleeping(g: &mut Guest) {
    let t0 = Instant::now();
    loop {
        let st = g
            .run("for p in $(pidof cat); do cat /proc/$p/stack; done 2>/dev/null || true")
            .unwrap();
        if st.contains("msleep") {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the reader never slept in the patch: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Loads a `sleeper` patch named `name` and starts a reader (output to `out`) that sleeps in it.
fn sleep_in_patch(srv: &AttachServer, g: &mut Guest, name: &str, ms: u32, out: &str) {
    let p = sleeper(name, ms);
    // Immediate mode: this test is about unloading a patch a task is still inside, which
    // immediate mode allows (the consistency model would wait for the task instead).
    srv.json(&["patch", "load", p.to_str().unwrap(), "--immediate"])
        .unwrap();
    g.spawn(&format!("cat /proc/cmdline > {out}")).unwrap();
    wait_sleeping(g);
}

fn assert_healthy(g: &mut Guest, before: &[String], when: &str) {
    harness::soak::assert_no_new_complaints(g, before, when);
    assert_eq!(g.run("echo ok").unwrap(), "ok\n", "{when}");
}

fn held_unload(series: KernelSeries) {
    let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
    let before = kernel_complaints(&g.run("dmesg").unwrap());
    let original = g.run("cat /proc/cmdline").unwrap();
    let mut srv = AttachServer::start(&g).expect("hvpatch attach");

    // 1. Unload waits for the sleeper, then frees.
    sleep_in_patch(&srv, &mut g, "sleeper", 3000, "/tmp/s1");
    let t0 = Instant::now();
    // While the unload waits in the server, other clients are served at once, also with one
    // client connected and silent and another sending its request byte by byte.
    let v = std::thread::scope(|sc| {
        let unload = sc.spawn(|| srv.json(&["patch", "unload", "sleeper"]).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        let _silent = UnixStream::connect(srv.socket()).unwrap();
        let mut slow = UnixStream::connect(srv.socket()).unwrap();
        slow.write_all(b"{\"op\":").unwrap();
        for _ in 0..5 {
            let t = Instant::now();
            let st = status(srv.socket());
            assert!(st.contains("\"ok\":true"), "{st}");
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "status took {:?} while an unload waited",
                t.elapsed()
            );
        }
        slow.write_all(b"\"status\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&slow).read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
        unload.join().unwrap()
    });
    let took = t0.elapsed();
    eprintln!("{series:?}: unload waited {took:?}: {}", v["unload"]);
    assert_eq!(v["state"], "Unloaded");
    let u = &v["unload"];
    assert!(u["checks"].as_u64().unwrap() > 1, "{u}");
    assert!(u["waited_us"].as_u64().unwrap() > 100_000, "{u}");
    assert_eq!(u["first_hold"]["comm"], "cat", "{u}");
    assert!(
        u["first_hold"]["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("msleep")),
        "the holder's stack shows where it sleeps: {u}"
    );
    wait_file(&mut g, "/tmp/s1", "slept\n", Duration::from_secs(10));
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), original);
    assert!(srv
        .json(&["patch", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    assert_healthy(&mut g, &before, "after the waiting unload");

    // 2. The wait times out: disabled at once, held, the error names the task; freed later
    //    by the server on its own.
    sleep_in_patch(&srv, &mut g, "sleeper2", 6000, "/tmp/s2");
    let out = srv
        .cli(&["patch", "unload", "sleeper2", "--timeout", "0.5"])
        .unwrap();
    assert!(!out.success, "unload should time out: {}", out.stdout);
    assert!(
        out.stderr.contains("held") && out.stderr.contains("(cat)"),
        "the error names the holder: {}",
        out.stderr
    );
    // Disabled: a new reader gets the original at once.
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), original);
    let list = srv.json(&["patch", "list"]).unwrap();
    let held = &list[0];
    assert_eq!(held["state"], "Held", "{list}");
    assert_eq!(held["functions"][0]["active"], false);
    assert!(
        held["held"]["by"].as_str().unwrap().contains("(cat)"),
        "{held}"
    );
    let text = srv.cli_ok(&["patch", "info", "sleeper2"]).unwrap();
    assert!(
        text.contains("Held") && text.contains("kept because") && text.contains("cat"),
        "{text}"
    );
    // The sleeper finishes inside the held code, correctly; then the server frees the patch.
    wait_file(&mut g, "/tmp/s2", "slept\n", Duration::from_secs(15));
    let t0 = Instant::now();
    while !srv
        .json(&["patch", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the held patch was never freed: {}",
            srv.json(&["patch", "list"]).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_healthy(&mut g, &before, "after the held patch was freed");

    // 3. hvpatch dies (SIGKILL) with one patch enabled and one held: the guest keeps running
    //    correctly, both stay intact in guest memory.
    sleep_in_patch(&srv, &mut g, "sleeper3", 4000, "/tmp/s3");
    let out = srv
        .cli(&["patch", "unload", "sleeper3", "--timeout", "0.2"])
        .unwrap();
    assert!(!out.success);
    let sample = sleeper("sleeper4", 1);
    srv.json(&["patch", "load", sample.to_str().unwrap(), "--immediate"])
        .unwrap();
    srv.kill_hard();
    wait_file(&mut g, "/tmp/s3", "slept\n", Duration::from_secs(15));
    assert_eq!(
        g.run("cat /proc/cmdline").unwrap(),
        "slept\n",
        "the loaded patch stays in force"
    );
    assert_healthy(&mut g, &before, "after hvpatch was killed");

    // 4. hvpatch dies while the guest is paused: its guard detaches, QEMU resumes the guest.
    let mut srv = AttachServer::start(&g).expect("hvpatch attach again");
    srv.cli_ok(&["vm", "pause"]).unwrap();
    assert_eq!(srv.json(&["vm", "status"]).unwrap()["paused"], true);
    srv.kill_hard();
    let out = g
        .run_timeout("echo alive", Duration::from_secs(30))
        .expect("the guest runs again after hvpatch died while it was paused");
    assert_eq!(out, "alive\n");
    // And a new attach works (the gdbstub is free again).
    let srv = AttachServer::start(&g).expect("hvpatch attach after the guard detached");
    assert_eq!(srv.json(&["vm", "status"]).unwrap()["paused"], false);
    assert_healthy(&mut g, &before, "after the guard detached");
}

#[test]
fn held_unload_6_1() {
    held_unload(KernelSeries::V6_1);
}

#[test]
fn held_unload_6_12() {
    held_unload(KernelSeries::V6_12);
}
