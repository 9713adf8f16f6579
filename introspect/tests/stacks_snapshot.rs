//! Unwinds every task and vCPU of the memory snapshots and compares with the guest's own
//! /proc/PID/stack. stacks.txt holds exactly the tasks whose stack and context-switch count
//! were the same before the snapshot's `stop` and after its `cont` (`harness::snapshot`), so
//! every task listed there must match.

/// Test oracles shared with the harness crate (`harness::oracle`).
#[path = "../../tests/src/oracle.rs"]
#[allow(dead_code)]
mod oracle;
mod stacks_support;

use introspect::model::GuestAccess;
use introspect::stack::StackKind;
use oracle::{compare_stack_with_proc, parse_proc_stacks};
use stacks_support::*;

/// Tasks the snapshot maker parks (comm, a function on its /proc stack); each must be in
/// stacks.txt (they never run) and be compared.
const PARKED: [(&str, &str); 6] = [
    ("sleep", "hrtimer_nanosleep"),
    ("pipewait", "do_wait"),
    ("pipewait", "pipe_read"),
    ("hvpoll", "do_sys_poll"),
    ("ttyread", "n_tty_read"),
    ("cat", "pipe_read"),
];

fn check_tasks(ver: &'static str) {
    let s = load(ver);
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let proc_stacks = parse_proc_stacks(&text(ver, "stacks.txt"));
    let mut compared = 0;
    let mut errs = Vec::new();
    for (comm, func) in PARKED {
        assert!(
            proc_stacks
                .iter()
                .any(|(_, c, l)| c == comm && l.iter().any(|f| f.contains(func))),
            "{ver}: parked {comm} in {func} missing from stacks.txt"
        );
    }
    for (pid, comm, lines) in &proc_stacks {
        let Some(t) = tasks.iter().find(|t| t.pid == *pid) else {
            errs.push(format!(
                "pid {pid} ({comm}) has a /proc stack but was not found"
            ));
            continue;
        };
        let st = s.kernel.task_stack(&s.mem, t).unwrap();
        assert_eq!(st.kind, StackKind::Sleeping);
        if !st.reliable {
            errs.push(format!("pid {pid} ({comm}): unreliable: {:?}", st.reason));
        }
        let ours = s.kernel.proc_stack_view(&s.mem, &st).unwrap();
        if let Err(e) = compare_stack_with_proc(&ours, lines) {
            errs.push(format!("pid {pid} ({comm}): {e}"));
        }
        compared += 1;
    }
    assert!(
        errs.is_empty(),
        "{ver}: {} mismatches:\n{}",
        errs.len(),
        errs.join("\n")
    );
    assert_eq!(compared, proc_stacks.len());
    assert!(compared >= 40, "{ver}: only {compared} stacks compared");
    // Every sleeping task (including the ones /proc did not list, like idle tasks not running
    // and the console shell) gives a reliable stack.
    for t in tasks.iter().filter(|t| t.running_on_vcpu.is_none()) {
        let st = s.kernel.task_stack(&s.mem, t).unwrap();
        assert!(
            st.reliable,
            "{ver}: pid {} ({}) unreliable: {:?}",
            t.pid, t.comm, st.reason
        );
        assert!(!st.frames.is_empty(), "{ver}: pid {} has no frames", t.pid);
    }
}

fn check_vcpus(ver: &'static str, bottom: &str) {
    let s = load(ver);
    for v in 0..s.regs.len() {
        let st = s.kernel.vcpu_stack(&s.mem, &s.regs, v).unwrap();
        let names: Vec<String> = st
            .frames
            .iter()
            .map(|f| f.symbol.as_ref().map(|x| x.0.clone()).unwrap_or_default())
            .collect();
        assert_eq!(st.kind, StackKind::Idle, "{ver} vCPU{v}: {names:?}");
        assert!(st.reliable, "{ver} vCPU{v}: {:?} {names:?}", st.reason);
        assert_eq!(
            names.last().map(String::as_str),
            Some(bottom),
            "{ver} vCPU{v}: {names:?}"
        );
        let via = if v == 0 {
            "rest_init"
        } else {
            "start_secondary"
        };
        assert!(
            names.iter().any(|n| n == via),
            "{ver} vCPU{v}: no {via} in {names:?}"
        );
        assert!(
            names.iter().any(|n| n == "do_idle"),
            "{ver} vCPU{v}: {names:?}"
        );
    }
}

