//! What every CPU and task could still use: the registers of each vCPU in kernel mode and the
//! live part of every kernel stack, following stack switches (IRQ stack → task stack, IST
//! exception stack → whatever it interrupted). [`find_references`] scans all of it for values
//! inside given address ranges. This is what decides whether code or data that the guest was
//! running may be freed: a return address, a saved RIP in `pt_regs`, a pointer in a callee-saved
//! register slot or a local — anything in a live slot or a register counts.
//!
//! The scan is conservative on purpose: every 8-byte slot between a stack's current stack pointer
//! and its top, not only the return addresses the unwinder finds (the arena has no ORC, and
//! data pointers are not frames). Anything that cannot be determined — a stack pointer on no
//! known stack, a saved stack pointer outside its task's stack, an unreadable page — is reported
//! as a reference too, so a caller never frees on missing information.

use serde::Serialize;

use crate::model::{GuestAccess, Model};
use crate::regs::VcpuRegs;
use crate::stack::vcpu_stack_ranges_of;
use crate::tasks::{list_tasks, vcpu_cpus, Task, TaskError};
use crate::unwind::{StackRange, StackReader, StackType};

/// Longest chain of stack switches followed from one vCPU (NMI over #DB over IRQ over task is 4).
const MAX_HOPS: usize = 6;
/// Most references [`find_references`] collects (it stops at the first context past this):
/// a hostile guest could otherwise make it collect millions.
pub const MAX_REFERENCES: usize = 64;
/// Largest live segment scanned (a task or IRQ stack is 16 KiB; IST stacks are smaller).
const MAX_SEGMENT: u64 = 64 << 10;

/// IST stacks inside `struct cea_exception_stacks` (each `<name>_stack` member).
const IST_STACKS: &[&str] = &[
    "DF_stack",
    "NMI_stack",
    "DB_stack",
    "MCE_stack",
    "VC_stack",
    "VC2_stack",
];

/// A task, as named in reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskRef {
    /// `struct task_struct *`.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// Thread id.
    pub pid: i32,
    /// `comm`.
    pub comm: String,
}

impl From<&Task> for TaskRef {
    fn from(t: &Task) -> Self {
        TaskRef {
            addr: t.addr,
            pid: t.pid,
            comm: t.comm.clone(),
        }
    }
}

/// Whose context a live region belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Owner {
    /// A vCPU in kernel mode (its registers and every stack it is on), with its `current`.
    Vcpu {
        /// vCPU index.
        vcpu: usize,
        /// The task it runs, if identified.
        task: Option<TaskRef>,
    },
    /// A switched-out task (preempted, sleeping or never run): its stack from `thread.sp` up.
    Task(TaskRef),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Vcpu {
                vcpu,
                task: Some(t),
            } => write!(f, "pid {} ({}) running on vCPU {vcpu}", t.pid, t.comm),
            Owner::Vcpu { vcpu, task: None } => write!(f, "vCPU {vcpu} (current task unknown)"),
            Owner::Task(t) => write!(f, "pid {} ({})", t.pid, t.comm),
        }
    }
}

/// One live stack region `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Lowest live address (the stack pointer).
    #[serde(with = "crate::hex")]
    pub start: u64,
    /// Top of the stack.
    #[serde(with = "crate::hex")]
    pub end: u64,
    /// Which stack.
    #[serde(serialize_with = "ser_stack_type")]
    pub ty: StackType,
    /// Stack switches followed to get here (0 = the stack the vCPU's RSP is on).
    pub hops: usize,
}

fn ser_stack_type<S: serde::Serializer>(t: &StackType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(stack_type_name(*t))
}

/// Lower-case name of a stack type ("task", "irq", "exception", "entry").
pub fn stack_type_name(t: StackType) -> &'static str {
    match t {
        StackType::Task => "task",
        StackType::Irq => "irq",
        StackType::Exception => "exception",
        StackType::Entry => "entry",
    }
}

