//! hvpatch-guest-control: the one trait through which hvpatch reaches a guest,
//! [`GuestControl`]. The KVM VMM (`vmm::kvm`) and the QEMU attach backend (`vmm::attach`)
//! implement it; the patcher (`patcher::guest` re-exports this crate) uses it. It depends only
//! on introspect (for [`PhysMemory`] and [`VcpuRegs`]), so backends need not depend on the
//! patcher.

use std::time::Duration;

use introspect::{PhysMemory, VcpuRegs};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from a guest-control backend.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The operation needs all vCPUs paused.
    #[error("the guest is not paused")]
    NotPaused,
    /// The operation needs a running guest ([`GuestControl::wait_event`] on a paused guest).
    #[error("the guest is paused: resume it before waiting for events")]
    Paused,
    /// vCPU index out of range.
    #[error("no vCPU {0}")]
    NoSuchVcpu(usize),
    /// Guest-physical write outside RAM.
    #[error("guest-physical write {pa:#x}+{len:#x} is outside guest RAM")]
    WriteOutOfRange {
        /// Address.
        pa: u64,
        /// Length.
        len: usize,
    },
    /// More hardware breakpoints than the CPU has (4).
    #[error("{0} hardware breakpoints requested; at most 4 are available")]
    TooManyBreakpoints(usize),
    /// The guest is gone (exited, crashed, connection closed).
    #[error("the guest is gone: {0}")]
    Gone(String),
    /// A backend-specific failure.
    #[error("{0}")]
    Backend(String),
}

/// Something that happened in the guest while it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestEvent {
    /// A vCPU hit a hardware breakpoint; all vCPUs are now paused.
    Breakpoint {
        /// vCPU index (0-based).
        vcpu: usize,
        /// RIP at the breakpoint.
        #[serde(with = "introspect::hex")]
        rip: u64,
    },
    /// The guest shut down or reset.
    Exited,
}

/// Control of a running guest: the only way the patch engine touches it.
pub trait GuestControl: Send {
    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;
    /// Stops all vCPUs; returns once none is executing guest code.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets all vCPUs run again.
    fn resume(&mut self) -> Result<(), GuestError>;
    /// Whether all vCPUs are paused.
    fn is_paused(&self) -> bool;
    /// Registers of a paused vCPU.
    fn regs(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError>;
    /// Read access to guest-physical memory (valid while paused or not; racy while running).
    fn memory(&self) -> &dyn PhysMemory;
    /// Writes guest-physical memory so that the guest's instruction fetch sees it (code caches
    /// dropped). Used for code and for patch-arena data.
    fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Writes several guest-physical ranges, in order, as [`GuestControl::write_phys`] would
    /// one by one (later writes win where ranges overlap), but letting the backend pay its
    /// per-write setup once for the whole batch (and, where it can, pipeline the writes). On
    /// error, any part of the batch (whole writes or parts of them) may have been written; the
    /// caller restores what it needs.
    fn write_phys_batch(&mut self, writes: &[(u64, &[u8])]) -> Result<(), GuestError> {
        for &(pa, data) in writes {
            self.write_phys(pa, data)?;
        }
        Ok(())
    }
    /// Writes guest RAM that no vCPU executes or touches (hvpatch's own journal pages), while
    /// the guest runs or not. A backend may write it directly, without pausing the guest or
    /// dropping code caches; by default it is [`GuestControl::write_phys`].
    fn write_data_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.write_phys(pa, data)
    }
    /// Sets the hardware execution breakpoints (guest virtual addresses) on every vCPU,
    /// replacing earlier ones (including per-vCPU ones). An empty slice clears them.
    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<(), GuestError>;
    /// Sets the hardware execution breakpoints of vCPU `vcpu` only, replacing its earlier
    /// ones; other vCPUs keep theirs. An empty slice clears them. A hit pauses all vCPUs, as
    /// with [`GuestControl::set_breakpoints`]. Backends whose debug registers are shared by
    /// all vCPUs may emulate this (see the backend's documentation).
    fn set_vcpu_breakpoints(&mut self, vcpu: usize, addrs: &[u64]) -> Result<(), GuestError>;
    /// Executes exactly one instruction on vCPU `vcpu` of a paused guest while the other
    /// vCPUs stay stopped, with breakpoints (and, where the backend can, interrupts) held off
    /// for the step; returns the vCPU's registers after it. The guest stays paused.
    /// [`GuestError::NotPaused`] if the guest is running.
    fn single_step(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError>;
    /// Waits up to `timeout` for the next event of a running guest. `Ok(None)` on timeout (the
    /// guest keeps running). It never resumes the guest: call [`GuestControl::resume`] first.
    /// An event that is already queued (e.g. a breakpoint hit that paused the guest) is
    /// returned even if the guest is paused, and so is [`GuestEvent::Exited`] once the guest
    /// ended; otherwise a paused guest is an error, [`GuestError::Paused`].
    fn wait_event(&mut self, timeout: Duration) -> Result<Option<GuestEvent>, GuestError>;
    /// Guest-physical range `(start, len)` that the host reserved for patch code and data (our
    /// VMM's e820-reserved arena). `None` when the host has none (QEMU attach): the patcher then
    /// finds guest pages the kernel reserved and never allocates.
    fn patch_arena(&self) -> Option<(u64, u64)> {
        None
    }
}