#[test]
fn stacks_match_proc_6_12() {
    check_tasks("6.12");
}

#[test]
fn stacks_match_proc_6_1() {
    check_tasks("6.1");
}

#[test]
fn vcpus_idle_6_12() {
    check_vcpus("6.12", "common_startup_64");
}

#[test]
fn vcpus_idle_6_1() {
    check_vcpus("6.1", "secondary_startup_64_no_verify");
}

/// A vCPU stopped in kernel code of a task (synthesized: vCPU 1's registers set to where a
/// sleeping `sleep` task resumes, and CPU 1's `current` pointed at it) unwinds to the same
/// frames as the task's own stack, through the user pt_regs, as RunningKernel. Without
/// `current` pointing at the task its stack is not readable: unreliable. CPL 3 gives User.
fn running_and_user(ver: &'static str) {
    let s = load(ver);
    let g = introspect::model::KernelGuest {
        kernel: &s.kernel,
        mem: &s.mem,
    };
    let m = s.kernel.model(&s.mem).unwrap();
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let t = tasks.iter().find(|t| t.comm == "sleep").unwrap();
    let want = s.kernel.task_stack(&s.mem, t).unwrap();
    let mut regs = s.regs.clone();
    let r = &mut regs[1];
    r.rip = g.read_u64(t.thread_sp + m.task.frame_ret_addr).unwrap();
    r.gprs[introspect::VcpuRegs::RBP] = g.read_u64(t.thread_sp + m.task.frame_bp).unwrap();
    r.gprs[introspect::VcpuRegs::RSP] = t.thread_sp + m.task.frame_size;

    let not_current = introspect::stack::vcpu_stack(&g, m, &regs, 1).unwrap();
    assert!(!not_current.reliable, "{ver}: {not_current:?}");

    let mut o = Overlay::new(&s);
    o.put_u64(s.regs[1].gs_base + m.percpu.current_task, t.addr);
    let st = introspect::stack::vcpu_stack(&o, m, &regs, 1).unwrap();
    assert_eq!(st.kind, StackKind::RunningKernel);
    assert!(st.reliable, "{ver}: {:?}", st.reason);
    let addrs = |x: &introspect::stack::Stack| x.frames.iter().map(|f| f.addr).collect::<Vec<_>>();
    assert_eq!(addrs(&st), addrs(&want), "{ver}");
    let last = st.frames.last().unwrap().symbol.clone().unwrap().0;
    assert_eq!(last, "entry_SYSCALL_64_after_hwframe");

    let mut user = s.regs.clone();
    user[0].cs = 0x33;
    let st = s.kernel.vcpu_stack(&s.mem, &user, 0).unwrap();
    assert_eq!(
        (st.kind, st.reliable, st.frames.len()),
        (StackKind::User, true, 0)
    );
}

#[test]
fn running_and_user_vcpus_6_12() {
    running_and_user("6.12");
}

#[test]
fn running_and_user_vcpus_6_1() {
    running_and_user("6.1");
}

