//! State shared by the vCPU threads and their controllers, and pausing: a pause request is a
//! flag plus, per vCPU, `kvm_run.immediate_exit = 1` and a no-op real-time signal sent with
//! `pthread_kill` (as Firecracker / Cloud Hypervisor do). A vCPU in KVM_RUN leaves it with
//! EINTR; one about to enter returns at once because of `immediate_exit`. Each vCPU then parks
//! and counts itself; [`Shared::pause`] returns once all have.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use guest_control::{GuestError, GuestEvent};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::devices::Devices;
use super::error::VmError;

/// Offset from SIGRTMIN of the signal that kicks vCPUs out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: i32 = 1;

/// The kick signal number.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VmError> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let errno = *RESULT.get_or_init(|| {
        register_signal_handler(kick_signal(), noop_handler)
            .err()
            .map(|e| e.errno())
            .unwrap_or(0)
    });
    if errno != 0 {
        return Err(VmError::Host(format!(
            "cannot install the vCPU kick signal handler: errno {errno}"
        )));
    }
    Ok(())
}

/// Why the VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 0xfe, `reboot`, KVM system-event reset).
    Reset,
    /// Triple fault or system-event shutdown.
    Shutdown,
    /// A vCPU executed HLT with interrupts that can never come (KVM_EXIT_HLT).
    Halt,
    /// The host stopped the VM ([`crate::kvm::Vm::stop`]).
    Stopped,
}

impl ExitReason {
    /// Process exit code for `hvpatch run`: 0 for a guest-initiated reset/shutdown and for a
    /// host stop.
    pub fn exit_code(self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Shutdown | ExitReason::Stopped => 0,
            ExitReason::Halt => 1,
        }
    }
}

/// One vCPU as the controllers see it.
pub struct VcpuHandle {
    /// The vCPU fd; the vCPU thread holds the lock while in KVM_RUN, never while parked.
    pub fd: Mutex<VcpuFd>,
    immediate_exit: AtomicPtr<u8>,
    tid: Mutex<Option<libc::pthread_t>>,
    /// Hardware breakpoints in force (`KVM_SET_GUEST_DEBUG` argument).
    pub debug: Mutex<kvm_bindings::kvm_guest_debug>,
    /// The vCPU stopped at a breakpoint and must single-step over it before the breakpoints
    /// are re-armed (RF is not honoured everywhere, e.g. by nested KVM).
    pub step_over: AtomicBool,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").finish_non_exhaustive()
    }
}

impl VcpuHandle {
    /// Wraps a vCPU fd.
    pub fn new(mut fd: VcpuFd) -> Self {
        let p: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        Self {
            fd: Mutex::new(fd),
            immediate_exit: AtomicPtr::new(p),
            tid: Mutex::new(None),
            debug: Mutex::new(Default::default()),
            step_over: AtomicBool::new(false),
        }
    }

    /// Sets `kvm_run.immediate_exit`.
    pub fn set_immediate_exit(&self, v: u8) {
        let p = self.immediate_exit.load(Ordering::Relaxed);
        // SAFETY: `p` points into the kvm_run page mmap'ed by the VcpuFd in `self.fd`, which
        // lives as long as `self`. The byte is only ever accessed atomically by us and read by
        // KVM at KVM_RUN entry; AtomicU8 has the layout of u8.
        unsafe { (*(p as *const AtomicU8)).store(v, Ordering::SeqCst) };
    }

    /// Records the thread that runs this vCPU (None when it has exited).
    pub fn set_thread(&self, tid: Option<libc::pthread_t>) {
        *lock(&self.tid) = tid;
    }

