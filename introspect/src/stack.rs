//! Kernel stacks of tasks and vCPUs, their reliability verdict, and the `/proc/PID/stack` view.

use serde::{Deserialize, Serialize};

use crate::model::{GuestAccess, Model};
use crate::modules::LazyModules;
use crate::regs::VcpuRegs;
use crate::tasks::{cpu_base, vcpu_cpus, Task};
use crate::unwind::{walk, StackRange, StackReader, StackType, UnwindEnv, UnwindStart, WalkEnd};

/// What a stack belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StackKind {
    /// A switched-out task (unwound from `thread.sp`).
    Sleeping,
    /// A vCPU executing kernel code (not idle).
    RunningKernel,
    /// A vCPU in user mode: no kernel frames.
    User,
    /// A vCPU in the idle loop (`do_idle` on the stack).
    Idle,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// The (return) address.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// `(name, offset, size)` as `%pB` prints it (return addresses are looked up at `addr - 1`).
    pub symbol: Option<(String, u64, u64)>,
}

impl Frame {
    /// `name+0xoff/0xsize` (or `0x…` if unknown).
    pub fn render(&self) -> String {
        match &self.symbol {
            Some((n, off, size)) => format!("{n}+{off:#x}/{size:#x}"),
            None => format!("{:#x}", self.addr),
        }
    }
}

/// An unwound stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stack {
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
    /// Whether livepatch's `arch_stack_walk_reliable()` would accept this stack.
    pub reliable: bool,
    /// Why it is unreliable (or how the walk ended abnormally).
    pub reason: Option<String>,
    /// Kind.
    pub kind: StackKind,
}

/// Errors producing a stack.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StackError {
    /// Building the model failed.
    #[error("kernel model: {0}")]
    Model(String),
    /// Reading guest memory failed.
    #[error("reading {what}: {err}")]
    Read {
        /// What.
        what: &'static str,
        /// The error.
        err: String,
    },
}

struct Reader<'a>(&'a dyn GuestAccess);

impl StackReader for Reader<'_> {
    fn read_u64(&self, va: u64) -> Option<u64> {
        self.0.read_u64(va).ok()
    }
}

fn env<'a>(
    m: &'a Model,
    modules: &'a LazyModules<'a>,
    fp_text: &'a [(u64, u64)],
    aliases: &'a [(u64, u64)],
) -> UnwindEnv<'a> {
    UnwindEnv {
        orc: &m.orc,
        orc_ranges: &m.orc_ranges,
        text_ranges: &m.text_ranges,
        modules: Some(modules),
        regs: m.regs,
        fp_text,
        aliases,
    }
}

/// `%pB`: symbol of `addr - 1`, offset + 1 (return addresses).
fn sym_pb(g: &dyn GuestAccess, addr: u64) -> Option<(String, u64, u64)> {
    g.symbolize(addr.wrapping_sub(1))
        .map(|(n, off, size)| (n, off.wrapping_add(1), size))
}

fn frames(g: &dyn GuestAccess, ips: &[u64], first_exact: bool) -> Vec<Frame> {
    ips.iter()
        .enumerate()
        .map(|(i, &addr)| Frame {
            addr,
            symbol: if i == 0 && first_exact {
                g.symbolize(addr)
            } else {
                sym_pb(g, addr)
            },
        })
        .collect()
}

/// Most tasks whose unwinds [`crate::Kernel::task_stack`] keeps.
const STACK_CACHE_MAX: usize = 16384;

/// The used part of a switched-out task's stack, `[thread.sp, stack end)`, read once; `None`
/// when its unwind is not kept (running, no stack, implausible sp, unreadable).
fn used_stack(g: &dyn GuestAccess, m: &Model, task: &Task) -> Option<Vec<u8>> {
    if task.on_cpu || task.running_on_vcpu.is_some() || task.stack_base == 0 {
        return None;
    }
    let end = task.stack_base.checked_add(m.thread_size)?;
    if task.thread_sp < task.stack_base || task.thread_sp >= end || m.thread_size > 1 << 20 {
        return None;
    }
    let mut bytes = vec![0u8; (end - task.thread_sp) as usize];
    g.read_virt(task.thread_sp, &mut bytes).ok()?;
    Some(bytes)
}