/// Each vCPU may read its task stack, its IRQ stack and its exception stacks; all mapped.
fn stack_ranges(ver: &'static str) {
    use introspect::unwind::StackType;
    let s = load(ver);
    let g = introspect::model::KernelGuest {
        kernel: &s.kernel,
        mem: &s.mem,
    };
    let m = s.kernel.model(&s.mem).unwrap();
    let mut irqs = Vec::new();
    for v in 0..s.regs.len() {
        let r = introspect::stack::vcpu_stack_ranges(&g, m, &s.regs, v);
        let types: Vec<StackType> = r.iter().map(|x| x.ty).collect();
        assert_eq!(
            types,
            vec![StackType::Task, StackType::Irq, StackType::Exception],
            "{ver}"
        );
        assert!(
            r[0].start <= s.regs[v].rsp() && s.regs[v].rsp() < r[0].end,
            "{ver}: rsp on task stack"
        );
        assert_eq!(r[1].end - r[1].start, 0x4000);
        assert_eq!(m.thread_size, 0x4000);
        // The IRQ stack's top slot and the whole stack are mapped.
        assert!(
            g.read_u64(r[1].end - 8).is_ok() && g.read_u64(r[1].start).is_ok(),
            "{ver}"
        );
        assert!(
            r[2].end - r[2].start >= 0x4000,
            "{ver}: exception stacks {:x?}",
            r[2]
        );
        irqs.push(r[1]);
    }
    assert_ne!(irqs[0], irqs[1]);
}

#[test]
fn vcpu_stack_ranges_6_12() {
    stack_ranges("6.12");
}

#[test]
fn vcpu_stack_ranges_6_1() {
    stack_ranges("6.1");
}

/// Guest memory with one byte changed.
struct OneByte<'a> {
    inner: &'a dyn introspect::PhysMemory,
    pa: u64,
    byte: u8,
}

impl introspect::PhysMemory for OneByte<'_> {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), introspect::MemError> {
        self.inner.read_phys(pa, buf)?;
        if self.pa >= pa && self.pa < pa + buf.len() as u64 {
            buf[(self.pa - pa) as usize] = self.byte;
        }
        Ok(())
    }
    fn regions(&self) -> Vec<(u64, u64)> {
        self.inner.regions()
    }
}

/// `Kernel::task_stack` keeps a sleeping task's unwind while its stack is unchanged, and never
/// reuses it once a byte of the stack changed.
fn kept_unwinds(ver: &'static str) {
    let s = load(ver);
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let (t, a) = tasks
        .iter()
        .filter(|t| t.running_on_vcpu.is_none() && !t.on_cpu)
        .find_map(|t| {
            let st = s.kernel.task_stack(&s.mem, t).ok()?;
            (st.reliable && st.frames.len() >= 4).then_some((t, st))
        })
        .expect("a sleeping task with a deep stack");
    assert_eq!(
        s.kernel.task_stack(&s.mem, t).unwrap(),
        a,
        "{ver}: kept unwind"
    );
    // Change the return address of the second frame where it sits on the stack.
    let want = a.frames[1].addr;
    let mut va = t.thread_sp;
    let slot = loop {
        assert!(
            va < t.stack_base + 0x8000,
            "{ver}: return address not on the stack"
        );
        let mut b = [0u8; 8];
        s.kernel.read_virt(&s.mem, va, &mut b).unwrap();
        if u64::from_le_bytes(b) == want {
            break va;
        }
        va += 8;
    };
    let pa = s.kernel.translate(&s.mem, slot + 1).unwrap();
    let mut old = [0u8; 1];
    introspect::PhysMemory::read_phys(&s.mem, pa, &mut old).unwrap();
    let changed = OneByte {
        inner: &s.mem,
        pa,
        byte: old[0] ^ 0x40,
    };
    let c = s.kernel.task_stack(&changed, t).unwrap();
    assert_ne!(c, a, "{ver}: an unwind was reused over a changed stack");
    assert_ne!(c.frames.get(1).map(|f| f.addr), Some(want), "{ver}");
    // And back: the original memory gives the original unwind.
    assert_eq!(s.kernel.task_stack(&s.mem, t).unwrap(), a, "{ver}");
}

#[test]
fn kept_unwinds_6_12() {
    kept_unwinds("6.12");
}

#[test]
fn kept_unwinds_6_1() {
    kept_unwinds("6.1");
}
