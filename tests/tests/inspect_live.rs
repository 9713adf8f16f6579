//! Issue acceptance for introspection, on booted Debian 6.1 and 6.12 guests (QEMU TCG, KASLR on):
//! everything `hvpatch attach` + `hvpatch inspect` reports is compared with the guest's own view
//! (/proc/kallsyms, ps, /proc/PID/stack), read over the serial console as root.

use std::collections::BTreeMap;
use std::time::Duration;

use harness::{AttachServer, Guest, GuestSpec, KernelSeries};
use serde_json::Value;

/// Renders every task's /proc/PID/stack as "== PID SWITCHES COMM" blocks, where SWITCHES is its
/// voluntary+involuntary context-switch count and COMM its /proc/PID/comm: a task whose count
/// did not move between two readings did not run in between, so its stack and name (a
/// workqueue worker's `-<desc>` changes only when it runs) were the same all that time.
const PROC_STACKS: &str = r#"for p in /proc/[0-9]*; do echo "== ${p#/proc/} $(grep ctxt_switches $p/status | tr -dc '0-9\n' | tr '\n' '+')0 $(cat $p/comm)"; cat $p/stack; done 2>/dev/null"#;

/// One task of a [`PROC_STACKS`] reading.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcTask {
    switches: String,
    comm: String,
    stack: Vec<String>,
}

/// Parses "== PID SWITCHES COMM" blocks into pid → task.
fn parse_stacks(text: &str) -> BTreeMap<i64, ProcTask> {
    harness::oracle::parse_proc_stacks(text)
        .into_iter()
        .map(|(pid, rest, stack)| {
            let (switches, comm) = rest.split_once(' ').unwrap_or((&rest, ""));
            let t = ProcTask {
                switches: switches.to_string(),
                comm: comm.to_string(),
                stack,
            };
            (pid as i64, t)
        })
        .collect()
}

/// Boots `series`; 6.1 runs with `pti=on` (the emulated CPU is not Meltdown-affected, so PTI is
/// otherwise off) so both the PTI and the non-PTI address-space layouts are covered.
fn boot(series: KernelSeries) -> Guest {
    let mut spec = GuestSpec::new(series);
    if series == KernelSeries::V6_1 {
        spec = spec.cmdline("pti=on");
    }
    Guest::boot(spec).unwrap_or_else(|e| panic!("booting {series:?}: {e}"))
}

/// Every line of `hvpatch inspect symbols` equals /proc/kallsyms: count, address, type, name.
fn check_symbols(g: &mut Guest, srv: &AttachServer) {
    let proc = g
        .run_bulk("cat /proc/kallsyms")
        .expect("cat /proc/kallsyms");
    let ours = srv
        .cli_ok(&["inspect", "symbols"])
        .expect("inspect symbols");
    let o: Vec<String> = ours.lines().map(str::to_string).collect();
    harness::patching::assert_kallsyms_equal(&proc, &o, "hvpatch");
}