/// Everything one CPU or task could still use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveContext {
    /// Whose it is.
    pub owner: Owner,
    /// Register values (`rip`, `rax`, …) of a kernel-mode vCPU; empty for a switched-out task.
    #[serde(with = "crate::hex")]
    pub regs: Vec<(&'static str, u64)>,
    /// Live stack regions, innermost first.
    pub segments: Vec<Segment>,
    /// Why the live region is not fully known (then a careful caller assumes the worst).
    pub unknown: Option<String>,
}

/// Where a reference was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Place {
    /// In a vCPU register.
    Register(&'static str),
    /// In a stack slot.
    Stack {
        /// Address of the slot.
        #[serde(with = "crate::hex")]
        slot: u64,
        /// Which stack.
        #[serde(serialize_with = "ser_stack_type")]
        ty: StackType,
        /// Stack switches followed from the vCPU's RSP (0 for switched-out tasks).
        hops: usize,
    },
    /// The context's live region could not be determined or read.
    Unknown(String),
}

/// A value in the guest that points into one of the ranges asked about (or a context whose
/// contents are unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reference {
    /// Whose.
    pub owner: Owner,
    /// Where.
    pub place: Place,
    /// The value (0 for [`Place::Unknown`]).
    #[serde(with = "crate::hex")]
    pub value: u64,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.place {
            Place::Register(r) => write!(f, "{}: {r} = {:#x}", self.owner, self.value),
            Place::Stack { slot, ty, hops } => {
                write!(
                    f,
                    "{}: {:#x} at {slot:#x} on its {} stack",
                    self.owner,
                    self.value,
                    stack_type_name(*ty)
                )?;
                if *hops > 0 {
                    write!(f, " ({hops} stack switch(es) below the vCPU's RSP)")?;
                }
                Ok(())
            }
            Place::Unknown(why) => write!(f, "{}: cannot tell what it holds: {why}", self.owner),
        }
    }
}

/// Splits the one `Exception` range (the whole `struct cea_exception_stacks`) into its IST
/// stacks, using BTF member offsets. Without them the range is dropped: an RSP there then is
/// on no known stack, which callers treat as unknown.
fn split_exception_stacks(ist: &[(u64, u64)], ranges: Vec<StackRange>) -> Vec<StackRange> {
    let mut out = Vec::new();
    for r in ranges {
        if r.ty != StackType::Exception {
            out.push(r);
            continue;
        }
        for &(offset, size) in ist {
            let Some(start) = r.start.checked_add(offset) else {
                continue;
            };
            match start.checked_add(size) {
                Some(end) if size > 0 && end <= r.end => out.push(StackRange {
                    start,
                    end,
                    ty: StackType::Exception,
                }),
                _ => {}
            }
        }
    }
    out
}

/// `(offset, size)` of each IST stack in `struct cea_exception_stacks`, from BTF.
fn ist_members(m: &Model) -> Vec<(u64, u64)> {
    IST_STACKS
        .iter()
        .filter_map(|name| m.btf.member("cea_exception_stacks", name).ok())
        .map(|mem| (mem.offset, mem.size))
        .collect()
}

