//! vCPU register state as the introspection layer needs it.

use serde::{Deserialize, Serialize};

/// Registers of one paused vCPU. Both hosts (KVM and QEMU gdbstub) fill this in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRegs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15 (in this order).
    pub gprs: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// CS selector (CPL = cs & 3).
    pub cs: u16,
    /// SS selector.
    pub ss: u16,
    /// Control registers.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3 (page-table base, PCID/PTI bits included as the CPU holds them).
    pub cr3: u64,
    /// CR4 (bit 12 = LA57).
    pub cr4: u64,
    /// EFER MSR.
    pub efer: u64,
    /// FS base.
    pub fs_base: u64,
    /// GS base (the kernel per-CPU base while in kernel mode).
    pub gs_base: u64,
    /// MSR_KERNEL_GS_BASE (the kernel per-CPU base while in user mode).
    pub kernel_gs_base: u64,
    /// MSR_LSTAR (syscall entry), when the host can read MSRs (KVM); `None` over gdbstub.
    pub lstar: Option<u64>,
    /// IDTR base, when the host can read it.
    pub idtr_base: Option<u64>,
}

impl VcpuRegs {
    /// Index of rsp in [`VcpuRegs::gprs`].
    pub const RSP: usize = 7;
    /// Index of rbp in [`VcpuRegs::gprs`].
    pub const RBP: usize = 6;

    /// Stack pointer.
    pub fn rsp(&self) -> u64 {
        self.gprs[Self::RSP]
    }

    /// Frame pointer.
    pub fn rbp(&self) -> u64 {
        self.gprs[Self::RBP]
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }

    /// Whether 5-level paging is on (CR4.LA57).
    pub fn la57(&self) -> bool {
        self.cr4 & (1 << 12) != 0
    }
}
