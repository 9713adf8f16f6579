//! The BTF-derived layout model used by the task walker and the unwinder, built once per guest
//! kernel from kallsyms + BTF + ORC read out of guest memory.
//!
//! The model talks to the guest through [`GuestAccess`] (virtual reads + symbols), so the
//! same code runs over a live [`crate::Kernel`] and over test doubles.

use thiserror::Error;

use crate::btf::{Btf, BtfError};
use crate::orc::{OrcError, OrcFormat, OrcTable};
use crate::unwind::PtRegsLayout;

/// Largest BTF blob we copy from the guest.
const MAX_BTF_BYTES: u64 = 64 << 20;
/// Largest ORC ip table we copy from the guest (bytes).
const MAX_ORC_IP_BYTES: u64 = 16 << 20;
/// Default x86-64 THREAD_SIZE (= IRQ_STACK_SIZE) without KASAN: 16 KiB, used when the guest's
/// `init_stack` bounds do not give a plausible size.
pub const THREAD_SIZE: u64 = 0x4000;

/// What the task walker and unwinder need from the guest.
pub trait GuestAccess {
    /// Reads kernel virtual memory.
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Address of a unique symbol (per-cpu `A` symbols give their per-cpu offset).
    fn symbol(&self, name: &str) -> Option<u64>;
    /// `(name, offset, size)` of the symbol containing `addr`.
    fn symbolize(&self, addr: u64) -> Option<(String, u64, u64)>;

    /// Code outside the kernel's ORC that keeps frame pointers (see
    /// [`crate::unwind::UnwindEnv::fp_text`]): hvpatch's patch functions.
    fn frame_pointer_text(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }

    /// Return addresses that stand for others (see [`crate::unwind::UnwindEnv::aliases`]).
    fn text_aliases(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }

    /// Guest-physical address of kernel virtual address `va`, if the view can translate.
    fn translate(&self, _va: u64) -> Option<u64> {
        None
    }

