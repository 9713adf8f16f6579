//! The harness itself on both kernels: boot, run, run_bulk, spawn.

use std::time::Instant;

use harness::{Guest, GuestSpec, HarnessError, KernelSeries};

fn check(series: KernelSeries) {
    let t = Instant::now();
    let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
    eprintln!("{series:?}: booted in {:.1?}", t.elapsed());

    let release = g.run("uname -r").unwrap();
    assert_eq!(
        release.trim_end(),
        g.kernel().release,
        "uname -r vs image release"
    );
    assert_eq!(release, format!("{}\n", g.kernel().release), "exact output");

    // Exit status and output without trailing newline.
    assert_eq!(
        g.run_status("printf abc; exit_code() { return 3; }; exit_code")
            .unwrap(),
        (3, "abc".into())
    );
    assert!(matches!(
        g.run("false"),
        Err(HarnessError::CommandFailed { status: 1, .. })
    ));
    // stderr is captured; multi-line output.
    assert_eq!(g.run("echo a; echo b >&2; echo c").unwrap(), "a\nb\nc\n");
    // The marker text in the output of one command does not confuse the next one.
    assert_eq!(g.run("echo __HVP99:0__").unwrap(), "__HVP99:0__\n");

    let t = Instant::now();
    let ksyms = g.run_bulk("cat /proc/kallsyms").unwrap();
    let bulk_time = t.elapsed();
    let lines = ksyms.lines().count();
    eprintln!(
        "{series:?}: run_bulk kallsyms {} bytes, {lines} lines in {bulk_time:.1?}",
        ksyms.len()
    );
    assert!(lines > 80000, "kallsyms has only {lines} lines");
    assert!(
        ksyms.lines().all(|l| l.split(' ').count() >= 3),
        "malformed kallsyms line"
    );
    assert!(ksyms.contains(" T cmdline_proc_show") || ksyms.contains(" t cmdline_proc_show"));
    // The guest's own count agrees.
    let n: usize = g
        .run("wc -l < /proc/kallsyms")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(n, lines);
    // A second bulk command gets only its own output.
    assert_eq!(g.run_bulk("echo one; echo two").unwrap(), "one\ntwo\n");

    let pid = g.spawn("sleep 1000").unwrap();
    let ps = g.run("ps -o pid,comm").unwrap();
    assert!(
        ps.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some(&pid.to_string()) && f.next() == Some("sleep")
        }),
        "pid {pid} not a sleep in:\n{ps}"
    );
    g.run(&format!("kill {pid}")).unwrap();
    assert_eq!(g.run("echo still here").unwrap(), "still here\n");

    // The monitor works; shutdown quits QEMU; the temporary files go away.
    assert!(g.hmp("info status").unwrap().contains("running"));
    let ram = g.mem_file();
    assert!(ram.exists() && g.gdb_socket().exists() && g.serial_log().exists());
    g.shutdown().unwrap();
    assert!(!ram.exists(), "{} left behind", ram.display());
}

#[test]
fn harness_6_1() {
    check(KernelSeries::V6_1);
}

#[test]
fn harness_6_12() {
    check(KernelSeries::V6_12);
}

/// Console throughput for comparison with the bulk port (prints numbers).
#[test]
fn console_vs_bulk_throughput() {
    let mut g = Guest::boot(GuestSpec::new(KernelSeries::V6_12)).expect("boot");
    let t = Instant::now();
    let a = g.run("cat /proc/kallsyms").unwrap();
    let console = t.elapsed();
    let t = Instant::now();
    let b = g.run_bulk("cat /proc/kallsyms").unwrap();
    let bulk = t.elapsed();
    eprintln!(
        "kallsyms {} bytes: console {console:.1?}, bulk {bulk:.1?}",
        a.len()
    );
    assert_eq!(a.lines().count(), b.lines().count());
}

#[test]
fn command_timeout_recovers() {
    let mut g = Guest::boot(GuestSpec::new(KernelSeries::V6_12)).expect("boot");
    let e = g
        .run_timeout("sleep 30", std::time::Duration::from_secs(2))
        .unwrap_err();
    assert!(matches!(e, HarnessError::CommandTimeout { .. }), "{e}");
    assert_eq!(g.run("echo after").unwrap(), "after\n");
    // Drop kills QEMU and removes its files.
    let (ram, pid) = (g.mem_file(), g.qemu_pid());
    drop(g);
    assert!(!ram.exists());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still there"
    );
}