/// What the unwind of switched-out `task` depends on, hashed (see
/// [`crate::Kernel::task_stack`]), over `bytes` from [`used_stack`].
fn stack_fingerprint(g: &dyn GuestAccess, m: &Model, task: &Task, bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::default();
    for v in [task.addr, task.stack_base, task.thread_sp, m.thread_size] {
        h.write(&v.to_le_bytes());
    }
    for (a, b) in g.frame_pointer_text().into_iter().chain(g.text_aliases()) {
        h.write(&a.to_le_bytes());
        h.write(&b.to_le_bytes());
    }
    h.write(bytes);
    h.0
}

/// `g` with `[base, base + bytes.len())` read from `bytes`: an unwind of exactly the stack
/// that was fingerprinted, even while the guest runs on.
struct Frozen<'a> {
    g: &'a dyn GuestAccess,
    base: u64,
    bytes: &'a [u8],
}

impl GuestAccess for Frozen<'_> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        let off = va.wrapping_sub(self.base);
        match usize::try_from(off).ok().and_then(|o| {
            self.bytes
                .get(o..o.checked_add(buf.len())?)
                .filter(|_| va >= self.base)
        }) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => self.g.read_virt(va, buf),
        }
    }
    fn symbol(&self, name: &str) -> Option<u64> {
        self.g.symbol(name)
    }
    fn symbolize(&self, addr: u64) -> Option<(String, u64, u64)> {
        self.g.symbolize(addr)
    }
    fn frame_pointer_text(&self) -> Vec<(u64, u64)> {
        self.g.frame_pointer_text()
    }
    fn text_aliases(&self) -> Vec<(u64, u64)> {
        self.g.text_aliases()
    }
    fn translate(&self, va: u64) -> Option<u64> {
        self.g.translate(va)
    }
}

/// A word-at-a-time FNV-1a variant: fast, and good enough to notice a changed stack (a guest
/// that forges a collision only fools the checks about itself).
struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    fn write(&mut self, data: &[u8]) {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0 ^ w)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(29);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 ^= data.len() as u64;
    }
}

/// The unwind of a switched-out task, from `thread.sp` → `inactive_task_frame`.
pub fn task_stack(g: &dyn GuestAccess, m: &Model, task: &Task) -> Result<Stack, StackError> {
    if task.on_cpu || task.running_on_vcpu.is_some() {
        let why = match task.running_on_vcpu {
            Some(v) => format!("task is running on vCPU {v}; unwind the vCPU instead"),
            None => "task is on a CPU (on_cpu)".to_string(),
        };
        return Ok(Stack {
            frames: vec![],
            reliable: false,
            reason: Some(why),
            kind: StackKind::Sleeping,
        });
    }
    if task.stack_base == 0 {
        // Exited task without a stack: "reliably empty", like stack_trace_save_tsk_reliable.
        return Ok(Stack {
            frames: vec![],
            reliable: true,
            reason: None,
            kind: StackKind::Sleeping,
        });
    }
    let t = &m.task;
    let sp = task.thread_sp;
    let rd = |off: u64, what| {
        g.read_u64(sp.wrapping_add(off))
            .map_err(|err| StackError::Read { what, err })
    };
    let ip = rd(t.frame_ret_addr, "inactive_task_frame.ret_addr")?;
    let bp = rd(t.frame_bp, "inactive_task_frame.bp")?;
    let start = UnwindStart {
        ip,
        sp: sp.wrapping_add(t.frame_size),
        bp,
        signal: ip == m.ret_from_fork,
    };
    let stacks = [StackRange {
        start: task.stack_base,
        end: task.stack_base.wrapping_add(m.thread_size),
        ty: StackType::Task,
    }];
    let fp = g.frame_pointer_text();
    let aliases = g.text_aliases();
    let w = walk(
        env(m, &LazyModules::new(g, m), &fp, &aliases),
        &stacks,
        &Reader(g),
        start,
    );
    Ok(Stack {
        frames: frames(g, &w.frames, false),
        reliable: w.unreliable.is_none(),
        reason: w.unreliable,
        kind: StackKind::Sleeping,
    })
}