    /// Reads a little-endian u64.
    fn read_u64(&self, va: u64) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u32.
    fn read_u32(&self, va: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read_virt(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// Errors building the [`Model`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// A symbol the model needs is missing.
    #[error("symbol {0} not found")]
    MissingSymbol(&'static str),
    /// Reading guest memory failed.
    #[error("reading {what}: {err}")]
    Read {
        /// What was read.
        what: &'static str,
        /// The underlying error.
        err: String,
    },
    /// A section bound is implausible.
    #[error("{0} has an implausible size")]
    BadSize(&'static str),
    /// BTF parse or query failure.
    #[error("BTF: {0}")]
    Btf(#[from] BtfError),
    /// ORC table failure.
    #[error("ORC: {0}")]
    Orc(#[from] OrcError),
}

/// Offsets (bytes) into `struct task_struct` and friends, all from BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLayout {
    /// sizeof(struct task_struct).
    pub size: u64,
    /// `__state` (u32).
    pub state: u64,
    /// `flags` (PF_*).
    pub flags: u64,
    /// `on_cpu`.
    pub on_cpu: u64,
    /// `thread_info.cpu`.
    pub cpu: u64,
    /// `stack` (base of the kernel stack).
    pub stack: u64,
    /// `tasks` (list_head on `init_task.tasks`).
    pub tasks: u64,
    /// `pid`.
    pub pid: u64,
    /// `tgid`.
    pub tgid: u64,
    /// `comm`.
    pub comm: u64,
    /// Size of `comm` (capped at 64).
    pub comm_len: u64,
    /// `exit_state`.
    pub exit_state: u64,
    /// `signal` (struct signal_struct *).
    pub signal: u64,
    /// `thread_node` (linked on `signal->thread_head`), if present.
    pub thread_node: Option<u64>,
    /// `signal_struct.thread_head`, if present.
    pub signal_thread_head: Option<u64>,
    /// `thread_group` (older kernels), if present.
    pub thread_group: Option<u64>,
    /// `thread.sp`.
    pub thread_sp: u64,
    /// `patch_state` (CONFIG_LIVEPATCH).
    pub patch_state: Option<u64>,
    /// `mm`.
    pub mm: u64,
    /// `active_mm`.
    pub active_mm: u64,
    /// `mm_struct.pgd`.
    pub mm_pgd: u64,
    /// sizeof(struct inactive_task_frame).
    pub frame_size: u64,
    /// `inactive_task_frame.bp`.
    pub frame_bp: u64,
    /// `inactive_task_frame.ret_addr`.
    pub frame_ret_addr: u64,
    /// What /proc/PID/comm reads beyond `comm` (None: BTF lacks `struct kthread`).
    pub proc_comm: Option<ProcCommLayout>,
}

/// What `proc_task_name()` (fs/proc/array.c: /proc/PID/comm, /proc/PID/stat) reads of a kernel
/// thread beyond `task_struct.comm`, all from BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcCommLayout {
    /// `task_struct.worker_private` (5.17+) or `set_child_tid` (older): `to_kthread()`.
    pub kthread: u64,
    /// `kthread.data` (`kthread_data()`: a workqueue worker's `struct worker *`).
    pub kthread_data: u64,
    /// `kthread.full_name` (5.17+: the untruncated name, set when it exceeds 15 chars).
    pub kthread_full_name: Option<u64>,
    /// `wq_worker_comm()` (4.18+), if the kernel has it and BTF describes `struct worker`.
    pub worker: Option<WorkerLayout>,
}

/// `struct worker` as `wq_worker_comm()` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLayout {
    /// `worker.pool` (NULL while detached: rescuer not rescuing, dying worker).
    pub pool: u64,
    /// `worker.desc` (wq name of the last work item, or `set_worker_desc()`).
    pub desc: u64,
    /// Size of `worker.desc` (WORKER_DESC_LEN, capped at 64).
    pub desc_len: u64,
    /// `worker.current_work` (non-NULL: executing, shown as `+desc`; else `-desc`).
    pub current_work: u64,
    /// 6.10+ (and 6.9.y): `format_worker_id()` rebuilds the untruncated worker ID.
    pub id: Option<WorkerIdLayout>,
}

/// What `format_worker_id()` (6.10+) reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdLayout {
    /// `worker.rescue_wq` (set for a rescuer).
    pub rescue_wq: u64,
    /// `worker.id`.
    pub id: u64,
    /// `workqueue_struct.name`.
    pub wq_name: u64,
    /// Size of `workqueue_struct.name` (WQ_NAME_LEN, capped at 64).
    pub wq_name_len: u64,
    /// `worker_pool.cpu` (-1 for unbound pools).
    pub pool_cpu: u64,
    /// `worker_pool.id`.
    pub pool_id: u64,
    /// `worker_pool.attrs`.
    pub pool_attrs: u64,
    /// `workqueue_attrs.nice`.
    pub attrs_nice: u64,
}

/// Where the per-CPU variables live (per-cpu offsets, added to a CPU's base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PercpuLayout {
    /// `this_cpu_off` (holds the CPU's own base).
    pub this_cpu_off: u64,
    /// `current_task` (6.1) or `pcpu_hot.current_task` (6.12).
    pub current_task: u64,
    /// `cpu_number` or `pcpu_hot.cpu_number`.
    pub cpu_number: Option<u64>,
    /// `hardirq_stack_ptr` or `pcpu_hot.hardirq_stack_ptr`.
    pub hardirq_stack_ptr: Option<u64>,
    /// `cea_exception_stacks` (pointer to this CPU's exception stacks).
    pub cea_exception_stacks: Option<u64>,
    /// sizeof(struct cea_exception_stacks), 0 if unknown.
    pub cea_exception_stacks_size: u64,
    /// `runqueues` (struct rq).
    pub runqueues: Option<u64>,
    /// `rq.idle`.
    pub rq_idle: Option<u64>,
    /// `rq.curr`.
    pub rq_curr: Option<u64>,
    /// `__per_cpu_offset` array (kernel VA).
    pub per_cpu_offset: u64,
    /// `nr_cpu_ids` value.
    pub nr_cpu_ids: u32,
    /// Per-cpu `cpu_tlbstate.loaded_mm` (the mm whose page tables the CPU has loaded).
    pub loaded_mm: Option<u64>,
}

/// The model: layouts, ORC table and text ranges of one guest kernel.
#[derive(Debug, Clone)]
pub struct Model {
    /// The parsed BTF.
    pub btf: Btf,
    /// task_struct & co.
    pub task: TaskLayout,
    /// Per-CPU variables.
    pub percpu: PercpuLayout,
    /// pt_regs.
    pub regs: PtRegsLayout,
    /// The vmlinux ORC table.
    pub orc: OrcTable,
    /// Ranges the vmlinux ORC table covers (`_stext.._etext`, `_sinittext.._einittext`).
    pub orc_ranges: Vec<(u64, u64)>,
    /// vmlinux text ranges (core + init); module text is looked up per walk.
    pub text_ranges: Vec<(u64, u64)>,
    /// `[__sched_text_start, __sched_text_end)` and `[__lock_text_start, __lock_text_end)`.
    pub sched_ranges: Vec<(u64, u64)>,
    /// `init_task`.
    pub init_task: u64,
    /// `ret_from_fork_asm` (6.12) or `ret_from_fork` (6.1): a never-run task's `ret_addr`.
    pub ret_from_fork: u64,
    /// `do_idle` (start, end) for idle detection.
    pub do_idle: Option<(u64, u64)>,
    /// THREAD_SIZE (= IRQ_STACK_SIZE): `__end_init_stack`/`__end_init_task` - `init_stack`.
    pub thread_size: u64,
    /// `struct module` layout (None without module support).
    pub modules: Option<crate::modules::ModuleLayout>,
}

fn sym(g: &dyn GuestAccess, name: &'static str) -> Result<u64, ModelError> {
    g.symbol(name).ok_or(ModelError::MissingSymbol(name))
}

fn read_range(
    g: &dyn GuestAccess,
    start: u64,
    end: u64,
    cap: u64,
    what: &'static str,
) -> Result<Vec<u8>, ModelError> {
    let len = end
        .checked_sub(start)
        .filter(|&l| l > 0 && l <= cap)
        .ok_or(ModelError::BadSize(what))?;
    let mut buf = vec![0u8; len as usize];
    g.read_virt(start, &mut buf)
        .map_err(|err| ModelError::Read { what, err })?;
    Ok(buf)
}

impl Model {
    /// Builds the model: reads BTF (`__start_BTF..__stop_BTF`) and the ORC sections.
    pub fn build(g: &dyn GuestAccess) -> Result<Model, ModelError> {
        let btf_bytes = read_range(
            g,
            sym(g, "__start_BTF")?,
            sym(g, "__stop_BTF")?,
            MAX_BTF_BYTES,
            "BTF",
        )?;
        let btf = Btf::parse(btf_bytes)?;
        let task = Self::task_layout(g, &btf)?;
        let regs = PtRegsLayout::from_btf(&btf)?;
        let percpu = Self::percpu_layout(g, &btf)?;

        let ip_start = sym(g, "__start_orc_unwind_ip")?;
        let orc_start = sym(g, "__start_orc_unwind")?;
        let orc_stop = sym(g, "__stop_orc_unwind")?;
        let ip_stop = g.symbol("__stop_orc_unwind_ip").unwrap_or(orc_start);
        let ip_bytes = read_range(g, ip_start, ip_stop, MAX_ORC_IP_BYTES, "orc_unwind_ip")?;
        let entries = read_range(g, orc_start, orc_stop, MAX_ORC_IP_BYTES * 2, "orc_unwind")?;
        let format = if g.symbol("__start_orc_header").is_some() {
            OrcFormat::Current
        } else {
            OrcFormat::Legacy
        };
        let orc = OrcTable::new(&ip_bytes, ip_start, entries, format)?;

        let stext = sym(g, "_stext")?;
        let etext = sym(g, "_etext")?;
        let mut orc_ranges = vec![(stext, etext)];
        if let (Some(s), Some(e)) = (g.symbol("_sinittext"), g.symbol("_einittext")) {
            orc_ranges.push((s, e));
        }
        let text_ranges = orc_ranges.clone();
        let mut sched_ranges = Vec::new();
        for (s, e) in [
            ("__sched_text_start", "__sched_text_end"),
            ("__lock_text_start", "__lock_text_end"),
        ] {
            if let (Some(s), Some(e)) = (g.symbol(s), g.symbol(e)) {
                sched_ranges.push((s, e));
            }
        }
        let ret_from_fork = g
            .symbol("ret_from_fork_asm")
            .or_else(|| g.symbol("ret_from_fork"))
            .ok_or(ModelError::MissingSymbol("ret_from_fork"))?;
        let do_idle = g.symbol("do_idle").and_then(|a| {
            g.symbolize(a)
                .map(|(_, off, size)| (a - off, a - off + size))
        });
        let modules = g
            .symbol("modules")
            .and_then(|h| crate::modules::ModuleLayout::from_btf(&btf, h));
        let thread_size = g
            .symbol("init_stack")
            .and_then(|s| {
                let e = g
                    .symbol("__end_init_stack")
                    .or_else(|| g.symbol("__end_init_task"))?;
                e.checked_sub(s)
            })
            .filter(|&n| n.is_power_of_two() && (0x2000..=0x10000).contains(&n))
            .unwrap_or(THREAD_SIZE);
        Ok(Model {
            btf,
            task,
            percpu,
            regs,
            orc,
            orc_ranges,
            text_ranges,
            sched_ranges,
            init_task: sym(g, "init_task")?,
            ret_from_fork,
            do_idle,
            modules,
            thread_size,
        })
    }

