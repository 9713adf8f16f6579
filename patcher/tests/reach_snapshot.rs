//! The reachability check and the held/free cycle of unloading on the saved guest snapshots
//! (6.1 and 6.12): synthetic stack contents and vCPU states are written into a copy of the
//! snapshot's RAM and registers, and `Engine::unload` / `Engine::reap` (with
//! `introspect::Kernel` as the `Reachability`) must hold the patch exactly while something live
//! points into its pages, and free it — leaving the RAM byte for byte as in the snapshot — once
//! nothing does.
//!
//! Scenarios, per kernel:
//! 0. registers: patch code in RIP, patch data in a GPR of a kernel-mode vCPU;
//! 1. an IRQ stack over a task stack: vCPU 0 on its CPU's hardirq stack, the top slot saving a
//!    stack pointer into its current task's stack; a return address into the patch above the
//!    saved sp holds, one below it (dead) does not; the same on the IRQ stack itself;
//! 2. a switched-out task: a patch address at and above `thread.sp` holds (naming the task),
//!    below it does not;
//! 3. an IST (NMI) stack: iret frame at the top with a kernel `cs`, patch data above the frame's
//!    `rsp` on the task stack holds, a patch address on the NMI stack holds, dead slots do not,
//!    a user `cs` ends the chain; NMI over IRQ over task (2 switches);
//! 4. unknown: RSP on no known stack, an IRQ stack linking nowhere, a task whose `thread.sp`
//!    lies outside its stack: held as "unknown", never freed until the information is back;
//! 5. several holders at once; after restoring memory and vCPUs, reap frees and the RAM equals
//!    the snapshot.

mod common;

use std::time::Duration;

use common::{cmdline_patch, snap_6_1, snap_6_12, SnapGuest, Snapshot};
use introspect::tasks::Task;
use introspect::{Kernel, VcpuRegs};
use patcher::{Engine, Hold, KernelPaging, PatchError, PatchInfo, PatchState, Target};

const NAME: &str = "cmdline-fix";
const KERNEL_CS: u64 = 0x10;
const KERNEL_SS: u16 = 0x18;
const USER_CS: u64 = 0x33;

/// What scenario 1, 3 and 4 need about vCPU 0's CPU.
struct Cpu0 {
    /// Per-CPU base (`gs_base` in kernel mode).
    base: u64,
    /// The task `current` on it.
    current: Task,
    /// `[stack_base, stack_base + THREAD_SIZE)` of `current`.
    task_stack: (u64, u64),
    /// `*(base + hardirq_stack_ptr)`: the IRQ stack's top slot (holds the interrupted sp).
    irq_slot: u64,
    /// The IRQ stack `[irq_slot + 8 - THREAD_SIZE, irq_slot + 8)`.
    irq_stack: (u64, u64),
    /// The NMI IST stack `[start, end)` inside `*(base + cea_exception_stacks)`.
    nmi_stack: (u64, u64),
}

struct Lab {
    s: &'static Snapshot,
    k: Kernel,
    g: SnapGuest,
    e: Engine,
    obj: Vec<u8>,
    paging: KernelPaging,
    /// Kernel VAs of the 8-byte slots written (restored from the snapshot's RAM).
    touched: Vec<u64>,
    thread_size: u64,
    /// `cmdline_proc_show`.
    func: u64,
    /// Its patch site and the bytes there in the snapshot.
    site: u64,
    site_orig: Vec<u8>,
}

impl Lab {
    fn new(s: &'static Snapshot) -> Lab {
        let k = common::kernel(s);
        let g = s.guest();
        let paging = KernelPaging::from_regs(&s.vcpus[0]);
        let thread_size = k
            .model(&g.ram)
            .unwrap_or_else(|e| panic!("{}: kernel model: {e}", s.version))
            .thread_size;
        let func = k
            .lookup("cmdline_proc_show", None)
            .unwrap_or_else(|e| panic!("{}: cmdline_proc_show: {e}", s.version));
        let mut lab = Lab {
            s,
            k,
            g,
            e: Engine::new(),
            obj: cmdline_patch(),
            paging,
            touched: Vec::new(),
            thread_size,
            func,
            site: 0,
            site_orig: Vec::new(),
        };
        // Every vCPU of the snapshot must be in kernel mode with a per-CPU base in gs_base for
        // the scenarios that take over vCPU 0 to be meaningful (they are: both idle in HLT).
        assert!(
            s.vcpus.iter().all(|r| r.cpl() == 0),
            "{}: snapshot vCPUs not all in kernel mode",
            s.version
        );
        // Nothing refers to a fresh patch in the snapshot itself: a plain unload frees it.
        let info = lab.load();
        lab.site = info.functions[0].site;
        let pa = lab.pa(lab.site);
        lab.site_orig = s.ram[pa..pa + 5].to_vec();
        lab.e
            .unload(&mut lab.g, NAME, &lab.k, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{}: baseline unload: {e}", s.version));
        lab.check_ram("baseline unload");
        lab
    }

    fn v(&self) -> &'static str {
        self.s.version
    }

