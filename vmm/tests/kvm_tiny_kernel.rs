//! Tiny hand-made ELF kernels through the real boot paths (ELF 64-bit entry with a zero page;
//! PVH 32-bit entry with `hvm_start_info`): they print what the boot data says (entry kind and
//! command line) on COM1 and reset through the i8042, which ends the VM with `Reset`.

mod kvm_common;

use std::time::Duration;

use iced_x86::code_asm::*;
use kvm_common::*;
use vmm::kvm::{BootProtocol, ExitReason, SerialOut, Vm, VmConfig};

/// Prints `prefix`, then the NUL-terminated string at [esi], a newline, and resets.
fn print_and_reset(a: &mut CodeAssembler, prefix: &[u8], wide: bool) -> Result<(), IcedError> {
    let mut lp = a.create_label();
    let mut done = a.create_label();
    let mut hang = a.create_label();
    a.mov(dx, 0x3f8u32)?;
    for &b in prefix {
        a.mov(al, b as u32)?;
        a.out(dx, al)?;
    }
    a.set_label(&mut lp)?;
    if wide {
        a.mov(al, byte_ptr(rsi))?;
    } else {
        a.mov(al, byte_ptr(esi))?;
    }
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    if wide {
        a.inc(rsi)?;
    } else {
        a.inc(esi)?;
    }
    a.jmp(lp)?;
    a.set_label(&mut done)?;
    a.mov(al, b'\n' as u32)?;
    a.out(dx, al)?;
    a.mov(al, 0xfeu32)?;
    a.out(0x64u32, al)?;
    a.set_label(&mut hang)?;
    a.hlt()?;
    a.jmp(hang)
}

fn boot_tiny(code: Vec<u8>, pvh: bool, want_protocol: BootProtocol, prefix: &str) {
    require_kvm();
    let kernel = temp_path(if pvh { "tiny-pvh.elf" } else { "tiny-64.elf" });
    std::fs::write(&kernel, tiny_elf_kernel(&code, pvh)).unwrap();
    let out = temp_path(if pvh { "tiny-pvh.txt" } else { "tiny-64.txt" });
    let cmdline = format!("console=ttyS0 tiny.token={}", std::process::id());
    let mut vm = Vm::create(&VmConfig {
        kernel,
        initrd: None,
        cmdline: cmdline.clone(),
        vcpus: 2,
        memory: 128 << 20,
        serial: SerialOut::File(out.clone()),
        patch_arena: 2 << 20,
    })
    .unwrap();
    let entry = vm.boot_entry().unwrap();
    assert_eq!(entry.protocol, want_protocol);
    assert_eq!(entry.rip, TINY_KERNEL_ADDR);
    vm.start().unwrap();
    let r = vm.wait_exit_timeout(Some(Duration::from_secs(60))).unwrap();
    let console = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert_eq!(r, Some(ExitReason::Reset), "console: {console}");
    assert_eq!(console, format!("{prefix}{cmdline}\n"));
}

#[test]
fn kvm_tiny_elf_64bit_entry_gets_zero_page_and_cmdline() {
    // rsi = zero page; boot_params.hdr.cmd_line_ptr is at 0x228.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(esi, dword_ptr(rsi + 0x228)).unwrap();
    print_and_reset(&mut a, b"L64:", true).unwrap();
    let code = a.assemble(TINY_KERNEL_ADDR).unwrap();
    boot_tiny(code, false, BootProtocol::Elf64, "L64:");
}

#[test]
fn kvm_tiny_pvh_entry_gets_start_info_and_cmdline() {
    // 32-bit protected mode, ebx = hvm_start_info: check the magic, print cmdline_paddr (+24).
    let mut a = CodeAssembler::new(32).unwrap();
    let mut bad = a.create_label();
    a.cmp(dword_ptr(ebx), 0x336e_c578u32 as i32).unwrap();
    a.jne(bad).unwrap();
    a.mov(esi, dword_ptr(ebx + 24)).unwrap();
    print_and_reset(&mut a, b"PVH:", false).unwrap();
    a.set_label(&mut bad).unwrap();
    a.mov(esi, 0u32).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, b'X' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(TINY_KERNEL_ADDR).unwrap();
    boot_tiny(code, true, BootProtocol::Pvh, "PVH:");
}