/// The stacks an unwind of vCPU `vcpu` may read: the task stack of its `current`, its CPU's
/// hardirq stack (`[hardirq_stack_ptr + 8 - THREAD_SIZE, hardirq_stack_ptr + 8)`) and exception stacks
/// (`*cea_exception_stacks`, BTF size). The entry trampoline stack is not included.
pub fn vcpu_stack_ranges(
    g: &dyn GuestAccess,
    m: &Model,
    vcpus: &[VcpuRegs],
    vcpu: usize,
) -> Vec<StackRange> {
    vcpu_stack_ranges_of(g, m, &vcpu_cpus(g, m, vcpus), vcpu).0
}

/// [`vcpu_stack_ranges`] with the vCPU → CPU map already made, also returning the vCPU's
/// `current` task as read on the way.
pub fn vcpu_stack_ranges_of(
    g: &dyn GuestAccess,
    m: &Model,
    cpus: &[crate::tasks::VcpuCpu],
    vcpu: usize,
) -> (Vec<StackRange>, Option<Task>) {
    let vc = cpus.get(vcpu).copied();
    let base = vc
        .and_then(|c| c.percpu_base)
        .or_else(|| vc.and_then(|c| c.cpu).and_then(|c| cpu_base(g, m, c)));
    let task = vc
        .and_then(|c| c.current)
        .and_then(|t| crate::tasks::read_task(g, m, t, cpus).ok());
    (vcpu_stacks(g, m, base, task.as_ref()), task)
}

/// Stacks a running vCPU may be on: its task stack, IRQ stack and exception stacks.
fn vcpu_stacks(
    g: &dyn GuestAccess,
    m: &Model,
    base: Option<u64>,
    task: Option<&Task>,
) -> Vec<StackRange> {
    let mut v = Vec::new();
    if let Some(t) = task.filter(|t| t.stack_base != 0) {
        v.push(StackRange {
            start: t.stack_base,
            end: t.stack_base.wrapping_add(m.thread_size),
            ty: StackType::Task,
        });
    }
    if let Some(base) = base {
        if let Some(p) = m
            .percpu
            .hardirq_stack_ptr
            .and_then(|o| g.read_u64(base.wrapping_add(o)).ok())
        {
            let end = p.wrapping_add(8);
            if p != 0 && end > m.thread_size {
                v.push(StackRange {
                    start: end - m.thread_size,
                    end,
                    ty: StackType::Irq,
                });
            }
        }
        if let Some(p) = m
            .percpu
            .cea_exception_stacks
            .and_then(|o| g.read_u64(base.wrapping_add(o)).ok())
        {
            if p != 0 && m.percpu.cea_exception_stacks_size > 0 {
                if let Some(end) = p.checked_add(m.percpu.cea_exception_stacks_size) {
                    v.push(StackRange {
                        start: p,
                        end,
                        ty: StackType::Exception,
                    });
                }
            }
        }
    }
    v
}

/// The unwind of a vCPU from its registers.
pub fn vcpu_stack(
    g: &dyn GuestAccess,
    m: &Model,
    vcpus: &[VcpuRegs],
    vcpu: usize,
) -> Result<Stack, StackError> {
    let Some(r) = vcpus.get(vcpu) else {
        return Err(StackError::Read {
            what: "vcpu registers",
            err: format!("no vCPU {vcpu}"),
        });
    };
    if r.cpl() == 3 {
        return Ok(Stack {
            frames: vec![],
            reliable: true,
            reason: None,
            kind: StackKind::User,
        });
    }
    let stacks = vcpu_stack_ranges(g, m, vcpus, vcpu);
    let start = UnwindStart {
        ip: r.rip,
        sp: r.rsp(),
        bp: r.rbp(),
        signal: true,
    };
    let fp = g.frame_pointer_text();
    let aliases = g.text_aliases();
    let w = walk(
        env(m, &LazyModules::new(g, m), &fp, &aliases),
        &stacks,
        &Reader(g),
        start,
    );
    let idle = m
        .do_idle
        .is_some_and(|(s, e)| w.frames.iter().any(|&a| a > s && a <= e));
    let kind = if idle {
        StackKind::Idle
    } else {
        StackKind::RunningKernel
    };
    let mut reason = w.unreliable;
    if reason.is_none() && !matches!(w.end, WalkEnd::UserRegs | WalkEnd::EndOfStack) {
        reason = Some(format!("walk ended with {:?}", w.end));
    }
    Ok(Stack {
        frames: frames(g, &w.frames, true),
        reliable: reason.is_none(),
        reason,
        kind,
    })
}