    fn pa(&self, va: u64) -> usize {
        self.k
            .translate(&self.g.ram, va)
            .unwrap_or_else(|e| panic!("{}: translating {va:#x}: {e}", self.v())) as usize
    }

    fn peek(&self, va: u64) -> u64 {
        let pa = self.pa(va);
        u64::from_le_bytes(self.g.ram.0[pa..pa + 8].try_into().unwrap())
    }

    /// Writes `val` at kernel VA `va` (remembered for [`Lab::restore`]).
    fn poke(&mut self, va: u64, val: u64) {
        assert_eq!(va & 7, 0, "unaligned slot {va:#x}");
        let pa = self.pa(va);
        if !self.touched.contains(&va) {
            self.touched.push(va);
        }
        self.g.ram.0[pa..pa + 8].copy_from_slice(&val.to_le_bytes());
    }

    /// Puts the slot at `va` back to the snapshot's value.
    fn unpoke(&mut self, va: u64) {
        let pa = self.pa(va);
        self.g.ram.0[pa..pa + 8].copy_from_slice(&self.s.ram[pa..pa + 8]);
    }

    /// Every slot written and every vCPU back as in the snapshot.
    fn restore(&mut self) {
        for va in std::mem::take(&mut self.touched) {
            self.unpoke(va);
        }
        self.g.vcpus = self.s.vcpus.clone();
    }