/// The task list equals `ps` (pid, comm), names equal /proc/PID/comm, and the stacks of sleeping
/// tasks equal /proc/PID/stack.
fn check_tasks_and_stacks(g: &mut Guest, srv: &AttachServer, parked: &[(u32, &str)]) {
    let before = parse_stacks(&g.run_bulk(PROC_STACKS).expect("/proc stacks"));
    let ps = g.run("ps -o pid,comm,stat").expect("ps");
    let tasks = srv.json(&["inspect", "tasks"]).expect("inspect tasks");
    let stacks = srv.json(&["inspect", "stacks"]).expect("inspect stacks");
    let after = parse_stacks(&g.run_bulk(PROC_STACKS).expect("/proc stacks"));

    // Processes: ps rows (except ps itself) == our thread-group leaders, same comm.
    let tasks = tasks.as_array().expect("tasks array");
    let procs: BTreeMap<i64, String> = tasks
        .iter()
        .filter(|t| t["pid"] == t["tgid"] && t["is_idle"] != Value::Bool(true))
        .map(|t| {
            (
                t["pid"].as_i64().unwrap(),
                t["comm"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let rows = harness::oracle::parse_ps(&ps);
    assert!(rows.len() > 20, "ps printed too few rows:\n{ps}");
    let ps_pid = rows.iter().find(|r| r.1 == "ps").map(|r| r.0 as i64);
    // Tasks that did not run from the first /proc reading to the second (ps and hvpatch's read
    // are in between): same context-switch count, same name.
    let still = |pid: i64| {
        before.get(&pid).is_some_and(|b| {
            after
                .get(&pid)
                .is_some_and(|a| (&a.switches, &a.comm) == (&b.switches, &b.comm))
        })
    };
    let mut errors = Vec::new();
    for (pid, comm, _) in rows.iter().filter(|r| Some(r.0 as i64) != ps_pid) {
        match procs.get(&(*pid as i64)) {
            None => errors.push(format!(
                "pid {pid} ({comm}) in ps, not in hvpatch's task list"
            )),
            // ps shows the first 15 bytes of /proc/PID/comm. A workqueue worker that ran in
            // between may have changed its `-<desc>` suffix.
            Some(c)
                if comm.as_bytes() != harness::oracle::ps_comm(c)
                    && (still(*pid as i64) || !c.starts_with("kworker/")) =>
            {
                errors.push(format!("pid {pid}: ps comm {comm}, hvpatch comm {c}"))
            }
            Some(_) => {}
        }
    }
    for (pid, comm) in &procs {
        if !rows.iter().any(|r| r.0 as i64 == *pid) {
            errors.push(format!(
                "pid {pid} ({comm}) in hvpatch's task list, not in ps"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "task list differs from ps:\n{}\nps:\n{ps}",
        errors.join("\n")
    );

    // Names: exactly /proc/PID/comm (untruncated kthread names, `kworker/0:1-events`, 6.12
    // `kworker/R-<wq>`) for every process that sat still. One that ran may have changed its
    // name in between, so it must match either reading, or at least not be a truncation.
    let mut still_names = Vec::new();
    for (pid, c) in &procs {
        let (Some(b), Some(a)) = (before.get(pid), after.get(pid)) else {
            continue;
        };
        if still(*pid) {
            still_names.push((*pid as i32, b.comm.clone()));
        } else if *c != b.comm
            && *c != a.comm
            && (b.comm.starts_with(c.as_str()) || a.comm.starts_with(c.as_str()))
        {
            errors.push(format!(
                "pid {pid}: hvpatch comm {c} truncates /proc/PID/comm {} / {}",
                b.comm, a.comm
            ));
        }
    }
    for (pid, comm) in &still_names {
        let c = &procs[&(*pid as i64)];
        if c != comm {
            errors.push(format!(
                "pid {pid}: /proc/PID/comm {comm}, hvpatch comm {c}"
            ));
        }
    }
    let long = still_names.iter().filter(|r| r.1.len() > 15).count();
    let suffixed = still_names
        .iter()
        .filter(|r| r.1.starts_with("kworker/") && r.1.contains(':') && r.1.contains('-'))
        .count();
    assert!(
        errors.is_empty(),
        "task names differ from /proc/PID/comm:\n{}",
        errors.join("\n")
    );
    assert!(
        still_names.len() >= 20 && long >= 3 && suffixed >= 1,
        "too few names compared with /proc/PID/comm: {} (longer than 15: {long}, \
         kworker-<desc>: {suffixed})",
        still_names.len()
    );

    // Stacks: every task that did not run between the two /proc readings (same context-switch
    // count) was asleep in the same place throughout: ours must equal /proc line for line.
    let ours: BTreeMap<i64, &Value> = stacks["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| (t["pid"].as_i64().unwrap(), &t["stack"]))
        .collect();
    let mut compared = Vec::new();
    let mut errors = Vec::new();
    for (pid, t) in &before {
        let lines = &t.stack;
        if lines.is_empty() || after.get(pid) != Some(t) {
            continue;
        }
        let Some(st) = ours.get(pid) else { continue };
        let view: Vec<String> = st["proc"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        if let Err(e) = harness::oracle::compare_stack_with_proc(&view, lines) {
            errors.push(format!("pid {pid}: {e}"));
        }
        if st["reliable"] != Value::Bool(true) {
            errors.push(format!(
                "pid {pid}: sleeping task's stack unreliable: {}",
                st["reason"]
            ));
        }
        compared.push(*pid);
    }
    assert!(
        errors.is_empty(),
        "stacks differ from /proc/PID/stack:\n{}",
        errors.join("\n\n")
    );
    for (pid, what) in parked {
        assert!(
            compared.contains(&(*pid as i64)),
            "parked task {pid} ({what}) was not compared (its /proc stack moved or hvpatch missed it)"
        );
        let lines = &before[&(*pid as i64)].stack;
        assert!(
            lines.iter().any(|l| l.contains(what)),
            "parked task {pid} is not where it was parked ({what}): {lines:?}"
        );
    }
    assert!(
        compared.len() >= 20,
        "only {} sleeping tasks compared",
        compared.len()
    );
}

/// vCPUs: idle, user mode and kernel mode are told apart; kernel and idle stacks are reliable
/// and end at an entry point / the idle loop's bottom.
fn check_vcpus(g: &mut Guest, srv: &AttachServer) {
    let mut seen = BTreeMap::new();
    let sample = |seen: &mut BTreeMap<String, Vec<Value>>| {
        let v = srv.json(&["inspect", "vcpus"]).expect("inspect vcpus");
        for c in v.as_array().unwrap() {
            seen.entry(c["mode"].as_str().unwrap_or("?").to_string())
                .or_default()
                .push(c.clone());
        }
    };
    for _ in 0..3 {
        sample(&mut seen);
    }
    let spin = g.spawn("spin").expect("spin");
    for _ in 0..6 {
        sample(&mut seen);
    }
    g.run(&format!("kill {spin}")).unwrap();
    let busy = g
        .spawn("while :; do cat /proc/kallsyms >/dev/null; done")
        .expect("kernel loop");
    for _ in 0..12 {
        sample(&mut seen);
        if seen.get("RunningKernel").is_some_and(|v| {
            v.iter()
                .any(|c| c["stack"]["reliable"] == Value::Bool(true))
        }) {
            break;
        }
    }
    g.run(&format!("kill {busy}")).unwrap();

    let idle = seen.get("Idle").expect("no vCPU was ever seen idle");
    for c in idle {
        let st = &c["stack"];
        assert_eq!(
            st["reliable"],
            Value::Bool(true),
            "idle vCPU stack unreliable: {c}"
        );
        let frames: Vec<&str> = st["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["symbol"].as_str().unwrap())
            .collect();
        assert!(
            frames.iter().any(|f| f.starts_with("do_idle+")),
            "idle stack without do_idle: {frames:?}"
        );
    }
    let user = seen
        .get("User")
        .expect("no vCPU was ever seen in user mode while `spin` ran");
    assert!(
        user.iter().all(|c| c["cpl"] == 3),
        "user-mode vCPU not at CPL 3: {user:?}"
    );
    let kernel = seen
        .get("RunningKernel")
        .expect("no vCPU was ever seen running kernel code");
    let reliable: Vec<&Value> = kernel
        .iter()
        .filter(|c| c["stack"]["reliable"] == Value::Bool(true))
        .collect();
    assert!(
        !reliable.is_empty(),
        "no kernel-mode vCPU stack was reliable: {kernel:?}"
    );
    for c in reliable {
        let frames = c["stack"]["frames"].as_array().unwrap();
        let last = frames
            .last()
            .and_then(|f| f["symbol"].as_str())
            .unwrap_or("");
        assert!(
            last.starts_with("entry_SYSCALL_64")
                || last.starts_with("asm_")
                || last.starts_with("ret_from_fork"),
            "reliable kernel-mode stack does not end at an entry point: {c}"
        );
    }
}

fn introspection_matches_guest(series: KernelSeries) {
    let mut g = boot(series);
    let pipewait = g.spawn("pipewait").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let children = g
        .run(&format!("cat /proc/{pipewait}/task/{pipewait}/children"))
        .unwrap();
    let pipe_reader: u32 = children
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("pipewait child: {children:?}"));
    let parked = [
        (g.spawn("sleep 1000").unwrap(), "hrtimer_nanosleep"),
        (pipe_reader, "pipe_read"),
        (pipewait, "do_wait"),
        (g.spawn("sh -c 'sleep 1002; true'").unwrap(), "do_wait"),
        (g.spawn("hvpoll").unwrap(), "do_sys_poll"),
        (g.spawn("ttyread").unwrap(), "n_tty_read"),
    ];
    std::thread::sleep(Duration::from_secs(2));
    let srv = AttachServer::start(&g).expect("hvpatch attach");
    let kernel = srv.json(&["inspect", "kernel"]).expect("inspect kernel");
    assert_eq!(
        kernel["release"].as_str(),
        Some(g.kernel().release.as_str()),
        "release: {kernel}"
    );
    assert_eq!(
        kernel["paging_levels"],
        if series == KernelSeries::V6_12 { 5 } else { 4 }
    );
    // Addresses are hex strings (JSON numbers lose precision above 2^53 in jq and JavaScript).
    let slide = kernel["slide"]
        .as_str()
        .and_then(|s| introspect::hex::parse_hex(s).ok())
        .unwrap_or_else(|| panic!("slide is not a hex string: {kernel}"));
    assert_ne!(slide, 0, "KASLR is on, the slide cannot be 0: {kernel}");
    let text = kernel["text"]
        .as_str()
        .and_then(|s| introspect::hex::parse_hex(s).ok())
        .unwrap_or_else(|| panic!("_text is not a hex string: {kernel}"));
    assert_eq!(text.wrapping_sub(slide), 0xffff_ffff_8100_0000, "{kernel}");
    check_symbols(&mut g, &srv);
    check_tasks_and_stacks(&mut g, &srv, &parked);
    check_vcpus(&mut g, &srv);
}

#[test]
fn introspection_matches_guest_6_1() {
    introspection_matches_guest(KernelSeries::V6_1);
}

#[test]
fn introspection_matches_guest_6_12() {
    introspection_matches_guest(KernelSeries::V6_12);
}
