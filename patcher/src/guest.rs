//! The one trait through which the patcher reaches a guest. The KVM VMM and the QEMU attach
//! backend both implement it.

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
    /// Sets the hardware execution breakpoints (guest virtual addresses) on every vCPU,
    /// replacing earlier ones. An empty slice clears them.
    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<(), GuestError>;
    /// Resumes if paused and waits up to `timeout` for the next event. `Ok(None)` on timeout
    /// (the guest keeps running).
    fn wait_event(&mut self, timeout: Duration) -> Result<Option<GuestEvent>, GuestError>;
    /// Guest-physical range `(start, len)` that the host reserved for patch code and data (our
    /// VMM's e820-reserved arena). `None` when the host has none (QEMU attach): the patcher then
    /// finds guest pages the kernel reserved and never allocates.
    fn patch_arena(&self) -> Option<(u64, u64)> {
        None
    }
}