    fn check_ram(&self, what: &str) {
        if self.g.ram.0 != self.s.ram {
            let first = self
                .g
                .ram
                .0
                .iter()
                .zip(&self.s.ram)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "{} {what}: guest RAM differs from the snapshot, first at {first:#x}",
                self.v()
            );
        }
    }

    fn read(&self, va: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.paging
            .read_virt(&self.g.ram, va, &mut b)
            .unwrap_or_else(|e| panic!("{}: reading {va:#x}: {e}", self.v()));
        b
    }

    fn load(&mut self) -> PatchInfo {
        let t = Target {
            symbols: &self.s.syms,
            paging: self.paging,
        };
        let info = self
            .e
            .load(&mut self.g, &t, &self.obj, "cmdline.o")
            .unwrap_or_else(|e| panic!("{}: load: {e}", self.s.version));
        assert_eq!(info.name, NAME);
        assert_eq!(info.state, PatchState::Enabled);
        assert_eq!(
            self.read(info.functions[0].site, 1),
            [0xe9],
            "{}: patched entry is a jmp",
            self.v()
        );
        info
    }

    /// `unload(.., ZERO)` must end in `PatchError::Held`: the entry is restored, the pages are
    /// mapped and unchanged, the patch is listed as held with the same [`Hold`].
    fn unload_held(&mut self, what: &str, info: &PatchInfo) -> Hold {
        let code = self.read(info.code.va, info.code.len as usize);
        let data = self.read(info.data.va, info.data.len as usize);
        let hold = match self.e.unload(&mut self.g, NAME, &self.k, Duration::ZERO) {
            Err(PatchError::Held { name, hold, by, .. }) => {
                assert_eq!(name, NAME);
                assert_eq!(by, hold.by);
                *hold
            }
            other => panic!("{} {what}: expected Held, got {other:?}", self.v()),
        };
        assert_eq!(
            self.read(self.site, 5),
            self.site_orig,
            "{} {what}: entry of cmdline_proc_show restored",
            self.v()
        );
        assert_eq!(
            self.read(info.code.va, info.code.len as usize),
            code,
            "{} {what}: held code intact",
            self.v()
        );
        assert_eq!(
            self.read(info.data.va, info.data.len as usize),
            data,
            "{} {what}: held data intact",
            self.v()
        );
        let now = self
            .e
            .info(NAME)
            .unwrap_or_else(|| panic!("{} {what}: held patch not listed", self.v()));
        assert_eq!(now.state, PatchState::Held, "{} {what}", self.v());
        assert_eq!(now.held.as_ref(), Some(&hold), "{} {what}", self.v());
        assert!(
            now.functions.iter().all(|f| !f.active),
            "{} {what}: held patch has an active function",
            self.v()
        );
        assert_eq!(self.e.list().len(), 1);
        hold
    }

    /// A reap must keep the patch; returns the new hold.
    fn reap_keeps(&mut self, what: &str) -> Hold {
        let freed = self
            .e
            .reap(&mut self.g, &self.k)
            .unwrap_or_else(|e| panic!("{} {what}: reap: {e}", self.v()));
        assert!(
            freed.is_empty(),
            "{} {what}: reap freed {freed:?} though it is reachable",
            self.v()
        );
        let p = self.e.info(NAME).unwrap();
        assert_eq!(p.state, PatchState::Held);
        p.held
            .unwrap_or_else(|| panic!("{} {what}: held patch without a hold", self.v()))
    }

    /// A reap must free the patch.
    fn reap_frees(&mut self, what: &str) {
        let freed = self
            .e
            .reap(&mut self.g, &self.k)
            .unwrap_or_else(|e| panic!("{} {what}: reap: {e}", self.v()));
        let hold = self.e.info(NAME).and_then(|p| p.held);
        assert_eq!(
            freed,
            vec![NAME.to_string()],
            "{} {what}: reap did not free the patch; hold: {hold:#?}",
            self.v()
        );
        assert!(self.e.list().is_empty(), "{} {what}", self.v());
    }

    /// Restore memory and vCPUs after a scenario whose patch was freed: RAM = snapshot.
    fn end_scenario(&mut self, what: &str) {
        assert!(self.e.list().is_empty(), "{} {what}: patch left", self.v());
        self.restore();
        self.check_ram(what);
    }

    fn cpu0(&self) -> Cpu0 {
        let v = self.v();
        let m = self
            .k
            .model(&self.g.ram)
            .unwrap_or_else(|e| panic!("{v}: kernel model: {e}"));
        let cpus = self
            .k
            .vcpu_cpus(&self.g.ram, &self.g.vcpus)
            .unwrap_or_else(|e| panic!("{v}: vcpu_cpus: {e}"));
        let c = cpus[0];
        let base = c
            .percpu_base
            .unwrap_or_else(|| panic!("{v}: no per-CPU base for vCPU 0"));
        let cur = c
            .current
            .unwrap_or_else(|| panic!("{v}: no current task on vCPU 0"));
        let tasks = self
            .k
            .tasks(&self.g.ram, &self.g.vcpus)
            .unwrap_or_else(|e| panic!("{v}: tasks: {e}"));
        let current = tasks
            .into_iter()
            .find(|t| t.addr == cur)
            .unwrap_or_else(|| panic!("{v}: vCPU 0's current {cur:#x} is not in the task list"));
        assert_ne!(current.stack_base, 0, "{v}: current has no stack");
        let task_stack = (current.stack_base, current.stack_base + m.thread_size);
        let hoff = m
            .percpu
            .hardirq_stack_ptr
            .unwrap_or_else(|| panic!("{v}: per-CPU hardirq_stack_ptr missing from the model"));
        let irq_slot = self.peek(base + hoff);
        assert!(
            irq_slot >> 63 == 1 && irq_slot & 7 == 0,
            "{v}: hardirq_stack_ptr of CPU {:?} is {irq_slot:#x}",
            c.cpu
        );
        let irq_stack = (irq_slot + 8 - m.thread_size, irq_slot + 8);
        let coff = m
            .percpu
            .cea_exception_stacks
            .unwrap_or_else(|| panic!("{v}: per-CPU cea_exception_stacks missing from the model"));
        assert!(
            m.percpu.cea_exception_stacks_size > 0,
            "{v}: sizeof(struct cea_exception_stacks) unknown"
        );
        let cea = self.peek(base + coff);
        assert!(cea >> 63 == 1, "{v}: cea_exception_stacks = {cea:#x}");
        let nmi = m
            .btf
            .member("cea_exception_stacks", "NMI_stack")
            .unwrap_or_else(|e| panic!("{v}: BTF cea_exception_stacks.NMI_stack: {e}"));
        assert!(
            nmi.size >= 0x1000 && nmi.offset + nmi.size <= m.percpu.cea_exception_stacks_size,
            "{v}: NMI_stack at +{:#x} size {:#x}",
            nmi.offset,
            nmi.size
        );
        let nmi_stack = (cea + nmi.offset, cea + nmi.offset + nmi.size);
        Cpu0 {
            base,
            current,
            task_stack,
            irq_slot,
            irq_stack,
            nmi_stack,
        }
    }

    /// vCPU 0 in kernel mode at `cmdline_proc_show` with stack pointer `rsp`.
    fn vcpu0_kernel(&mut self, cpu: &Cpu0, rsp: u64) {
        let r: &mut VcpuRegs = &mut self.g.vcpus[0];
        r.cs = KERNEL_CS as u16;
        r.ss = KERNEL_SS;
        r.gs_base = cpu.base;
        r.rip = self.func;
        r.gprs[VcpuRegs::RSP] = rsp;
    }

    /// The stack pointer the IRQ / NMI "interrupted" on vCPU 0's task stack: the snapshot's RSP
    /// if it is on that stack (it is: the idle loop), else 3/4 up the stack.
    fn interrupted_sp(&self, cpu: &Cpu0) -> u64 {
        let rsp = self.s.vcpus[0].rsp() & !7;
        let (lo, hi) = cpu.task_stack;
        if rsp >= lo + 0x100 && rsp + 0x100 <= hi {
            rsp
        } else {
            lo + self.thread_size * 3 / 4
        }
    }
}