    fn task_layout(g: &dyn GuestAccess, btf: &Btf) -> Result<TaskLayout, ModelError> {
        let t = |f: &str| btf.member_offset("task_struct", f);
        let opt = |s: &str, f: &str| btf.member_offset(s, f).ok();
        let comm = btf.member("task_struct", "comm")?;
        Ok(TaskLayout {
            size: btf.struct_size("task_struct")?,
            state: t("__state").or_else(|_| t("state"))?,
            flags: t("flags")?,
            on_cpu: t("on_cpu")?,
            cpu: t("thread_info.cpu").or_else(|_| t("cpu"))?,
            stack: t("stack")?,
            tasks: t("tasks")?,
            pid: t("pid")?,
            tgid: t("tgid")?,
            comm: comm.offset,
            comm_len: comm.size.min(64),
            exit_state: t("exit_state")?,
            signal: t("signal")?,
            thread_node: opt("task_struct", "thread_node"),
            signal_thread_head: opt("signal_struct", "thread_head"),
            thread_group: opt("task_struct", "thread_group"),
            thread_sp: t("thread.sp")?,
            patch_state: opt("task_struct", "patch_state"),
            mm: t("mm")?,
            active_mm: t("active_mm")?,
            mm_pgd: btf.member_offset("mm_struct", "pgd")?,
            frame_size: btf.struct_size("inactive_task_frame")?,
            frame_bp: btf.member_offset("inactive_task_frame", "bp")?,
            frame_ret_addr: btf.member_offset("inactive_task_frame", "ret_addr")?,
            proc_comm: Self::proc_comm_layout(g, btf),
        })
    }