/// Renders a stack like `/proc/PID/stack`: frames in `__sched`/lock text are dropped
/// (`stack_trace_save_tsk` with the `nosched` filter) and each line is `[<0>] name+0xoff/0xsize`.
pub fn proc_stack_view(m: &Model, stack: &Stack) -> Vec<String> {
    stack
        .frames
        .iter()
        .filter(|f| !m.in_sched_functions(f.addr))
        .map(|f| format!("[<0>] {}", f.render()))
        .collect()
}

impl crate::Kernel {
    /// The kernel stack of a switched-out task (see [`task_stack`]). A task running on a vCPU
    /// gives an empty, unreliable stack: unwind it with [`crate::Kernel::vcpu_stack`].
    ///
    /// The unwind of a task is kept and reused while the task's stack is unchanged: its
    /// address, stack base, `thread.sp`, the frame-pointer text and every byte from
    /// `thread.sp` to the end of its stack (which is all an unwind of a sound stack reads) are
    /// the same as when it was computed. Checking that costs a read and a hash of the used part
    /// of the stack, against an ORC walk of every frame.
    pub fn task_stack(
        &self,
        mem: &dyn crate::PhysMemory,
        task: &Task,
    ) -> Result<Stack, StackError> {
        let m = self
            .model(mem)
            .map_err(|e| StackError::Model(e.to_string()))?;
        let g = crate::model::KernelGuest { kernel: self, mem };
        let Some(bytes) = used_stack(&g, m, task) else {
            return task_stack(&g, m, task);
        };
        let fp = stack_fingerprint(&g, m, task, &bytes);
        if let Ok(cache) = self.extras().stack_cache.lock() {
            if let Some((f, st)) = cache.get(&task.addr) {
                if *f == fp {
                    return Ok(st.clone());
                }
            }
        }
        // Unwound from the very bytes that were fingerprinted.
        let frozen = Frozen {
            g: &g,
            base: task.thread_sp,
            bytes: &bytes,
        };
        let st = task_stack(&frozen, m, task)?;
        if let Ok(mut cache) = self.extras().stack_cache.lock() {
            if cache.len() >= STACK_CACHE_MAX {
                cache.clear();
            }
            cache.insert(task.addr, (fp, st.clone()));
        }
        Ok(st)
    }

    /// The kernel stack of vCPU `vcpu` from its registers (all `vcpus` are needed to map vCPUs to
    /// CPUs).
    pub fn vcpu_stack(
        &self,
        mem: &dyn crate::PhysMemory,
        vcpus: &[VcpuRegs],
        vcpu: usize,
    ) -> Result<Stack, StackError> {
        let m = self
            .model(mem)
            .map_err(|e| StackError::Model(e.to_string()))?;
        vcpu_stack(
            &crate::model::KernelGuest { kernel: self, mem },
            m,
            vcpus,
            vcpu,
        )
    }

    /// The stack of `task` wherever it is: its vCPU's registers if it is `current` on a vCPU,
    /// else its saved `thread.sp`.
    pub fn stack_of(
        &self,
        mem: &dyn crate::PhysMemory,
        vcpus: &[VcpuRegs],
        task: &Task,
    ) -> Result<Stack, StackError> {
        match task.running_on_vcpu {
            Some(v) => self.vcpu_stack(mem, vcpus, v),
            None => self.task_stack(mem, task),
        }
    }

    /// `/proc/PID/stack` rendering of a stack (see [`proc_stack_view`]).
    pub fn proc_stack_view(
        &self,
        mem: &dyn crate::PhysMemory,
        stack: &Stack,
    ) -> Result<Vec<String>, StackError> {
        let m = self
            .model(mem)
            .map_err(|e| StackError::Model(e.to_string()))?;
        Ok(proc_stack_view(m, stack))
    }
}
