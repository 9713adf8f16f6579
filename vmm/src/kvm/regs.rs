//! Initial vCPU state: 64-bit long mode (identity paging, flat segments) or PVH 32-bit
//! protected mode, FPU, boot MSRs and local-APIC LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::gdt::{segment_from_gdt, GDT_LONG, GDT_PVH};
use super::boot::paging::write_identity_tables;
use super::error::VmError;
use super::layout::{GDT_ADDR, IDT_ADDR};
use super::msrs::boot_msrs;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// CPU mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, CS 0x08, DS/SS 0x10, identity-mapped low GiBs.
    Long64,
    /// 32-bit protected mode, paging off (PVH), CS 0x08, DS/SS 0x10.
    Protected32,
}

/// Writes the GDT and empty IDT for `mode`, and for [`EntryMode::Long64`] the identity page
/// tables. Returns CR3 (0 for 32-bit mode).
pub fn write_boot_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<u64, VmError> {
    let gdt = match mode {
        EntryMode::Long64 => &GDT_LONG,
        EntryMode::Protected32 => &GDT_PVH,
    };
    let werr = |e: vm_memory::GuestMemoryError| VmError::Memory(format!("boot tables: {e}"));
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(werr)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(werr)?;
    match mode {
        EntryMode::Long64 => Ok(write_identity_tables(mem)?),
        EntryMode::Protected32 => Ok(0),
    }
}

/// Sets segments, descriptor tables and control registers for `mode`.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode, cr3: u64) -> Result<(), VmError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(VmError::kvm("KVM_GET_SREGS"))?;
    let gdt = match mode {
        EntryMode::Long64 => &GDT_LONG,
        EntryMode::Protected32 => &GDT_PVH,
    };
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Long64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Protected32 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(VmError::kvm("KVM_SET_SREGS"))
}

/// Sets general registers: `gprs` in [`introspect::VcpuRegs`] order, `rip`, RFLAGS = 2.
pub fn setup_regs(vcpu: &VcpuFd, rip: u64, gprs: &[u64; 16]) -> Result<(), VmError> {
    let g = gprs;
    let regs = kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rbp: g[6],
        rsp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip,
        rflags: 2,
    };
    vcpu.set_regs(&regs).map_err(VmError::kvm("KVM_SET_REGS"))
}

/// Default x87/SSE control state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), VmError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VmError::kvm("KVM_SET_FPU"))
}

/// Boot MSRs.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), VmError> {
    let msrs = boot_msrs()?;
    let n = vcpu.set_msrs(&msrs).map_err(VmError::kvm("KVM_SET_MSRS"))?;
    if n != msrs.as_slice().len() {
        return Err(VmError::Host(format!(
            "KVM set {n} of {} boot MSRs",
            msrs.as_slice().len()
        )));
    }
    Ok(())
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = l.regs[off + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, val: u32) {
    for (i, v) in val.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *v as _;
    }
}

/// LINT0 = ExtINT, LINT1 = NMI (as the MP table says).
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), VmError> {
    let mut l = vcpu.get_lapic().map_err(VmError::kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&l, APIC_LVT0);
    set_lapic_reg(&mut l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(&l, APIC_LVT1);
    set_lapic_reg(&mut l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
    vcpu.set_lapic(&l).map_err(VmError::kvm("KVM_SET_LAPIC"))
}