fn assert_kinds(v: &str, what: &str, hold: &Hold, want: &[&str]) {
    assert_eq!(
        hold.kinds,
        want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "{v} {what}: kinds; hold: {hold:#?}"
    );
}

fn assert_holder(v: &str, what: &str, hold: &Hold, t: &Task) {
    assert_eq!(
        (hold.pid, hold.comm.as_deref()),
        (Some(t.pid), Some(t.comm.as_str())),
        "{v} {what}: holder; hold: {hold:#?}"
    );
}

/// 0: patch addresses in vCPU registers.
fn registers(l: &mut Lab) {
    let v = l.v();
    let cpu = l.cpu0();
    let info = l.load();
    l.g.vcpus[0].rip = info.code.va + 0x10;
    let h = l.unload_held("rip", &info);
    assert_kinds(v, "rip", &h, &["code in rip"]);
    assert_holder(v, "rip", &h, &cpu.current);
    assert!(h.by.contains("running on vCPU 0"), "{v}: {}", h.by);
    l.g.vcpus[0].rip = l.s.vcpus[0].rip;
    l.g.vcpus[0].gprs[1] = info.data.va + 0x18; // rbx
    let h = l.reap_keeps("rbx");
    assert_kinds(v, "rbx", &h, &["data in register"]);
    assert!(h.by.contains("rbx"), "{v}: {}", h.by);
    // A user-mode vCPU's registers hold nothing of the kernel.
    l.g.vcpus[0].cs = USER_CS as u16;
    l.g.vcpus[0].kernel_gs_base = cpu.base;
    l.g.vcpus[0].gs_base = 0;
    l.reap_frees("rbx in user mode");
    l.end_scenario("registers");
}

