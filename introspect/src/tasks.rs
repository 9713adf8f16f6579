//! Per-CPU bases, `current`, and the task list (processes, threads and idle tasks).
//!
//! The list mirrors what livepatch iterates (`for_each_process_thread` + `idle_task(cpu)`):
//! every thread of every process, plus one idle task per possible CPU. `ps` (busybox) shows
//! processes only; filter with `pid == tgid && pid != 0` to compare with it.
//!
//! A task's `comm` is what /proc/PID/comm shows ([`proc_comm`]: untruncated kthread names,
//! `kworker/0:1-events`-style workqueue workers); the raw 16-byte field is `task_comm`.
//!
//! Guest lists are hostile: every walk is capped and keeps a visited set, so a looping or
//! corrupted list yields [`TaskError`], never a hang.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{GuestAccess, Model, ProcCommLayout, WorkerIdLayout, WorkerLayout};
use crate::regs::VcpuRegs;

/// Maximum number of tasks we accept in one walk.
pub const MAX_TASKS: usize = 1 << 16;
/// Maximum threads per thread group we walk.
pub const MAX_THREADS: usize = 1 << 16;

/// `PF_KTHREAD`.
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_IDLE`.
pub const PF_IDLE: u32 = 0x0000_0002;
/// `PF_WQ_WORKER`.
pub const PF_WQ_WORKER: u32 = 0x0000_0020;
/// `proc_task_name()` formats into `char tcomm[64]`: /proc names are cut to 63 bytes.
pub const PROC_COMM_MAX: usize = 63;

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
    #[serde(with = "crate::hex")]
    pub percpu_base: Option<u64>,
    /// `current` on this vCPU.
    #[serde(with = "crate::hex")]
    pub current: Option<u64>,
}

/// One task (thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// `struct task_struct *`.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// Thread id.
    pub pid: i32,
    /// Process id.
    pub tgid: i32,
    /// The name /proc/PID/comm shows (`proc_task_name()`): a kthread's untruncated
    /// `full_name`, a workqueue worker's `kworker/0:1-events`-style name, else `task_comm`.
    pub comm: String,
    /// The raw `task_struct.comm` (at most 15 bytes).
    pub task_comm: String,
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
    #[serde(with = "crate::hex")]
    pub stack_base: u64,
    /// `thread.sp` (saved stack pointer of a switched-out task).
    #[serde(with = "crate::hex")]
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

/// A plausible pointer to a kernel object: kernel half, 8-byte aligned.
fn kobj(p: u64) -> Option<u64> {
    (p >> 63 == 1 && p.is_multiple_of(8)).then_some(p)
}

/// Reads the pointer at `base + off` and checks it points at a kernel object (NULL → None).
fn read_kobj(g: &dyn GuestAccess, base: u64, off: u64) -> Option<u64> {
    kobj(g.read_u64(base.checked_add(off)?).ok()?)
}

/// Reads a NUL-terminated string of at most `max` bytes at `va`, page by page (a string near
/// the end of a mapping does not fail for the bytes after it).
fn read_cstr(g: &dyn GuestAccess, va: u64, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut a = va;
    while out.len() < max {
        let n = (0x1000 - (a & 0xfff) as usize).min(max - out.len());
        let mut buf = vec![0u8; n];
        g.read_virt(a, &mut buf).ok()?;
        if let Some(z) = buf.iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..z]);
            return Some(out);
        }
        out.extend_from_slice(&buf);
        a = a.checked_add(n as u64)?;
    }
    Some(out)
}

/// What /proc/PID/comm shows, as fs/proc/array.c `proc_task_name()` builds it: workqueue workers
/// (`PF_WQ_WORKER`) through `wq_worker_comm()`, other kthreads through `get_kthread_comm()`
/// (`to_kthread(task)->full_name` if set), everything else `comm`. Cut to 63 bytes like the
/// kernel's 64-byte buffer. Any unreadable or implausible guest pointer gives `comm`.
pub fn proc_comm(g: &dyn GuestAccess, m: &Model, task: u64, flags: u32, comm: &[u8]) -> Vec<u8> {
    let Some(l) = &m.task.proc_comm else {
        return comm.to_vec();
    };
    let name = if flags & PF_WQ_WORKER != 0 {
        l.worker
            .as_ref()
            .and_then(|w| wq_worker_comm(g, l, w, task, comm))
    } else if flags & PF_KTHREAD != 0 {
        kthread_full_name(g, l, task)
    } else {
        None
    };
    let mut name = name.unwrap_or_else(|| comm.to_vec());
    name.truncate(PROC_COMM_MAX);
    name
}

/// `get_kthread_comm()`: `to_kthread(task)->full_name`, None when NULL (then `comm`).
fn kthread_full_name(g: &dyn GuestAccess, l: &ProcCommLayout, task: u64) -> Option<Vec<u8>> {
    let kthread = read_kobj(g, task, l.kthread)?;
    let p = g
        .read_u64(kthread.checked_add(l.kthread_full_name?)?)
        .ok()?;
    if p >> 63 == 0 {
        return None;
    }
    read_cstr(g, p, PROC_COMM_MAX)
}

/// `wq_worker_comm()`: the worker ID (`comm` before 6.10, `format_worker_id()` since), then,
/// while attached to a pool and with a description, `+desc` if executing a work item, else
/// `-desc`.
fn wq_worker_comm(
    g: &dyn GuestAccess,
    l: &ProcCommLayout,
    w: &WorkerLayout,
    task: u64,
    comm: &[u8],
) -> Option<Vec<u8>> {
    let kthread = read_kobj(g, task, l.kthread)?;
    let worker = read_kobj(g, kthread, l.kthread_data)?;
    let pool = match g.read_u64(worker.checked_add(w.pool)?).ok()? {
        0 => None,
        p => Some(kobj(p)?),
    };
    let mut name = match &w.id {
        Some(id) => format_worker_id(g, id, worker, pool)?,
        None => comm.to_vec(),
    };
    if pool.is_some() {
        let desc = read_cstr(g, worker.checked_add(w.desc)?, w.desc_len as usize)?;
        if !desc.is_empty() {
            let current = g.read_u64(worker.checked_add(w.current_work)?).ok()?;
            name.push(if current != 0 { b'+' } else { b'-' });
            name.extend_from_slice(&desc);
        }
    }
    Some(name)
}

/// `format_worker_id()` (6.10+): `kworker/R-<wq>` for a rescuer, `kworker/<cpu>:<id>[H]` or
/// `kworker/u<pool>:<id>` for a pool's worker, `kworker/dying` when detached.
fn format_worker_id(
    g: &dyn GuestAccess,
    l: &WorkerIdLayout,
    worker: u64,
    pool: Option<u64>,
) -> Option<Vec<u8>> {
    let i32_at = |base: u64, off: u64| -> Option<i32> {
        Some(g.read_u32(base.checked_add(off)?).ok()? as i32)
    };
    let rescue_wq = g.read_u64(worker.checked_add(l.rescue_wq)?).ok()?;
    if rescue_wq != 0 {
        let wq = kobj(rescue_wq)?;
        let mut name = b"kworker/R-".to_vec();
        name.extend(read_cstr(
            g,
            wq.checked_add(l.wq_name)?,
            l.wq_name_len as usize,
        )?);
        return Some(name);
    }
    let Some(pool) = pool else {
        return Some(b"kworker/dying".to_vec());
    };
    let id = i32_at(worker, l.id)?;
    let cpu = i32_at(pool, l.pool_cpu)?;
    let name = if cpu >= 0 {
        let attrs = read_kobj(g, pool, l.pool_attrs)?;
        let high = i32_at(attrs, l.attrs_nice)? < 0;
        format!("kworker/{cpu}:{id}{}", if high { "H" } else { "" })
    } else {
        format!("kworker/u{}:{id}", i32_at(pool, l.pool_id)?)
    };
    Some(name.into_bytes())
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
    comm.truncate(end);
    let pid = f32(l.pid, "task.pid")? as i32;
    Ok(Task {
        addr,
        pid,
        tgid: f32(l.tgid, "task.tgid")? as i32,
        comm: String::from_utf8_lossy(&proc_comm(g, m, addr, flags, &comm)).into_owned(),
        task_comm: String::from_utf8_lossy(&comm).into_owned(),
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
    /// The task at `addr`, read on its own (as switched out: `running_on_vcpu` is `None`).
    pub fn task_at(&self, mem: &dyn crate::PhysMemory, addr: u64) -> Result<Task, TaskError> {
        let m = self
            .model(mem)
            .map_err(|e| TaskError::Model(e.to_string()))?;
        read_task(
            &crate::model::KernelGuest { kernel: self, mem },
            m,
            addr,
            &[],
        )
    }

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