    /// Forces the vCPU out of (or keeps it from entering) KVM_RUN.
    pub fn kick(&self) {
        self.set_immediate_exit(1);
        let tid = lock(&self.tid);
        if let Some(t) = *tid {
            // SAFETY: `t` is a thread that has not exited yet: the vCPU thread clears `tid`
            // (under this lock) before it returns, and threads are joined only after that.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

/// How the VM ended.
#[derive(Debug)]
pub enum Outcome {
    /// Orderly exit.
    Exit(ExitReason),
    /// A vCPU failed.
    Error(VmError),
}

/// Mutable run state (under [`Shared::state`]).
#[derive(Debug, Default)]
pub struct RunState {
    /// vCPUs must park.
    pub pause_requested: bool,
    /// vCPUs parked.
    pub parked: usize,
    /// vCPU threads alive.
    pub running: usize,
    /// Threads were started.
    pub started: bool,
    /// The VM is ending; set once with the first outcome.
    pub outcome: Option<Outcome>,
    /// Whether [`GuestEvent::Exited`] was handed out.
    pub exit_reported: bool,
    /// Events not yet taken by `wait_event`.
    pub events: VecDeque<GuestEvent>,
    /// Guest memory was written while paused: reload MMU state before resuming.
    pub mmu_dirty: bool,
    /// While paused: the vCPU asked to leave its park for one single-stepped instruction
    /// ([`Shared::single_step`]); the vCPU clears it once the step is done.
    pub step: Option<usize>,
}

impl RunState {
    /// All live vCPUs are parked (and there is at least a pause request).
    pub fn all_parked(&self) -> bool {
        self.pause_requested && self.parked == self.running
    }
}

/// Everything the vCPU threads, the [`crate::kvm::Vm`] and the controllers share.
pub struct Shared {
    /// Run state.
    pub state: Mutex<RunState>,
    /// Signalled on every state change.
    pub cond: Condvar,
    /// The vCPUs.
    pub vcpus: Vec<VcpuHandle>,
    /// Port-I/O devices.
    pub devices: Mutex<Devices>,
    /// Guest RAM.
    pub mem: Arc<GuestMemoryMmap>,
    /// Patch arena `(start, len)`.
    pub arena: Option<(u64, u64)>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering from poisoning (a panicked holder leaves plain data behind).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const KICK_INTERVAL: Duration = Duration::from_millis(20);
/// How long a called-off single step may take to park again.
const STEP_GRACE: Duration = Duration::from_secs(1);

impl Shared {
    /// Locks the run state.
    pub fn state(&self) -> MutexGuard<'_, RunState> {
        lock(&self.state)
    }

    /// Kicks every vCPU.
    pub fn kick_all(&self) {
        for v in &self.vcpus {
            v.kick();
        }
    }

    /// Ends the VM with `outcome` unless it already ended; wakes everyone.
    pub fn finish(&self, outcome: Outcome) {
        let mut st = self.state();
        if st.outcome.is_none() {
            st.outcome = Some(outcome);
        }
        drop(st);
        self.cond.notify_all();
        self.kick_all();
    }

    fn gone(st: &RunState) -> GuestError {
        match &st.outcome {
            Some(Outcome::Exit(r)) => GuestError::Gone(format!("VM exited: {r:?}")),
            Some(Outcome::Error(e)) => GuestError::Gone(format!("VM failed: {e}")),
            None => GuestError::Gone("VM not started".into()),
        }
    }

    /// Stops all vCPUs; returns once every live vCPU is parked.
    pub fn pause(&self) -> Result<(), GuestError> {
        let mut st = self.state();
        if st.outcome.is_some() || !st.started {
            return Err(Self::gone(&st));
        }
        st.pause_requested = true;
        drop(st);
        self.kick_all();
        self.wait_parked(None).map(|_| ())
    }

    /// Waits until all live vCPUs are parked (re-kicking them), or `deadline` passes (false).
    pub fn wait_parked(&self, deadline: Option<Instant>) -> Result<bool, GuestError> {
        let mut st = self.state();
        loop {
            if st.outcome.is_some() {
                return Err(Self::gone(&st));
            }
            if st.all_parked() {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            let (g, _) = self
                .cond
                .wait_timeout(st, KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if st.pause_requested && !st.all_parked() {
                drop(st);
                self.kick_all();
                st = self.state();
            }
        }
    }

    /// Lets all vCPUs run again. Reloads MMU state first when memory was written.
    pub fn resume(&self) -> Result<(), GuestError> {
        let st = self.state();
        if st.outcome.is_some() || !st.started {
            return Err(Self::gone(&st));
        }
        if !st.pause_requested {
            return Ok(());
        }
        let dirty = st.mmu_dirty;
        drop(st);
        if dirty {
            self.reload_mmu()?;
        }
        let mut st = self.state();
        st.mmu_dirty = false;
        st.pause_requested = false;
        drop(st);
        self.cond.notify_all();
        Ok(())
    }

    /// Runs exactly one instruction on parked vCPU `idx` while the others stay parked; returns
    /// once the vCPU has parked again. Needs the VM paused.
    pub fn single_step(&self, idx: usize, timeout: Duration) -> Result<(), GuestError> {
        let st = self.state();
        if st.outcome.is_some() || !st.started {
            return Err(Self::gone(&st));
        }
        if !st.all_parked() {
            return Err(GuestError::NotPaused);
        }
        let dirty = st.mmu_dirty;
        drop(st);
        if dirty {
            self.reload_mmu()?;
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        st.mmu_dirty = false;
        st.step = Some(idx);
        self.cond.notify_all();
        loop {
            if st.outcome.is_some() {
                st.step = None;
                return Err(Self::gone(&st));
            }
            if st.step.is_none() && st.all_parked() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                // Call the step off; the vCPU parks at its next exit.
                st.step = None;
                drop(st);
                self.kick_all();
                self.wait_parked(Some(Instant::now() + STEP_GRACE))?;
                return Err(GuestError::Backend(format!(
                    "vCPU {idx}: single step did not finish within {timeout:?}"
                )));
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Makes KVM drop cached translations (shadow pages, TLB) of every parked vCPU by
    /// reloading its special registers, so host writes to guest page tables and code are seen.
    fn reload_mmu(&self) -> Result<(), GuestError> {
        for (i, v) in self.vcpus.iter().enumerate() {
            let fd = lock(&v.fd);
            let s = fd
                .get_sregs()
                .map_err(|e| GuestError::Backend(format!("vCPU {i}: KVM_GET_SREGS: {e}")))?;
            fd.set_sregs(&s)
                .map_err(|e| GuestError::Backend(format!("vCPU {i}: KVM_SET_SREGS: {e}")))?;
        }
        Ok(())
    }
}
