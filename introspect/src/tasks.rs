//! Per-CPU bases, `current`, and the task list (processes, threads and idle tasks).
//!
//! The list mirrors what livepatch iterates (`for_each_process_thread` + `idle_task(cpu)`):
//! every thread of every process, plus one idle task per possible CPU. `ps` (busybox) shows
//! processes only; filter with `pid == tgid && pid != 0` to compare with it.
//!
//! Guest lists are hostile: every walk is capped and keeps a visited set, so a looping or
//! corrupted list yields [`TaskError`], never a hang.

use std::collections::HashSet;

use serde::Serialize;
use thiserror::Error;

use crate::model::{GuestAccess, Model};
use crate::regs::VcpuRegs;

/// Maximum number of tasks we accept in one walk.
pub const MAX_TASKS: usize = 1 << 16;
/// Maximum threads per thread group we walk.
pub const MAX_THREADS: usize = 1 << 16;

/// `PF_KTHREAD`.
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_IDLE`.
pub const PF_IDLE: u32 = 0x0000_0002;

/// Errors walking tasks.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// Building the layout model failed.
    #[error("kernel model: {0}")]
    Model(String),
    /// Reading guest memory failed.
    #[error("reading {what} at {addr:#x}: {err}")]
    Read {
        /// What was read.
        what: &'static str,
        /// Kernel virtual address.
        addr: u64,
        /// The error.
        err: String,
    },
    /// A list links back to an element already seen (not the head), or is too long.
    #[error("corrupted {0} list (loop or more than the cap)")]
    CorruptList(&'static str),
}

/// The per-CPU view of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VcpuCpu {
    /// vCPU index.
    pub vcpu: usize,
    /// Linux CPU number, if identified.
    pub cpu: Option<u32>,
    /// Kernel per-CPU base (`__per_cpu_offset[cpu]`), if identified.
    pub percpu_base: Option<u64>,
    /// `current` on this vCPU.
    pub current: Option<u64>,
}

/// One task (thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    /// `struct task_struct *`.
    pub addr: u64,
    /// Thread id.
    pub pid: i32,
    /// Process id.
    pub tgid: i32,
    /// `comm`.
    pub comm: String,
    /// Raw `__state`.
    pub state: u32,
    /// `exit_state`.
    pub exit_state: u32,
    /// State letter like `ps`: R S D T t X Z P I.
    pub state_char: char,
    /// `PF_*` flags.
    pub flags: u32,
    /// Kernel thread (`PF_KTHREAD`).
    pub is_kthread: bool,
    /// `on_cpu`.
    pub on_cpu: bool,
    /// `task_cpu()` (thread_info.cpu).
    pub cpu: u32,
    /// The vCPU this task is `current` on, if any.
    pub running_on_vcpu: Option<usize>,
    /// Base of the kernel stack (`task->stack`).
    pub stack_base: u64,
    /// `thread.sp` (saved stack pointer of a switched-out task).
    pub thread_sp: u64,
    /// livepatch `patch_state` (-1 idle/undefined, 0 unpatched, 1 patched).
    pub patch_state: Option<i32>,
    /// Whether this is a CPU's idle task (pid 0).
    pub is_idle: bool,
}

impl Task {
    /// Whether the task is a thread-group leader shown by `ps` (pid == tgid, not an idle task).
    pub fn is_process(&self) -> bool {
        self.pid == self.tgid && !self.is_idle
    }
}

/// The `ps` state letter (`task_state_index()` + "RSDTtXZPI").
pub fn state_letter(state: u32, exit_state: u32) -> char {
    const TASK_REPORT: u32 = 0x7f;
    const TASK_IDLE: u32 = 0x402;
    const TASK_RTLOCK_WAIT: u32 = 0x1000;
    const TASK_FROZEN: u32 = 0x8000;
    let mut s = (state | exit_state) & TASK_REPORT;
    if state & TASK_IDLE == TASK_IDLE {
        s = 0x80;
    }
    if state & (TASK_RTLOCK_WAIT | TASK_FROZEN) != 0 {
        s = 2;
    }
    let idx = 32 - s.leading_zeros();
    b"RSDTtXZPI"
        .get(idx as usize)
        .map(|&c| c as char)
        .unwrap_or('?')
}

fn rd64(g: &dyn GuestAccess, addr: u64, what: &'static str) -> Result<u64, TaskError> {
    g.read_u64(addr)
        .map_err(|err| TaskError::Read { what, addr, err })
}

fn rd32(g: &dyn GuestAccess, addr: u64, what: &'static str) -> Result<u32, TaskError> {
    g.read_u32(addr)
        .map_err(|err| TaskError::Read { what, addr, err })
}

/// Whether `base` is a valid kernel per-CPU base: a kernel address holding itself at
/// `this_cpu_off`.
fn valid_percpu_base(g: &dyn GuestAccess, m: &Model, base: u64) -> bool {
    base >> 63 == 1 && g.read_u64(base.wrapping_add(m.percpu.this_cpu_off)).ok() == Some(base)
}

/// `__per_cpu_offset[cpu]`.
pub fn cpu_base(g: &dyn GuestAccess, m: &Model, cpu: u32) -> Option<u64> {
    if cpu >= m.percpu.nr_cpu_ids {
        return None;
    }
    let b = g
        .read_u64(m.percpu.per_cpu_offset.wrapping_add(8 * cpu as u64))
        .ok()?;
    (b != 0).then_some(b)
}

/// Physical address of the page tables loaded on the CPU with per-cpu base `base`:
/// `cpu_tlbstate.loaded_mm->pgd` (lazy-TLB aware), else `current->active_mm->pgd`.
fn current_pgd_pa(g: &dyn GuestAccess, m: &Model, base: u64) -> Option<u64> {
    let mm = match m.percpu.loaded_mm {
        Some(o) => g.read_u64(base.wrapping_add(o)).ok()?,
        None => {
            let cur = g.read_u64(base.wrapping_add(m.percpu.current_task)).ok()?;
            g.read_u64(cur.wrapping_add(m.task.active_mm)).ok()?
        }
    };
    let pgd = g.read_u64(mm.wrapping_add(m.task.mm_pgd)).ok()?;
    g.translate(pgd)
}

/// Maps vCPUs to Linux CPUs and finds `current` on each.
///
/// Per vCPU: `gs_base` if it is a valid kernel per-CPU base (a kernel address holding itself
/// at `this_cpu_off`), else `kernel_gs_base`; the CPU number is the index `c` with
/// `__per_cpu_offset[c] == base`, or else the per-cpu `cpu_number`. If neither base
/// validates (a user-mode vCPU over gdbstub, which cannot read KERNEL_GS_BASE), the CPU whose
/// `cpu_tlbstate.loaded_mm->pgd` is the vCPU's CR3 is taken when exactly one matches, else the
/// vCPU index is assumed to be the CPU number.
pub fn vcpu_cpus(g: &dyn GuestAccess, m: &Model, vcpus: &[VcpuRegs]) -> Vec<VcpuCpu> {
    let bases: Vec<u64> = (0..m.percpu.nr_cpu_ids.min(4096))
        .map_while(|c| cpu_base(g, m, c))
        .collect();
    let mut pgds: Option<Vec<Option<u64>>> = None;
    vcpus
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let base = [r.gs_base, r.kernel_gs_base]
                .into_iter()
                .find(|&b| valid_percpu_base(g, m, b));
            let (cpu, base) = match base {
                Some(b) => {
                    let by_table = bases.iter().position(|&x| x == b).map(|c| c as u32);
                    let by_var = m
                        .percpu
                        .cpu_number
                        .and_then(|o| g.read_u32(b.wrapping_add(o)).ok());
                    (by_table.or(by_var), Some(b))
                }
                None => {
                    const PGD_MASK: u64 = 0x000f_ffff_ffff_e000;
                    let pgds = pgds.get_or_insert_with(|| {
                        bases.iter().map(|&b| current_pgd_pa(g, m, b)).collect()
                    });
                    let want = r.cr3 & PGD_MASK;
                    let hits: Vec<usize> = pgds
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_some_and(|p| p & PGD_MASK == want))
                        .map(|(c, _)| c)
                        .collect();
                    let c = if hits.len() == 1 { hits[0] } else { i };
                    let b = bases.get(c).copied();
                    (b.map(|_| c as u32), b)
                }
            };
            let current = base
                .and_then(|b| g.read_u64(b.wrapping_add(m.percpu.current_task)).ok())
                .filter(|&t| t >> 63 == 1);
            VcpuCpu {
                vcpu: i,
                cpu,
                percpu_base: base,
                current,
            }
        })
        .collect()
}

/// Walks a circular `list_head` starting at `head` (exclusive), returning the node addresses.
fn walk_list(
    g: &dyn GuestAccess,
    head: u64,
    cap: usize,
    what: &'static str,
) -> Result<Vec<u64>, TaskError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut p = rd64(g, head, what)?;
    while p != head {
        if out.len() >= cap || !seen.insert(p) || p >> 63 == 0 {
            return Err(TaskError::CorruptList(what));
        }
        out.push(p);
        p = rd64(g, p, what)?;
    }
    Ok(out)
}

/// Reads one task.
pub fn read_task(
    g: &dyn GuestAccess,
    m: &Model,
    addr: u64,
    cpus: &[VcpuCpu],
) -> Result<Task, TaskError> {
    let l = &m.task;
    let f32 = |off: u64, what| rd32(g, addr.wrapping_add(off), what);
    let state = f32(l.state, "task.__state")?;
    let exit_state = f32(l.exit_state, "task.exit_state")?;
    let flags = f32(l.flags, "task.flags")?;
    let mut comm = vec![0u8; l.comm_len as usize];
    g.read_virt(addr.wrapping_add(l.comm), &mut comm)
        .map_err(|err| TaskError::Read {
            what: "task.comm",
            addr,
            err,
        })?;
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    let pid = f32(l.pid, "task.pid")? as i32;
    Ok(Task {
        addr,
        pid,
        tgid: f32(l.tgid, "task.tgid")? as i32,
        comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        state,
        exit_state,
        state_char: state_letter(state, exit_state),
        flags,
        is_kthread: flags & PF_KTHREAD != 0,
        on_cpu: f32(l.on_cpu, "task.on_cpu")? != 0,
        cpu: f32(l.cpu, "task.cpu")?,
        running_on_vcpu: cpus
            .iter()
            .find(|c| c.current == Some(addr))
            .map(|c| c.vcpu),
        stack_base: rd64(g, addr.wrapping_add(l.stack), "task.stack")?,
        thread_sp: rd64(g, addr.wrapping_add(l.thread_sp), "task.thread.sp")?,
        patch_state: match l.patch_state {
            Some(o) => Some(f32(o, "task.patch_state")? as i32),
            None => None,
        },
        is_idle: pid == 0,
    })
}

/// The task list: `init_task`, every process on `init_task.tasks` with all its threads, and the
/// idle tasks of the other CPUs (`rq->idle`).
pub fn list_tasks(
    g: &dyn GuestAccess,
    m: &Model,
    vcpus: &[VcpuRegs],
) -> Result<Vec<Task>, TaskError> {
    let cpus = vcpu_cpus(g, m, vcpus);
    let l = &m.task;
    let mut addrs = vec![m.init_task];
    let procs = walk_list(g, m.init_task.wrapping_add(l.tasks), MAX_TASKS, "tasks")?;
    for node in procs {
        let leader = node.wrapping_sub(l.tasks);
        let threads = match (l.signal_thread_head, l.thread_node, l.thread_group) {
            (Some(head), Some(node_off), _) => {
                let sig = rd64(g, leader.wrapping_add(l.signal), "task.signal")?;
                walk_list(g, sig.wrapping_add(head), MAX_THREADS, "thread")?
                    .into_iter()
                    .map(|n| n.wrapping_sub(node_off))
                    .collect()
            }
            (_, _, Some(tg)) => {
                let mut v = vec![leader];
                v.extend(
                    walk_list(g, leader.wrapping_add(tg), MAX_THREADS, "thread_group")?
                        .into_iter()
                        .map(|n| n.wrapping_sub(tg)),
                );
                v
            }
            _ => vec![leader],
        };
        if threads.is_empty() {
            // An exiting group may have emptied its thread list; keep the leader.
            addrs.push(leader);
        }
        addrs.extend(threads);
        if addrs.len() > MAX_TASKS {
            return Err(TaskError::CorruptList("tasks"));
        }
    }
    // Idle tasks of the other CPUs.
    if let (Some(rq), Some(idle)) = (m.percpu.runqueues, m.percpu.rq_idle) {
        for cpu in 0..m.percpu.nr_cpu_ids.min(4096) {
            let Some(base) = cpu_base(g, m, cpu) else {
                break;
            };
            if let Ok(t) = g.read_u64(base.wrapping_add(rq).wrapping_add(idle)) {
                if t >> 63 == 1 {
                    addrs.push(t);
                }
            }
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for a in addrs {
        if seen.insert(a) {
            out.push(read_task(g, m, a, &cpus)?);
        }
    }
    Ok(out)
}

impl crate::Kernel {
    /// All tasks: `init_task`, every thread of every process, and the other CPUs' idle tasks.
    pub fn tasks(
        &self,
        mem: &dyn crate::PhysMemory,
        vcpus: &[VcpuRegs],
    ) -> Result<Vec<Task>, TaskError> {
        let m = self
            .model(mem)
            .map_err(|e| TaskError::Model(e.to_string()))?;
        list_tasks(&crate::model::KernelGuest { kernel: self, mem }, m, vcpus)
    }

    /// Linux CPU number, per-CPU base and `current` of each vCPU.
    pub fn vcpu_cpus(
        &self,
        mem: &dyn crate::PhysMemory,
        vcpus: &[VcpuRegs],
    ) -> Result<Vec<VcpuCpu>, TaskError> {
        let m = self
            .model(mem)
            .map_err(|e| TaskError::Model(e.to_string()))?;
        Ok(vcpu_cpus(
            &crate::model::KernelGuest { kernel: self, mem },
            m,
            vcpus,
        ))
    }
}

/// Parses `ps -o pid,comm,stat` output into `(pid, comm, stat)`.
pub fn parse_ps(text: &str) -> Vec<(i32, String, String)> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("PID"))
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            Some((
                t.first()?.parse().ok()?,
                (*t.get(1)?).to_string(),
                t.get(2).copied().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

/// Compares our processes (`pid == tgid`, not idle) with `ps -o pid,comm,stat` rows: same pids,
/// comm equal (or, for workqueue workers, `ps` showing `comm-<workqueue>` truncated to 15
/// chars), same state letter. Rows whose pid is in `ignore` (e.g. the `ps` process itself,
/// gone by the time memory is read) are skipped. `Err` lists every difference.
pub fn compare_with_ps(
    tasks: &[Task],
    ps: &[(i32, String, String)],
    ignore: &[i32],
) -> Result<(), String> {
    let mut errs = Vec::new();
    let ours: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.is_process() && !ignore.contains(&t.pid))
        .collect();
    for (pid, comm, stat) in ps.iter().filter(|r| !ignore.contains(&r.0)) {
        match ours.iter().find(|t| t.pid == *pid) {
            None => errs.push(format!("pid {pid} ({comm}) in ps but not found")),
            Some(t) => {
                let wq = format!("{}-", t.comm);
                let comm_ok = *comm == t.comm || (comm.starts_with(&wq) && comm.len() == 15);
                if !comm_ok {
                    errs.push(format!("pid {pid}: comm ps `{comm}` vs ours `{}`", t.comm));
                }
                if !stat.starts_with(t.state_char) {
                    errs.push(format!(
                        "pid {pid}: state ps `{stat}` vs ours `{}` ({:#x})",
                        t.state_char, t.state
                    ));
                }
            }
        }
    }
    for t in &ours {
        if !ps.iter().any(|r| r.0 == t.pid) {
            errs.push(format!("pid {} ({}) found but not in ps", t.pid, t.comm));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letters() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(0x402, 0), 'I');
        assert_eq!(state_letter(0x2001, 0), 'S');
        assert_eq!(state_letter(0, 0x20), 'Z');
        assert_eq!(state_letter(0x40, 0), 'P');
    }
}
