//! Helpers shared by the KVM tests: raw-guest assembly and prerequisites.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use iced_x86::code_asm::CodeAssembler;
use iced_x86::BlockEncoderOptions;

/// Fails (never skips) when /dev/kvm is not usable.
pub fn require_kvm() {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = f {
        panic!(
            "/dev/kvm is not usable ({e}): these tests need KVM. Enable hardware virtualization \
             (or nested virtualization), load kvm_intel/kvm_amd and make /dev/kvm read-writable"
        );
    }
}

/// Where raw test code goes.
pub const CODE_BASE: u64 = 0x10_0000;
/// Data area of raw tests.
pub const DATA_BASE: u64 = 0x20_0000;

/// Assembled code with label addresses.
pub struct Asm {
    pub bytes: Vec<u8>,
    pub base: u64,
}

/// Assembles `f`'s instructions at `base`; returns bytes and the addresses of `labels`.
pub fn assemble(
    base: u64,
    f: impl FnOnce(
        &mut CodeAssembler,
    ) -> Result<Vec<iced_x86::code_asm::CodeLabel>, iced_x86::IcedError>,
) -> (Vec<u8>, Vec<u64>) {
    let mut a = CodeAssembler::new(64).unwrap();
    let labels = f(&mut a).unwrap();
    let r = a
        .assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let addrs = labels.iter().map(|l| r.label_ip(l).unwrap()).collect();
    (r.inner.code_buffer, addrs)
}

/// A raw 64-bit guest of `memory` bytes with `code` copied in and `vcpus`; serial output is
/// dropped and no patch arena is reserved (override fields with `..raw_config(..)`).
pub fn raw_config(
    memory: u64,
    code: Vec<(u64, Vec<u8>)>,
    vcpus: Vec<vmm::kvm::RawVcpu>,
) -> vmm::kvm::RawConfig {
    vmm::kvm::RawConfig {
        memory,
        code,
        vcpus,
        mode: vmm::kvm::EntryMode::Long64,
        serial: vmm::kvm::SerialOut::Null,
        patch_arena: 0,
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// A fresh temporary file path.
pub fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvpatch-kvm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Physical load address of the tiny test kernels (like vmlinux's 16 MiB).
pub const TINY_KERNEL_ADDR: u64 = 0x100_0000;

/// A minimal x86-64 ELF "kernel": one PT_LOAD of `code` at [`TINY_KERNEL_ADDR`] (entry there)
/// and, with `pvh`, a PT_NOTE carrying the Xen PVH 32-bit entry (also the start of `code`).
pub fn tiny_elf_kernel(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off = 0x1000u64;
    let note_off = 64 + 56 * u64::from(phnum);
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&TINY_KERNEL_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, phnum, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [off, addr, addr, size, size, 4] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, code_off, TINY_KERNEL_ADDR, code.len() as u64);
    if pvh {
        phdr(&mut f, 4, note_off, 0, 20);
        f.extend_from_slice(&4u32.to_le_bytes()); // namesz
        f.extend_from_slice(&4u32.to_le_bytes()); // descsz
        f.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&(TINY_KERNEL_ADDR as u32).to_le_bytes());
    }
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

/// Where a patchable assembled guest's "kernel image" is linked, as in Linux.
pub const KTEXT: u64 = 0xffff_ffff_8100_0000;
/// Where that image lives physically (one 2 MiB page).
pub const KTEXT_PA: u64 = 0x20_0000;

/// A raw guest with `code` (assembled at [`KTEXT`]) mapped in the kernel half like a Linux
/// image: PML4[511] -> PDPT[510] -> PD[8] = the 2 MiB page at [`KTEXT_PA`]; the next 2 MiB slot
/// stays empty for the patch arena. One vCPU starts at `rip`; a 2 MiB arena is reserved.
pub fn kernel_half_guest(
    code: Vec<u8>,
    rip: u64,
    serial: vmm::kvm::SerialOut,
) -> vmm::kvm::RawConfig {
    const PML4: u64 = vmm::kvm::layout::PML4_ADDR;
    const PDPT_HI: u64 = 0x30_0000;
    const PD_HI: u64 = 0x30_1000;
    let entry = |pa: u64, flags: u64| (pa | flags).to_le_bytes().to_vec();
    let mut pdpt = vec![0u8; 4096];
    pdpt[510 * 8..511 * 8].copy_from_slice(&entry(PD_HI, 0x3));
    let mut pd = vec![0u8; 4096];
    pd[8 * 8..9 * 8].copy_from_slice(&entry(KTEXT_PA, 0x83));
    let mut gprs = [0u64; 16];
    gprs[7] = 0x8_0000;
    vmm::kvm::RawConfig {
        memory: 64 << 20,
        code: vec![
            (KTEXT_PA, code),
            (PDPT_HI, pdpt),
            (PD_HI, pd),
            (PML4 + 511 * 8, entry(PDPT_HI, 0x3)),
        ],
        vcpus: vec![vmm::kvm::RawVcpu { rip, gprs }],
        mode: vmm::kvm::EntryMode::Long64,
        serial,
        patch_arena: 2 << 20,
    }
}

/// The kernel paging root of a raw guest: CR3's address bits as they are (no PTI pair, so
/// bit 12 is an address bit — `KernelPaging::from_regs` would clear it).
pub fn raw_paging(regs: &introspect::VcpuRegs) -> patcher::KernelPaging {
    patcher::KernelPaging {
        pgd_pa: regs.cr3 & 0x000f_ffff_ffff_f000,
        la57: regs.la57(),
        nx: regs.nx_enabled(),
    }
}