    /// The `proc_task_name()` layout; None when BTF lacks `struct kthread`.
    fn proc_comm_layout(g: &dyn GuestAccess, btf: &Btf) -> Option<ProcCommLayout> {
        let off = |s: &str, f: &str| btf.member_offset(s, f).ok();
        let array_len =
            |s: &str, f: &str| btf.member(s, f).ok().map(|m| (m.offset, m.size.min(64)));
        let worker = || -> Option<WorkerLayout> {
            // Without wq_worker_comm() (before 4.18) /proc shows a worker's plain comm.
            g.symbol("wq_worker_comm")?;
            let (desc, desc_len) = array_len("worker", "desc")?;
            // format_worker_id() came with WORKER_ID_LEN (upstream 2a1b02bcba78, 6.10).
            let id = if btf.enum_value("WORKER_ID_LEN").is_some()
                || g.symbol("format_worker_id").is_some()
            {
                let (wq_name, wq_name_len) = array_len("workqueue_struct", "name")?;
                Some(WorkerIdLayout {
                    rescue_wq: off("worker", "rescue_wq")?,
                    id: off("worker", "id")?,
                    wq_name,
                    wq_name_len,
                    pool_cpu: off("worker_pool", "cpu")?,
                    pool_id: off("worker_pool", "id")?,
                    pool_attrs: off("worker_pool", "attrs")?,
                    attrs_nice: off("workqueue_attrs", "nice")?,
                })
            } else {
                None
            };
            Some(WorkerLayout {
                pool: off("worker", "pool")?,
                desc,
                desc_len,
                current_work: off("worker", "current_work")?,
                id,
            })
        };
        Some(ProcCommLayout {
            kthread: off("task_struct", "worker_private")
                .or_else(|| off("task_struct", "set_child_tid"))?,
            kthread_data: off("kthread", "data")?,
            kthread_full_name: off("kthread", "full_name"),
            worker: worker(),
        })
    }