/// The live stack segments of a vCPU whose stack pointer is `rsp`, given the stacks it may be
/// on. From the stack holding `rsp`, everything up to that stack's top is live; then:
/// - an IRQ stack's top slot holds the stack pointer it was entered from (`call_on_irqstack`);
/// - an IST stack's top holds the hardware iret frame: `ss`, `rsp`, `rflags`, `cs`, `rip`
///   downwards from the top; a user-mode `cs` ends the chain;
/// - a task or entry stack ends the chain.
///
/// `Err` names what could not be followed.
pub fn live_chain(
    stacks: &[StackRange],
    rsp: u64,
    mem: &dyn StackReader,
) -> Result<Vec<Segment>, String> {
    let mut out: Vec<Segment> = Vec::new();
    let mut seen = Vec::new();
    let mut sp = rsp;
    for hops in 0..MAX_HOPS {
        let Some((i, s)) = stacks
            .iter()
            .enumerate()
            .find(|(_, s)| sp >= s.start && sp < s.end)
        else {
            return Err(match out.last() {
                None => format!("rsp {sp:#x} is on no known stack"),
                Some(prev) => format!(
                    "the {} stack links to {sp:#x}, which is on no known stack",
                    stack_type_name(prev.ty)
                ),
            });
        };
        if seen.contains(&i) {
            return Err(format!(
                "the stack chain returns to the {} stack at {sp:#x}",
                stack_type_name(s.ty)
            ));
        }
        seen.push(i);
        if s.end - s.start > MAX_SEGMENT {
            return Err(format!(
                "{} stack [{:#x}, {:#x}) is larger than {MAX_SEGMENT} bytes",
                stack_type_name(s.ty),
                s.start,
                s.end
            ));
        }
        out.push(Segment {
            start: sp & !7,
            end: s.end,
            ty: s.ty,
            hops,
        });
        let rd = |va: u64, what: &str| {
            mem.read_u64(va)
                .ok_or_else(|| format!("cannot read {what} at {va:#x}"))
        };
        let below = |n: u64| {
            s.end
                .checked_sub(n)
                .filter(|&a| a >= s.start)
                .ok_or_else(|| {
                    format!(
                        "{} stack [{:#x}, {:#x}) is too small",
                        stack_type_name(s.ty),
                        s.start,
                        s.end
                    )
                })
        };
        sp = match s.ty {
            StackType::Task | StackType::Entry => return Ok(out),
            StackType::Irq => rd(below(8)?, "the IRQ stack's saved stack pointer")?,
            StackType::Exception => {
                let cs = rd(below(32)?, "the exception frame's cs")?;
                if cs & 3 != 0 {
                    return Ok(out);
                }
                rd(below(16)?, "the exception frame's rsp")?
            }
        };
    }
    Err(format!("more than {MAX_HOPS} stack switches"))
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

struct Reader<'a>(&'a dyn GuestAccess);

impl StackReader for Reader<'_> {
    fn read_u64(&self, va: u64) -> Option<u64> {
        self.0.read_u64(va).ok()
    }
}

/// Where return addresses may live off the stack: kretprobe/rethook instances and the
/// function-graph tracer's return stack move a task's real return addresses into per-task
/// lists, leaving a trampoline address on the stack (BTF offsets in `task_struct`, when the
/// kernel has them).
#[derive(Debug, Clone, Copy, Default)]
pub struct OffStack {
    rethooks: Option<u64>,
    kretprobe_instances: Option<u64>,
    ret_stack: Option<u64>,
    curr_ret_stack: Option<u64>,
}

impl OffStack {
    /// The offsets from BTF.
    pub fn from_model(m: &Model) -> OffStack {
        let off = |f: &str| m.btf.member_offset("task_struct", f).ok();
        OffStack {
            rethooks: off("rethooks"),
            kretprobe_instances: off("kretprobe_instances"),
            ret_stack: off("ret_stack"),
            curr_ret_stack: off("curr_ret_stack"),
        }
    }

    /// Why some of `task`'s return addresses are not on its stack, if they may not be.
    pub fn check(&self, g: &dyn GuestAccess, task: u64) -> Option<String> {
        let rd = |o: Option<u64>| o.map(|o| g.read_u64(task.wrapping_add(o)));
        for (o, what) in [
            (self.rethooks, "rethook (kretprobe/fprobe) return addresses"),
            (self.kretprobe_instances, "kretprobe return addresses"),
        ] {
            match rd(o) {
                Some(Ok(0)) | None => {}
                Some(Ok(_)) => return Some(format!("{what} are held off the stack")),
                Some(Err(e)) => return Some(format!("cannot read its {what} list: {e}")),
            }
        }
        if let (Some(Ok(rs)), Some(Ok(cur))) = (rd(self.ret_stack), rd(self.curr_ret_stack)) {
            // curr_ret_stack: -1 (6.1) or 0 (6.8+) when empty.
            let cur = cur as u32 as i32;
            if rs != 0 && cur != 0 && cur != -1 {
                return Some(
                    "the function-graph tracer holds return addresses off the stack".into(),
                );
            }
        }
        None
    }
}

