//! hvpatch-introspect: know a running x86-64 Linux guest kernel from guest-physical memory and
//! vCPU registers alone — no System.map, no vmlinux, no debuginfo, no agent.
//!
//! The crate is pure: it never touches KVM or QEMU. Hosts hand it a [`PhysMemory`] and
//! [`VcpuRegs`].

pub mod memory;
pub mod regs;

pub use memory::{MemError, PhysMemory, SliceMemory, SliceRegion};
pub use regs::VcpuRegs;
