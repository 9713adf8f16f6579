//! [`KvmControl`]: the KVM implementation of [`guest_control::GuestControl`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_control::{GuestControl, GuestError, GuestEvent};
use introspect::{PhysMemory, VcpuRegs};

use super::memory::KvmMemory;
use super::msrs::{introspection_msrs, MSR_KERNEL_GS_BASE, MSR_LSTAR};
use super::pause::{lock, Shared};
use super::vcpu::guest_debug;

/// Controls a running [`crate::kvm::Vm`]: pause/resume, registers, memory, breakpoints,
/// events. Cheap to create; `Send`, so it can live on the API thread.
pub struct KvmControl {
    shared: Arc<Shared>,
    memory: KvmMemory,
}

impl std::fmt::Debug for KvmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmControl")
            .field("vcpus", &self.shared.vcpus.len())
            .finish()
    }
}

/// Longest time one single-stepped instruction may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

fn backend(what: &str, vcpu: usize, e: impl std::fmt::Display) -> GuestError {
    GuestError::Backend(format!("vCPU {vcpu}: {what}: {e}"))
}

impl KvmControl {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let memory = KvmMemory::new(shared.mem.clone());
        Self { shared, memory }
    }

    /// The guest memory view (also available as `&dyn PhysMemory` via [`GuestControl`]).
    pub fn kvm_memory(&self) -> &KvmMemory {
        &self.memory
    }

    /// Sets the breakpoints of the vCPUs in `which`, pausing around it if running.
    fn arm_breakpoints(
        &mut self,
        which: std::ops::Range<usize>,
        addrs: &[u64],
    ) -> Result<(), GuestError> {
        if addrs.len() > 4 {
            return Err(GuestError::TooManyBreakpoints(addrs.len()));
        }
        let was_paused = self.is_paused();
        if !was_paused {
            self.shared.pause()?;
        }
        let dbg = guest_debug(addrs);
        let mut result = Ok(());
        for i in which {
            let h = &self.shared.vcpus[i];
            *lock(&h.debug) = dbg;
            if let Err(e) = lock(&h.fd).set_guest_debug(&dbg) {
                result = Err(backend("KVM_SET_GUEST_DEBUG", i, e));
                break;
            }
        }
        if !was_paused {
            self.shared.resume()?;
        }
        result
    }

    fn require_paused(&self) -> Result<(), GuestError> {
        if self.is_paused() {
            Ok(())
        } else {
            Err(GuestError::NotPaused)
        }
    }
}

impl GuestControl for KvmControl {
    fn vcpu_count(&self) -> usize {
        self.shared.vcpus.len()
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        self.shared.pause()
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.shared.resume()
    }

    fn is_paused(&self) -> bool {
        let st = self.shared.state();
        st.outcome.is_none() && st.started && st.all_parked()
    }

    fn regs(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        let h = self
            .shared
            .vcpus
            .get(vcpu)
            .ok_or(GuestError::NoSuchVcpu(vcpu))?;
        self.require_paused()?;
        let fd = lock(&h.fd);
        let r = fd
            .get_regs()
            .map_err(|e| backend("KVM_GET_REGS", vcpu, e))?;
        let s = fd
            .get_sregs()
            .map_err(|e| backend("KVM_GET_SREGS", vcpu, e))?;
        let mut msrs = introspection_msrs().map_err(|e| backend("MSR list", vcpu, e))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| backend("KVM_GET_MSRS", vcpu, e))?;
        let msr = |index: u32| {
            msrs.as_slice()
                .iter()
                .take(n)
                .find(|m| m.index == index)
                .map(|m| m.data)
        };
        Ok(VcpuRegs {
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            cs: s.cs.selector,
            ss: s.ss.selector,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            kernel_gs_base: msr(MSR_KERNEL_GS_BASE).unwrap_or(0),
            lstar: msr(MSR_LSTAR),
            idtr_base: Some(s.idt.base),
        })
    }

    fn memory(&self) -> &dyn PhysMemory {
        &self.memory
    }

    fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.memory
            .write(pa, data)
            .map_err(|_| GuestError::WriteOutOfRange {
                pa,
                len: data.len(),
            })?;
        self.shared.state().mmu_dirty = true;
        Ok(())
    }

    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<(), GuestError> {
        self.arm_breakpoints(0..self.shared.vcpus.len(), addrs)
    }

    /// `KVM_SET_GUEST_DEBUG` on that vCPU alone: each vCPU has its own debug registers.
    fn set_vcpu_breakpoints(&mut self, vcpu: usize, addrs: &[u64]) -> Result<(), GuestError> {
        if vcpu >= self.shared.vcpus.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        self.arm_breakpoints(vcpu..vcpu + 1, addrs)
    }

    /// `KVM_GUESTDBG_SINGLESTEP` (with `KVM_GUESTDBG_BLOCKIRQ` where KVM has it) on that vCPU
    /// while the other vCPUs stay parked.
    fn single_step(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        if vcpu >= self.shared.vcpus.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        self.require_paused()?;
        self.shared.single_step(vcpu, STEP_TIMEOUT)?;
        self.regs(vcpu)
    }

    fn wait_event(&mut self, timeout: Duration) -> Result<Option<GuestEvent>, GuestError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state();
        loop {
            if let Some(ev) = st.events.pop_front() {
                let pausing = st.pause_requested;
                drop(st);
                // Breakpoint events leave the VM paused (unless it has ended meanwhile, or
                // was resumed before the event was taken).
                if pausing {
                    let _ = self.shared.wait_parked(None);
                }
                return Ok(Some(ev));
            }
            if st.outcome.is_some() {
                if st.exit_reported {
                    return Err(GuestError::Gone("the VM has exited".into()));
                }
                st.exit_reported = true;
                return Ok(Some(GuestEvent::Exited));
            }
            if st.pause_requested {
                return Err(GuestError::Paused);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn patch_arena(&self) -> Option<(u64, u64)> {
        self.shared.arena
    }
}