/// The live region of a switched-out task: `[thread.sp, stack top)`, less the user-mode
/// `pt_regs` at the top of a user task's stack (see `live_top`).
pub fn task_context(m: &Model, t: &Task) -> LiveContext {
    let mut c = LiveContext {
        owner: Owner::Task(t.into()),
        regs: Vec::new(),
        segments: Vec::new(),
        unknown: None,
    };
    if t.stack_base == 0 {
        // Exited and its stack freed: nothing of it can run.
        return c;
    }
    if m.thread_size > MAX_SEGMENT {
        c.unknown = Some(format!(
            "its stack ({:#x} bytes) is larger than {MAX_SEGMENT} bytes",
            m.thread_size
        ));
        return c;
    }
    match t.stack_base.checked_add(m.thread_size) {
        Some(top) if t.thread_sp >= t.stack_base && t.thread_sp < top => c.segments.push(Segment {
            start: t.thread_sp & !7,
            end: live_top(m, top, t.is_kthread).max(t.thread_sp & !7),
            ty: StackType::Task,
            hops: 0,
        }),
        _ => {
            c.unknown = Some(format!(
                "saved stack pointer {:#x} is outside its stack [{:#x}, +{:#x})",
                t.thread_sp, t.stack_base, m.thread_size
            ))
        }
    }
    c
}

/// The end of the live part of a task stack whose top is `top`: a user task's top `pt_regs`
/// hold its user registers, which the kernel never uses as addresses (a guest user program
/// could otherwise hold any patch by keeping its address in a register).
fn live_top(m: &Model, top: u64, kthread: bool) -> u64 {
    if kthread {
        top
    } else {
        top.saturating_sub(m.regs.size)
    }
}

