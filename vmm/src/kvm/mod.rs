//! The hvpatch KVM VMM (`hvpatch run`), built on rust-vmm: kvm-ioctls, vm-memory,
//! linux-loader, vm-superio, vmm-sys-util.
//!
//! [`Vm::create`] boots a stock Linux kernel (bzImage via the 64-bit boot protocol, ELF
//! vmlinux via PVH or 64-bit entry) with an e820 map that reserves the patch arena, ACPI
//! tables (MADT: Debian's kernels enumerate CPUs only from ACPI) and an MP table, normalised
//! CPUID and boot MSRs; [`Vm::create_raw`] runs raw code for tests. One thread per vCPU;
//! pausing uses a signal plus `kvm_run.immediate_exit` ([`pause`]).
//! [`Vm::control`] gives a [`KvmControl`], the [`guest_control::GuestControl`] of the VM.

pub mod boot;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod error;
pub mod layout;
pub mod memory;
pub mod msrs;
pub mod pause;
pub mod regs;
pub mod vcpu;
pub mod vm;

pub use boot::e820::{E820Entry, E820_RAM, E820_RESERVED};
pub use boot::{BootEntry, BootProtocol};
pub use control::KvmControl;
pub use devices::SerialOut;
pub use error::VmError;
pub use memory::KvmMemory;
pub use pause::ExitReason;
pub use regs::EntryMode;
pub use vm::{RawConfig, RawVcpu, SerialInput, Vm, VmConfig};
