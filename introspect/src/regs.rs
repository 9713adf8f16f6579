//! vCPU register state as the introspection layer needs it.

use serde::{Deserialize, Serialize};

/// Registers of one paused vCPU. Both hosts (KVM and QEMU gdbstub) fill this in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuRegs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15 (in this order).
    #[serde(with = "crate::hex")]
    pub gprs: [u64; 16],
    /// Instruction pointer.
    #[serde(with = "crate::hex")]
    pub rip: u64,
    /// Flags.
    #[serde(with = "crate::hex")]
    pub rflags: u64,
    /// CS selector (CPL = cs & 3).
    pub cs: u16,
    /// SS selector.
    pub ss: u16,
    /// Control registers.
    #[serde(with = "crate::hex")]
    pub cr0: u64,
    /// CR2.
    #[serde(with = "crate::hex")]
    pub cr2: u64,
    /// CR3 (page-table base, PCID/PTI bits included as the CPU holds them).
    #[serde(with = "crate::hex")]
    pub cr3: u64,
    /// CR4 (bit 12 = LA57).
    #[serde(with = "crate::hex")]
    pub cr4: u64,
    /// EFER MSR.
    #[serde(with = "crate::hex")]
    pub efer: u64,
    /// FS base.
    #[serde(with = "crate::hex")]
    pub fs_base: u64,
    /// GS base (the kernel per-CPU base while in kernel mode).
    #[serde(with = "crate::hex")]
    pub gs_base: u64,
    /// MSR_KERNEL_GS_BASE (the kernel per-CPU base while in user mode).
    #[serde(with = "crate::hex")]
    pub kernel_gs_base: u64,
    /// MSR_LSTAR (syscall entry), when the host can read MSRs (KVM); `None` over gdbstub.
    #[serde(with = "crate::hex", default)]
    pub lstar: Option<u64>,
    /// IDTR base, when the host can read it.
    #[serde(with = "crate::hex", default)]
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

    /// Whether no-execute pages are enabled (EFER.NXE, bit 11): page-table entries may then
    /// carry NX.
    pub fn nx_enabled(&self) -> bool {
        self.efer & Self::EFER_NXE != 0
    }

    /// EFER.NXE.
    pub const EFER_NXE: u64 = 1 << 11;
}

#[cfg(test)]
mod tests {
    use super::VcpuRegs;

    #[test]
    fn registers_round_trip_as_hex() {
        let mut r = VcpuRegs {
            rip: 0xffff_ffff_8100_0000,
            cr3: 0x8000_0000_0200_1000,
            cs: 0x10,
            lstar: Some(0xffff_ffff_81e0_0080),
            ..VcpuRegs::default()
        };
        r.gprs[VcpuRegs::RSP] = 0xffff_c900_0001_3f00;
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(v["rip"], "0xffffffff81000000");
        assert_eq!(v["cr3"], "0x8000000002001000");
        assert_eq!(v["gprs"][7], "0xffffc90000013f00");
        assert_eq!(v["gprs"][0], "0x0");
        assert_eq!(v["lstar"], "0xffffffff81e00080");
        assert_eq!(v["idtr_base"], serde_json::Value::Null);
        assert_eq!(v["cs"], 16);
        let back: VcpuRegs = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, r);

        // Numbers (older writers) and a missing optional MSR still read.
        let mut old = v;
        old["rip"] = serde_json::json!(0xffff_ffff_8100_0000u64);
        old.as_object_mut().unwrap().remove("lstar");
        let back: VcpuRegs = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(back, VcpuRegs { lstar: None, ..r });

        old["gprs"] = serde_json::json!(["0x1"]);
        let e = serde_json::from_value::<VcpuRegs>(old).unwrap_err();
        assert!(e.to_string().contains("expected 16 values"), "{e}");
    }
}