/// Every live context of the guest: each kernel-mode vCPU (registers and its chain of stacks)
/// and each task that is not `current` on a vCPU (its stack from `thread.sp`). A vCPU in user
/// mode has no live kernel state. Must be called with the vCPUs paused.
pub fn live_contexts(
    g: &dyn GuestAccess,
    m: &Model,
    vcpus: &[VcpuRegs],
) -> Result<Vec<LiveContext>, TaskError> {
    let cpus = vcpu_cpus(g, m, vcpus);
    let offstack = OffStack::from_model(m);
    let ist = ist_members(m);
    let mut out = Vec::new();
    for (v, r) in vcpus.iter().enumerate() {
        if r.cpl() != 0 {
            continue;
        }
        // A vCPU that has not started (an AP waiting for SIPI: CR0.PG clear) cannot use any
        // kernel address. (A host that reports no CR0 gives 0: not skipped.)
        if r.cr0 != 0 && r.cr0 & (1 << 31) == 0 {
            continue;
        }
        let (ranges, task) = vcpu_stack_ranges_of(g, m, &cpus, v);
        let mut regs: Vec<(&'static str, u64)> = vec![("rip", r.rip)];
        regs.extend(GPR_NAMES.iter().copied().zip(r.gprs));
        let stacks = split_exception_stacks(&ist, ranges);
        let (mut segments, mut unknown) = match live_chain(&stacks, r.rsp(), &Reader(g)) {
            Ok(s) => (s, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        if let Some(t) = &task {
            for seg in segments.iter_mut().filter(|s| s.ty == StackType::Task) {
                seg.end = live_top(m, seg.end, t.is_kthread).max(seg.start);
            }
            if unknown.is_none() {
                unknown = offstack.check(g, t.addr);
            }
        }
        out.push(LiveContext {
            owner: Owner::Vcpu {
                vcpu: v,
                task: task.as_ref().map(TaskRef::from),
            },
            regs,
            segments,
            unknown,
        });
    }
    for t in list_tasks(g, m, vcpus)? {
        if t.running_on_vcpu.is_some_and(|v| vcpus[v].cpl() == 0) {
            continue; // its vCPU's context covers it
        }
        if t.running_on_vcpu.is_some() {
            continue; // running in user mode: its kernel stack is empty
        }
        let mut c = task_context(m, &t);
        if c.unknown.is_none() && t.stack_base != 0 {
            c.unknown = offstack.check(g, t.addr);
        }
        out.push(c);
    }
    Ok(out)
}

/// Every register and live stack slot of `contexts` holding a value in one of `ranges`
/// (`[start, end)`), plus one [`Place::Unknown`] reference for each context whose live region
/// could not be determined or read. Empty means nothing in the guest can reach the ranges.
pub fn find_references(
    g: &dyn GuestAccess,
    contexts: &[LiveContext],
    ranges: &[(u64, u64)],
) -> Vec<Reference> {
    let hit = |v: u64| ranges.iter().any(|&(s, e)| v >= s && v < e);
    let mut out = Vec::new();
    for c in contexts {
        if out.len() >= MAX_REFERENCES {
            break; // enough to say that (and by what) the ranges are held
        }
        if let Some(why) = &c.unknown {
            out.push(Reference {
                owner: c.owner.clone(),
                place: Place::Unknown(why.clone()),
                value: 0,
            });
        }
        for &(name, v) in &c.regs {
            if hit(v) {
                out.push(Reference {
                    owner: c.owner.clone(),
                    place: Place::Register(name),
                    value: v,
                });
            }
        }
        for s in &c.segments {
            let mut va = s.start;
            let end = s.end.min(s.start.saturating_add(MAX_SEGMENT));
            while va < end {
                let n = (0x1000 - (va & 0xfff)).min(end - va);
                let mut b = vec![0u8; n as usize];
                if let Err(e) = g.read_virt(va, &mut b) {
                    out.push(Reference {
                        owner: c.owner.clone(),
                        place: Place::Unknown(format!("cannot read its stack at {va:#x}: {e}")),
                        value: 0,
                    });
                    break;
                }
                for (i, w) in b.chunks_exact(8).enumerate() {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(w);
                    let v = u64::from_le_bytes(a);
                    if hit(v) {
                        out.push(Reference {
                            owner: c.owner.clone(),
                            place: Place::Stack {
                                slot: va + 8 * i as u64,
                                ty: s.ty,
                                hops: s.hops,
                            },
                            value: v,
                        });
                    }
                }
                va += n;
            }
        }
    }
    out
}

impl crate::Kernel {
    /// [`live_contexts`] of this guest (vCPUs paused).
    pub fn live_contexts(
        &self,
        mem: &dyn crate::PhysMemory,
        vcpus: &[VcpuRegs],
    ) -> Result<Vec<LiveContext>, TaskError> {
        let m = self
            .model(mem)
            .map_err(|e| TaskError::Model(e.to_string()))?;
        live_contexts(&crate::model::KernelGuest { kernel: self, mem }, m, vcpus)
    }

    /// Everything in the guest that holds an address in `ranges` (see [`find_references`]);
    /// vCPUs paused. `Err` when the task list itself cannot be read.
    pub fn find_references(
        &self,
        mem: &dyn crate::PhysMemory,
        vcpus: &[VcpuRegs],
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Reference>, TaskError> {
        let contexts = self.live_contexts(mem, vcpus)?;
        Ok(find_references(
            &crate::model::KernelGuest { kernel: self, mem },
            &contexts,
            ranges,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind::tests::Mem;
    use std::collections::HashMap;

    const TASK: StackRange = StackRange {
        start: 0xffff_c900_0040_0000,
        end: 0xffff_c900_0040_4000,
        ty: StackType::Task,
    };
    const IRQ: StackRange = StackRange {
        start: 0xffff_c900_0000_1000,
        end: 0xffff_c900_0000_5000,
        ty: StackType::Irq,
    };
    const NMI: StackRange = StackRange {
        start: 0xffff_fe00_0000_3000,
        end: 0xffff_fe00_0000_4000,
        ty: StackType::Exception,
    };

    #[test]
    fn task_stack_alone() {
        let s = live_chain(&[TASK, IRQ], TASK.start + 0x3e00, &Mem(HashMap::new())).unwrap();
        assert_eq!(
            s,
            vec![Segment {
                start: TASK.start + 0x3e00,
                end: TASK.end,
                ty: StackType::Task,
                hops: 0
            }]
        );
    }

    #[test]
    fn irq_over_task_follows_the_saved_sp() {
        let interrupted = TASK.start + 0x3c48;
        let mem = Mem(HashMap::from([(IRQ.end - 8, interrupted)]));
        let s = live_chain(&[TASK, IRQ, NMI], IRQ.end - 0x200, &mem).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].ty, s[0].start, s[0].end),
            (StackType::Irq, IRQ.end - 0x200, IRQ.end)
        );
        assert_eq!(
            (s[1].ty, s[1].start, s[1].hops),
            (StackType::Task, interrupted, 1)
        );
    }

    #[test]
    fn nmi_over_irq_over_task() {
        let on_irq = IRQ.end - 0x300;
        let interrupted = TASK.start + 0x3800;
        let mem = Mem(HashMap::from([
            (NMI.end - 32, 0x10), // kernel cs
            (NMI.end - 16, on_irq),
            (IRQ.end - 8, interrupted),
        ]));
        let s = live_chain(&[TASK, IRQ, NMI], NMI.end - 0x100, &mem).unwrap();
        let tys: Vec<_> = s.iter().map(|x| (x.ty, x.hops)).collect();
        assert_eq!(
            tys,
            vec![
                (StackType::Exception, 0),
                (StackType::Irq, 1),
                (StackType::Task, 2)
            ]
        );
        assert_eq!(s[2].start, interrupted);
    }

    #[test]
    fn exception_from_user_mode_ends_the_chain() {
        let mem = Mem(HashMap::from([
            (NMI.end - 32, 0x33),
            (NMI.end - 16, 0x7ffd_0000),
        ]));
        let s = live_chain(&[TASK, NMI], NMI.end - 0x80, &mem).unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn hostile_chains_are_errors_not_loops() {
        // The IRQ stack's saved sp points back into the IRQ stack.
        let mem = Mem(HashMap::from([(IRQ.end - 8, IRQ.end - 0x100)]));
        assert!(live_chain(&[TASK, IRQ], IRQ.end - 0x80, &mem)
            .unwrap_err()
            .contains("returns to the irq stack"));
        // ... or nowhere.
        let mem = Mem(HashMap::from([(IRQ.end - 8, 0x1234)]));
        assert!(live_chain(&[TASK, IRQ], IRQ.end - 0x80, &mem)
            .unwrap_err()
            .contains("on no known stack"));
        // Unreadable top slot.
        assert!(
            live_chain(&[TASK, IRQ], IRQ.end - 0x80, &Mem(HashMap::new()))
                .unwrap_err()
                .contains("cannot read")
        );
        // RSP on no stack at all (e.g. mid context switch).
        assert!(
            live_chain(&[TASK, IRQ], 0xffff_8880_0000_0000, &Mem(HashMap::new()))
                .unwrap_err()
                .contains("no known stack")
        );
        // A huge bogus range.
        let big = StackRange {
            start: 0xffff_0000_0000_0000,
            end: 0xffff_0000_1000_0000,
            ty: StackType::Task,
        };
        assert!(live_chain(&[big], big.start + 8, &Mem(HashMap::new())).is_err());
    }
}