    fn percpu_layout(g: &dyn GuestAccess, btf: &Btf) -> Result<PercpuLayout, ModelError> {
        // 6.12: struct pcpu_hot; 6.1: separate per-cpu variables.
        let hot = g
            .symbol("pcpu_hot")
            .filter(|_| btf.struct_id("pcpu_hot").is_ok());
        let field = |hot_field: &str, var: &'static str| -> Option<u64> {
            match hot {
                Some(h) => btf
                    .member_offset("pcpu_hot", hot_field)
                    .ok()
                    .map(|o| h.wrapping_add(o)),
                None => g.symbol(var),
            }
        };
        let current_task = field("current_task", "current_task")
            .ok_or(ModelError::MissingSymbol("current_task"))?;
        let nr_cpu_ids = match g.symbol("nr_cpu_ids") {
            Some(a) => g.read_u32(a).map_err(|err| ModelError::Read {
                what: "nr_cpu_ids",
                err,
            })?,
            None => 1,
        };
        Ok(PercpuLayout {
            this_cpu_off: sym(g, "this_cpu_off")?,
            current_task,
            cpu_number: field("cpu_number", "cpu_number"),
            hardirq_stack_ptr: field("hardirq_stack_ptr", "hardirq_stack_ptr"),
            cea_exception_stacks: g.symbol("cea_exception_stacks"),
            cea_exception_stacks_size: btf.struct_size("cea_exception_stacks").unwrap_or(0),
            runqueues: g.symbol("runqueues"),
            rq_idle: btf.member_offset("rq", "idle").ok(),
            rq_curr: btf.member_offset("rq", "curr").ok(),
            per_cpu_offset: sym(g, "__per_cpu_offset")?,
            nr_cpu_ids: nr_cpu_ids.min(8192),
            loaded_mm: g.symbol("cpu_tlbstate").and_then(|v| {
                btf.member_offset("tlb_state", "loaded_mm")
                    .ok()
                    .map(|o| v.wrapping_add(o))
            }),
        })
    }

    /// Whether `addr` is in `__sched` or lock text (filtered from `/proc/PID/stack`).
    pub fn in_sched_functions(&self, addr: u64) -> bool {
        self.sched_ranges
            .iter()
            .any(|&(s, e)| addr >= s && addr < e)
    }
}

/// [`GuestAccess`] over a [`crate::Kernel`] and guest memory.
pub struct KernelGuest<'a> {
    /// The kernel.
    pub kernel: &'a crate::Kernel,
    /// Guest-physical memory.
    pub mem: &'a dyn crate::PhysMemory,
}

impl std::fmt::Debug for KernelGuest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelGuest").finish_non_exhaustive()
    }
}

impl GuestAccess for KernelGuest<'_> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        self.kernel
            .read_virt(self.mem, va, buf)
            .map_err(|e| e.to_string())
    }

    fn symbol(&self, name: &str) -> Option<u64> {
        self.kernel.lookup(name, None).ok()
    }

    fn translate(&self, va: u64) -> Option<u64> {
        self.kernel.translate(self.mem, va).ok()
    }

    fn frame_pointer_text(&self) -> Vec<(u64, u64)> {
        self.kernel.frame_pointer_text()
    }

    fn text_aliases(&self) -> Vec<(u64, u64)> {
        self.kernel.text_aliases()
    }

    fn symbolize(&self, addr: u64) -> Option<(String, u64, u64)> {
        self.kernel
            .symbolize(addr)
            .map(|s| (s.name.to_string(), s.offset, s.size))
    }
}

impl crate::Kernel {
    /// The BTF/ORC/per-CPU layout model, built from guest memory on first use and cached.
    pub fn model(&self, mem: &dyn crate::PhysMemory) -> Result<&Model, ModelError> {
        let cell = &self.extras().model;
        if let Some(m) = cell.get() {
            return Ok(m);
        }
        let m = Model::build(&KernelGuest { kernel: self, mem })?;
        Ok(cell.get_or_init(|| m))
    }

    /// The guest kernel's BTF (read from `__start_BTF..__stop_BTF`).
    pub fn btf(&self, mem: &dyn crate::PhysMemory) -> Result<&Btf, ModelError> {
        Ok(&self.model(mem)?.btf)
    }
}
