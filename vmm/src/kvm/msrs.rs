//! Boot MSRs (after Firecracker's arch/x86_64/msr.rs) and the MSRs read from paused vCPUs.

use kvm_bindings::{kvm_msr_entry, Msrs};

use super::error::VmError;

/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (64-bit syscall entry).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL flag mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// FS base.
pub const MSR_FS_BASE: u32 = 0xc000_0100;
/// GS base.
pub const MSR_GS_BASE: u32 = 0xc000_0101;
/// Kernel GS base (swapgs).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// MTRR default type.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

fn entries(list: &[(u32, u64)]) -> Result<Msrs, VmError> {
    let v: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&v).map_err(|e| VmError::Host(format!("MSR list: {e:?}")))
}

/// MSR values every vCPU starts with.
pub fn boot_msrs() -> Result<Msrs, VmError> {
    entries(&[
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ])
}

/// The MSRs `KvmControl::regs` reads: LSTAR and KERNEL_GS_BASE.
pub fn introspection_msrs() -> Result<Msrs, VmError> {
    entries(&[(MSR_LSTAR, 0), (MSR_KERNEL_GS_BASE, 0)])
}