/// 1: IRQ stack over the current task's stack.
fn irq_over_task(l: &mut Lab) {
    let v = l.v();
    let cpu = l.cpu0();
    let info = l.load();
    let task_sp = l.interrupted_sp(&cpu);
    let irq_rsp = cpu.irq_slot - 0x200;
    assert!(irq_rsp >= cpu.irq_stack.0);
    let code = info.code.va + 0x10;
    l.vcpu0_kernel(&cpu, irq_rsp);
    l.poke(cpu.irq_slot, task_sp);
    l.poke(task_sp + 0x20, code);
    let h = l.unload_held("irq: code above saved sp", &info);
    assert_kinds(v, "irq", &h, &["code in task stack behind 1 switch"]);
    assert_holder(v, "irq", &h, &cpu.current);
    assert_eq!(h.references, 1, "{v}: {h:#?}");
    assert!(
        h.by.contains("running on vCPU 0") && h.by.contains(&format!("{code:#x}")),
        "{v}: {}",
        h.by
    );
    // The slot exactly at the saved sp is live too.
    l.unpoke(task_sp + 0x20);
    l.poke(task_sp, code);
    let h = l.reap_keeps("irq: code at saved sp");
    assert_kinds(v, "irq at sp", &h, &["code in task stack behind 1 switch"]);
    // On the IRQ stack itself, above its RSP.
    l.poke(irq_rsp + 0x40, info.code.va + 0x20);
    let h = l.reap_keeps("irq: code on irq stack");
    assert_kinds(
        v,
        "irq stack",
        &h,
        &["code in irq stack", "code in task stack behind 1 switch"],
    );
    assert_eq!(h.references, 2, "{v}: {h:#?}");
    // Dead: below the IRQ stack's RSP and below the saved sp.
    l.unpoke(irq_rsp + 0x40);
    l.poke(irq_rsp - 0x40, info.code.va + 0x20);
    l.unpoke(task_sp);
    l.poke(task_sp - 0x20, code);
    l.poke(task_sp - 8, code);
    l.reap_frees("irq: code below saved sp");
    l.end_scenario("irq over task");
}

/// 2: a switched-out task's stack from `thread.sp`.
fn sleeping_task(l: &mut Lab) {
    let v = l.v();
    let ts = l.thread_size;
    let tasks = l.k.tasks(&l.g.ram, &l.g.vcpus).unwrap();
    let ok = |t: &&Task| {
        t.running_on_vcpu.is_none()
            && t.stack_base != 0
            && t.thread_sp >= t.stack_base + 0x100
            && t.thread_sp + 0x100 < t.stack_base + ts
    };
    let t = tasks
        .iter()
        .filter(ok)
        .find(|t| t.is_process() && !t.is_kthread)
        .or_else(|| tasks.iter().find(ok))
        .unwrap_or_else(|| panic!("{v}: no switched-out task with a valid stack"))
        .clone();
    let sp = t.thread_sp & !7;
    let info = l.load();
    let code = info.code.va + 0x30;
    l.poke(sp + 0x40, code);
    let h = l.unload_held("task: code above thread.sp", &info);
    assert_kinds(v, "task", &h, &["code in task stack"]);
    assert_holder(v, "task", &h, &t);
    assert!(
        h.by.starts_with(&format!("pid {} ({})", t.pid, t.comm)),
        "{v}: {}",
        h.by
    );
    l.unpoke(sp + 0x40);
    l.poke(sp, info.data.va);
    let h = l.reap_keeps("task: data at thread.sp");
    assert_kinds(v, "task at sp", &h, &["data in task stack"]);
    assert_holder(v, "task at sp", &h, &t);
    l.unpoke(sp);
    l.poke(sp - 8, code);
    l.poke(sp - 0x40, info.data.va);
    l.reap_frees("task: below thread.sp");
    l.end_scenario("sleeping task");
}

