//! The vCPU thread: runs KVM_RUN, dispatches exits to the devices, parks on pause requests
//! and turns debug exits into [`GuestEvent::Breakpoint`]s that pause the whole VM.

use std::sync::Arc;

use std::sync::atomic::Ordering;

use guest_control::GuestEvent;
use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::debug;

use super::error::VmError;
use super::pause::{lock, ExitReason, Outcome, Shared};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// What to do after an exit, decided while the exit borrows the vCPU fd.
enum Action {
    Continue,
    Stepped,
    Breakpoint(u64),
    Stop(ExitReason),
    InternalError,
    Fail(VmError),
}

/// Body of vCPU thread `idx`.
pub fn vcpu_thread(shared: Arc<Shared>, idx: usize) {
    let Some(handle) = shared.vcpus.get(idx) else {
        return;
    };
    // SAFETY: pthread_self has no preconditions.
    handle.set_thread(Some(unsafe { libc::pthread_self() }));
    let outcome = run_loop(&shared, idx);
    handle.set_thread(None);
    let mut st = shared.state();
    st.running = st.running.saturating_sub(1);
    drop(st);
    if let Some(o) = outcome {
        shared.finish(o);
    } else {
        shared.cond.notify_all();
    }
}

/// Runs until the VM ends; returns the outcome this vCPU caused, if any.
fn run_loop(shared: &Shared, idx: usize) -> Option<Outcome> {
    let handle = &shared.vcpus[idx];
    loop {
        handle.set_immediate_exit(0);
        {
            let mut st = shared.state();
            if st.outcome.is_some() {
                return None;
            }
            if st.pause_requested && st.step != Some(idx) {
                st.parked += 1;
                shared.cond.notify_all();
                while st.pause_requested && st.outcome.is_none() && st.step != Some(idx) {
                    st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.parked -= 1;
                continue;
            }
        }
        let mut fd = lock(&handle.fd);
        // Single-step over a breakpoint we stopped at, or one instruction the controller asked
        // for while the others stay parked (`Shared::single_step`).
        let requested = shared.state().step == Some(idx);
        let stepping = requested || handle.step_over.load(Ordering::SeqCst);
        if stepping {
            if let Err(e) = arm_single_step(&fd) {
                return Some(Outcome::Error(e));
            }
        }
        let action = match fd.run() {
            Ok(VcpuExit::Debug(_)) if stepping => Action::Stepped,
            Ok(exit) => handle_exit(shared, idx, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Continue,
            Err(source) => Action::Fail(VmError::Kvm {
                what: "KVM_RUN",
                source,
            }),
        };
        match action {
            Action::Continue => {}
            Action::Stepped => {
                handle.step_over.store(false, Ordering::SeqCst);
                let dbg = *lock(&handle.debug);
                if let Err(source) = fd.set_guest_debug(&dbg) {
                    return Some(Outcome::Error(VmError::Kvm {
                        what: "KVM_SET_GUEST_DEBUG",
                        source,
                    }));
                }
                if requested {
                    drop(fd);
                    let mut st = shared.state();
                    if st.step == Some(idx) {
                        st.step = None;
                    }
                    drop(st);
                    shared.cond.notify_all();
                }
            }
            Action::Breakpoint(rip) => {
                // On resume, single-step over the breakpoint with breakpoints disarmed.
                handle.step_over.store(true, Ordering::SeqCst);
                drop(fd);
                let mut st = shared.state();
                st.events
                    .push_back(GuestEvent::Breakpoint { vcpu: idx, rip });
                st.pause_requested = true;
                drop(st);
                shared.cond.notify_all();
                shared.kick_all();
            }
            Action::Stop(r) => return Some(Outcome::Exit(r)),
            Action::InternalError => {
                let suberror = internal_suberror(&mut fd);
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Some(Outcome::Error(VmError::InternalError {
                    vcpu: idx,
                    suberror,
                    rip,
                }));
            }
            Action::Fail(e) => return Some(Outcome::Error(e)),
        }
    }
}

/// Single-step one instruction with breakpoints disarmed (and interrupts blocked where KVM
/// supports it, so the step does not land in an interrupt handler).
fn arm_single_step(fd: &VcpuFd) -> Result<(), VmError> {
    let mut d = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ,
        ..Default::default()
    };
    if fd.set_guest_debug(&d).is_ok() {
        return Ok(());
    }
    d.control &= !KVM_GUESTDBG_BLOCKIRQ;
    fd.set_guest_debug(&d).map_err(|source| VmError::Kvm {
        what: "KVM_SET_GUEST_DEBUG",
        source,
    })
}

fn internal_suberror(fd: &mut VcpuFd) -> u32 {
    let run = fd.get_kvm_run();
    // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is the active member of the
    // exit union; it is plain data.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

fn handle_exit(shared: &Shared, idx: usize, exit: VcpuExit<'_>) -> Action {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if lock(&shared.devices).io_out(port, data) {
                Action::Stop(ExitReason::Reset)
            } else {
                Action::Continue
            }
        }
        VcpuExit::IoIn(port, data) => {
            lock(&shared.devices).io_in(port, data);
            Action::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            debug!(vcpu = idx, addr, "MMIO read of unmapped address");
            data.fill(0xff);
            Action::Continue
        }
        VcpuExit::MmioWrite(addr, _) => {
            debug!(vcpu = idx, addr, "MMIO write to unmapped address");
            Action::Continue
        }
        VcpuExit::Debug(arch) => Action::Breakpoint(arch.pc),
        VcpuExit::Hlt => Action::Stop(ExitReason::Halt),
        VcpuExit::Shutdown => Action::Stop(ExitReason::Shutdown),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Action::Stop(ExitReason::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Action::Stop(ExitReason::Shutdown),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Action::Continue,
        VcpuExit::InternalError => Action::InternalError,
        VcpuExit::FailEntry(reason, _) => Action::Fail(VmError::FailEntry { vcpu: idx, reason }),
        other => Action::Fail(VmError::UnexpectedExit {
            vcpu: idx,
            exit: format!("{other:?}"),
        }),
    }
}

/// The `KVM_SET_GUEST_DEBUG` argument for execution breakpoints at `addrs` (at most 4).
pub fn guest_debug(addrs: &[u64]) -> kvm_guest_debug {
    let mut d = kvm_guest_debug::default();
    if addrs.is_empty() {
        return d;
    }
    d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    let mut dr7 = 0u64;
    for (i, &a) in addrs.iter().take(4).enumerate() {
        d.arch.debugreg[i] = a;
        // Global enable; R/W = 00 (execute) and LEN = 00.
        dr7 |= 1 << (i * 2 + 1);
    }
    d.arch.debugreg[7] = dr7;
    d
}
