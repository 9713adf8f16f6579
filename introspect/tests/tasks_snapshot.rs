//! The task list and per-CPU `current` of the memory snapshots vs the guest's own `ps`.

/// Test oracles shared with the harness crate (`harness::oracle`).
#[path = "../../tests/src/oracle.rs"]
#[allow(dead_code)]
mod oracle;
mod stacks_support;

use oracle::{compare_with_proc_comm, compare_with_ps, parse_proc_stacks, parse_ps};
use stacks_support::*;

fn check(ver: &'static str) {
    let s = load(ver);
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let ps = parse_ps(&text(ver, "ps.txt"));
    assert!(ps.len() > 40, "{ver}: ps.txt too short");
    // The `ps` process itself had exited when RAM was saved.
    let exited: Vec<i32> = ps.iter().filter(|r| r.1 == "ps").map(|r| r.0).collect();
    assert_eq!(exited.len(), 1);
    // Compare state and comm only of tasks that provably sat still from `ps` to the RAM copy:
    // the ones in stacks.txt (the snapshot maker keeps there only tasks whose context-switch
    // count and stack were unchanged from before `ps` to after the dump). Others (kworkers, the
    // console shell) may legitimately have changed state or workqueue name.
    let still: Vec<i32> = parse_proc_stacks(&text(ver, "stacks.txt"))
        .iter()
        .map(|r| r.0)
        .collect();
    let ignore: Vec<i32> = ps
        .iter()
        .map(|r| r.0)
        .filter(|p| exited.contains(p) || !still.contains(p))
        .collect();
    let compared = ps.len() - ignore.len();
    assert!(compared >= 40, "{ver}: only {compared} ps rows compared");
    for comm in ["sleep", "pipewait", "hvpoll", "ttyread", "cat"] {
        assert!(
            ps.iter().any(|r| r.1 == comm && still.contains(&r.0)),
            "{ver}: parked {comm} not compared"
        );
    }
    compare_with_ps(&tasks, &ps, &ignore)
        .unwrap_or_else(|e| panic!("{ver}: task list differs from ps:\n{e}"));
    check_proc_comm(ver);
    // Every ps row is a task in RAM, except the exited `ps`.
    for (pid, comm, _) in ps.iter().filter(|r| !exited.contains(&r.0)) {
        assert!(
            tasks.iter().any(|t| t.pid == *pid),
            "{ver}: pid {pid} ({comm}) in ps but not found"
        );
    }
    assert!(
        !tasks.iter().any(|t| exited.contains(&t.pid)),
        "{ver}: exited ps still listed"
    );

    // Idle tasks: swapper/0 (init_task) and swapper/1, each current on its vCPU.
    let cpus = s.kernel.vcpu_cpus(&s.mem, &s.regs).unwrap();
    for (v, c) in cpus.iter().enumerate() {
        assert_eq!(c.cpu, Some(v as u32), "{ver}: vCPU{v} cpu");
        let cur = tasks
            .iter()
            .find(|t| Some(t.addr) == c.current)
            .expect("current task listed");
        assert_eq!(cur.comm, format!("swapper/{v}"));
        assert_eq!(cur.pid, 0);
        assert!(cur.on_cpu && cur.is_idle && cur.is_kthread);
        assert_eq!(cur.running_on_vcpu, Some(v));
        assert_eq!(cur.cpu, v as u32);
    }
    assert_eq!(
        tasks.iter().filter(|t| t.running_on_vcpu.is_some()).count(),
        2
    );
    // Kernel threads vs user processes.
    let kthreadd = tasks.iter().find(|t| t.pid == 2).unwrap();
    assert!(kthreadd.is_kthread && kthreadd.comm == "kthreadd");
    let init = tasks.iter().find(|t| t.pid == 1).unwrap();
    assert!(!init.is_kthread && init.comm == "sh");
    assert!(
        tasks.iter().all(|t| t.patch_state == Some(-1)),
        "{ver}: no patch in progress"
    );
    assert!(tasks.iter().all(|t| t.stack_base >> 63 == 1));
}

/// Every task of stacks.txt (which the snapshot maker wrote with its /proc/PID/comm, and keeps
/// only if it did not run across the dump) has exactly that name: untruncated kthread names,
/// workqueue workers with their `-<desc>` suffix, 6.12 rescuers as `kworker/R-<wq>`.
fn check_proc_comm(ver: &'static str) {
    let s = load(ver);
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let rows: Vec<(i32, String)> = parse_proc_stacks(&text(ver, "stacks.txt"))
        .into_iter()
        .map(|(pid, comm, _)| (pid, comm))
        .collect();
    assert!(
        rows.len() >= 40,
        "{ver}: only {} stacks.txt rows",
        rows.len()
    );
    compare_with_proc_comm(&tasks, &rows)
        .unwrap_or_else(|e| panic!("{ver}: names differ from /proc/PID/comm:\n{e}"));
    // Not vacuous: names past task_struct.comm's 15 bytes and workqueue suffixes were compared.
    let long = rows.iter().filter(|r| r.1.len() > 15).count();
    let suffixed = rows
        .iter()
        .filter(|r| r.1.starts_with("kworker/") && r.1.contains(':') && r.1.contains('-'))
        .count();
    assert!(
        long >= 5,
        "{ver}: only {long} names longer than 15 compared"
    );
    assert!(
        suffixed >= 2,
        "{ver}: only {suffixed} kworker-<desc> names compared"
    );
    for t in &tasks {
        if !t.is_kthread {
            assert_eq!(t.comm, t.task_comm, "{ver}: user task renamed");
        } else if t.comm != "kworker/dying" {
            assert!(t.comm.starts_with(&t.task_comm), "{ver}: {t:?}");
        }
    }
}

#[test]
fn proc_comm_6_12_pti() {
    check_proc_comm("6.12-pti");
}

#[test]
fn tasks_match_ps_6_12() {
    check("6.12");
}

#[test]
fn tasks_match_ps_6_1() {
    check("6.1");
}

/// Without usable GS bases (gdbstub, user mode), vCPUs are matched to CPUs by CR3 =
/// `cpu_tlbstate.loaded_mm->pgd`: give the vCPUs in reverse order and check the mapping follows.
fn cr3_fallback(ver: &'static str) {
    let s = load(ver);
    let mut regs: Vec<_> = s.regs.iter().rev().copied().collect();
    for r in &mut regs {
        r.gs_base = 0;
        r.kernel_gs_base = 0;
    }
    let cpus = s.kernel.vcpu_cpus(&s.mem, &regs).unwrap();
    assert_eq!(
        cpus.iter().map(|c| c.cpu).collect::<Vec<_>>(),
        vec![Some(1), Some(0)],
        "{ver}"
    );
    let direct = s.kernel.vcpu_cpus(&s.mem, &s.regs).unwrap();
    assert_eq!(cpus[0].current, direct[1].current);
    assert_eq!(cpus[0].percpu_base, direct[1].percpu_base);
}

#[test]
fn vcpu_cpu_by_cr3_6_12() {
    cr3_fallback("6.12");
}

#[test]
fn vcpu_cpu_by_cr3_6_1() {
    cr3_fallback("6.1");
}