/// 3: the NMI IST stack over the task stack (and over the IRQ stack over the task stack).
fn nmi_over_task(l: &mut Lab) {
    let v = l.v();
    let cpu = l.cpu0();
    let (_, top) = cpu.nmi_stack;
    let nmi_rsp = top - 0x100;
    let task_sp = l.interrupted_sp(&cpu);
    let setup = |l: &mut Lab, cs: u64, sp: u64| {
        l.vcpu0_kernel(&cpu, nmi_rsp);
        l.poke(top - 40, l.func); // rip
        l.poke(top - 32, cs);
        l.poke(top - 24, 0x2); // rflags
        l.poke(top - 16, sp);
        l.poke(top - 8, if cs == KERNEL_CS { 0x18 } else { 0x2b });
    };
    let info = l.load();
    let data = info.data.va + 8;
    setup(l, KERNEL_CS, task_sp);
    l.poke(task_sp + 0x18, data);
    let h = l.unload_held("nmi: data above frame rsp", &info);
    assert_kinds(v, "nmi", &h, &["data in task stack behind 1 switch"]);
    assert_holder(v, "nmi", &h, &cpu.current);
    // A patch address on the NMI stack, above its RSP.
    l.poke(nmi_rsp + 0x10, info.code.va + 0x40);
    let h = l.reap_keeps("nmi: code on the nmi stack");
    assert_kinds(
        v,
        "nmi stack",
        &h,
        &[
            "code in exception stack",
            "data in task stack behind 1 switch",
        ],
    );
    // The NMI interrupted the patch's code: the iret frame's rip (top - 40) is live.
    l.unpoke(nmi_rsp + 0x10);
    l.poke(top - 40, info.code.va + 0x44);
    let h = l.reap_keeps("nmi: interrupted rip in the patch");
    assert_kinds(
        v,
        "nmi frame rip",
        &h,
        &[
            "code in exception stack",
            "data in task stack behind 1 switch",
        ],
    );
    assert!(
        h.by.contains(&format!("{:#x} at {:#x}", info.code.va + 0x44, top - 40))
            || h.by
                .contains(&format!("{:#x} at {:#x}", data, task_sp + 0x18)),
        "{v}: {}",
        h.by
    );
    l.poke(top - 40, l.func);
    // Dead on the NMI stack (below its RSP): only the task stack slot remains.
    l.unpoke(nmi_rsp + 0x10);
    l.poke(nmi_rsp - 0x10, info.code.va + 0x40);
    let h = l.reap_keeps("nmi: code below the nmi rsp");
    assert_kinds(v, "nmi dead", &h, &["data in task stack behind 1 switch"]);
    // Dead on the task stack (below the frame's rsp).
    l.unpoke(task_sp + 0x18);
    l.poke(task_sp - 0x18, data);
    l.reap_frees("nmi: data below frame rsp");
    l.end_scenario("nmi over task");

    // The NMI came from user mode: the chain ends at the NMI stack; vCPU 0's task has no live
    // kernel stack, so the same task-stack slot holds nothing.
    let info = l.load();
    setup(l, USER_CS, 0x7ffe_0000_1000);
    l.poke(task_sp + 0x18, info.data.va + 8);
    let r =
        l.e.unload(&mut l.g, NAME, &l.k, Duration::ZERO)
            .unwrap_or_else(|e| panic!("{v} nmi from user: expected freed, got {e}"));
    assert_eq!(r.checks, 1);
    l.end_scenario("nmi from user mode");

    // NMI over IRQ over task: two switches.
    let info = l.load();
    let irq_sp = cpu.irq_slot - 0x300;
    setup(l, KERNEL_CS, irq_sp);
    l.poke(cpu.irq_slot, task_sp);
    l.poke(task_sp + 0x28, info.code.va + 0x50);
    let h = l.unload_held("nmi over irq over task", &info);
    assert_kinds(
        v,
        "nmi/irq/task",
        &h,
        &["code in task stack behind 2 switch"],
    );
    assert_holder(v, "nmi/irq/task", &h, &cpu.current);
    l.poke(irq_sp + 0x8, info.data.va);
    let h = l.reap_keeps("nmi over irq: data on irq stack");
    assert_kinds(
        v,
        "nmi/irq",
        &h,
        &[
            "code in task stack behind 2 switch",
            "data in irq stack behind 1 switch",
        ],
    );
    l.unpoke(irq_sp + 0x8);
    l.unpoke(task_sp + 0x28);
    l.reap_frees("nmi over irq over task, cleared");
    l.end_scenario("nmi over irq over task");
}

fn assert_unknown(v: &str, what: &str, h: &Hold) {
    assert!(
        h.kinds.len() == 1 && h.kinds[0].starts_with("unknown"),
        "{v} {what}: expected one unknown kind; hold: {h:#?}"
    );
}

/// 4: what cannot be determined holds.
fn unknown(l: &mut Lab) {
    let v = l.v();
    let cpu = l.cpu0();
    // RSP on no known stack (a kernel text address).
    let info = l.load();
    l.vcpu0_kernel(&cpu, l.func & !0xf);
    let h = l.unload_held("rsp on no stack", &info);
    assert_unknown(v, "rsp on no stack", &h);
    assert!(h.kinds[0].contains("no known stack"), "{v}: {h:#?}");
    assert_holder(v, "rsp on no stack", &h, &cpu.current);
    let h = l.reap_keeps("rsp on no stack, again");
    assert_unknown(v, "rsp on no stack, again", &h);
    l.g.vcpus = l.s.vcpus.clone();
    l.reap_frees("rsp back");
    l.end_scenario("unknown rsp");

    // An IRQ stack whose saved sp is on no known stack.
    let info = l.load();
    l.vcpu0_kernel(&cpu, cpu.irq_slot - 0x200);
    l.poke(cpu.irq_slot, l.func & !0xf);
    let h = l.unload_held("irq links nowhere", &info);
    assert_unknown(v, "irq links nowhere", &h);
    assert!(h.kinds[0].contains("irq stack links to"), "{v}: {h:#?}");
    l.restore();
    l.reap_frees("irq link back");
    l.end_scenario("unknown irq link");

    // A switched-out task whose thread.sp is outside its stack.
    let tasks = l.k.tasks(&l.g.ram, &l.g.vcpus).unwrap();
    let t = tasks
        .iter()
        .find(|t| t.running_on_vcpu.is_none() && t.stack_base != 0 && !t.is_idle)
        .unwrap_or_else(|| panic!("{v}: no switched-out task"))
        .clone();
    let off = l.k.model(&l.g.ram).unwrap().task.thread_sp;
    let info = l.load();
    l.poke(t.addr + off, t.stack_base - 0x1000);
    let h = l.unload_held("thread.sp outside its stack", &info);
    assert_unknown(v, "thread.sp outside", &h);
    assert!(h.kinds[0].contains("outside its stack"), "{v}: {h:#?}");
    assert_holder(v, "thread.sp outside", &h, &t);
    l.restore();
    l.reap_frees("thread.sp back");
    l.end_scenario("unknown thread.sp");
}

/// 5: several holders; restoring memory and vCPUs frees the patch and restores all RAM.
fn all_at_once(l: &mut Lab) {
    let v = l.v();
    let cpu = l.cpu0();
    let tasks = l.k.tasks(&l.g.ram, &l.g.vcpus).unwrap();
    let sleeper = tasks
        .iter()
        .find(|t| {
            t.running_on_vcpu.is_none()
                && t.stack_base != 0
                && t.thread_sp >= t.stack_base
                && t.thread_sp + 0x100 < t.stack_base + l.thread_size
        })
        .unwrap_or_else(|| panic!("{v}: no switched-out task"))
        .clone();
    let info = l.load();
    let task_sp = l.interrupted_sp(&cpu);
    l.vcpu0_kernel(&cpu, cpu.irq_slot - 0x200);
    l.poke(cpu.irq_slot, task_sp);
    l.poke(task_sp + 0x30, info.code.va);
    l.poke((sleeper.thread_sp & !7) + 0x48, info.data.va + 0x10);
    l.g.vcpus[1].gprs[12] = info.code.va + 0x8; // r12 of vCPU 1
    let h = l.unload_held("all at once", &info);
    assert_eq!(h.references, 3, "{v}: {h:#?}");
    assert_kinds(
        v,
        "all at once",
        &h,
        &[
            "code in register",
            "code in task stack behind 1 switch",
            "data in task stack",
        ],
    );
    // Memory and vCPU 0 back first: vCPU 1's register still holds it. (vCPU 0 must leave the
    // IRQ stack together with its top slot: the snapshot's stale saved sp there may point to
    // another task's stack, which is "unknown" for a vCPU on that IRQ stack.)
    for va in std::mem::take(&mut l.touched) {
        l.unpoke(va);
    }
    l.g.vcpus[0] = l.s.vcpus[0];
    let h = l.reap_keeps("registers not yet restored");
    assert_kinds(v, "registers", &h, &["code in register"]);
    l.g.vcpus = l.s.vcpus.clone();
    l.reap_frees("everything restored");
    assert_eq!(l.g.vcpus, l.s.vcpus);
    l.end_scenario("all at once");
}

fn run_all(s: &'static Snapshot) {
    let mut l = Lab::new(s);
    registers(&mut l);
    irq_over_task(&mut l);
    sleeping_task(&mut l);
    nmi_over_task(&mut l);
    unknown(&mut l);
    all_at_once(&mut l);
    l.check_ram("after all scenarios");
}

#[test]
fn reachability_and_held_cycle_6_1() {
    run_all(snap_6_1());
}

#[test]
fn reachability_and_held_cycle_6_12() {
    run_all(snap_6_12());
}
