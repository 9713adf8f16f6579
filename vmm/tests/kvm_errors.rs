//! Invalid VM configurations give clear typed errors (and never start anything).

mod kvm_common;

use kvm_common::*;
use vmm::kvm::boot::BootError;
use vmm::kvm::devices::DeviceError;
use vmm::kvm::{RawConfig, RawVcpu, SerialOut, Vm, VmConfig, VmError};

fn kernel_cfg(kernel: std::path::PathBuf) -> VmConfig {
    VmConfig {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        memory: 256 << 20,
        serial: SerialOut::Null,
        patch_arena: 2 << 20,
    }
}

fn not_a_kernel_file() -> std::path::PathBuf {
    let p = temp_path("not-a-kernel.txt");
    std::fs::write(&p, b"this is a text file, not a kernel\n".repeat(100)).unwrap();
    p
}

#[test]
fn kvm_error_missing_kernel() {
    let e = Vm::create(&kernel_cfg("/nonexistent/vmlinuz".into())).unwrap_err();
    assert!(
        matches!(e, VmError::Boot(BootError::KernelFile { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
}

#[test]
fn kvm_error_not_a_kernel() {
    require_kvm();
    let e = Vm::create(&kernel_cfg(not_a_kernel_file())).unwrap_err();
    assert!(
        matches!(e, VmError::Boot(BootError::NotAKernel { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("is not a kernel"), "{e}");
}

#[test]
fn kvm_error_memory_too_small() {
    let mut cfg = kernel_cfg(not_a_kernel_file());
    cfg.memory = 16 << 20;
    let e = Vm::create(&cfg).unwrap_err();
    assert!(
        matches!(&e, VmError::Config(m) if m.contains("memory too small")),
        "{e}"
    );
    cfg.memory = (256 << 20) + 1;
    assert!(matches!(Vm::create(&cfg).unwrap_err(), VmError::Config(_)));
    cfg.memory = 256 << 20;
    cfg.patch_arena = 12345;
    assert!(matches!(Vm::create(&cfg).unwrap_err(), VmError::Config(_)));
}

#[test]
fn kvm_error_bad_cmdline() {
    let mut cfg = kernel_cfg(not_a_kernel_file());
    cfg.cmdline = "x".repeat(4096);
    let e = Vm::create(&cfg).unwrap_err();
    assert!(matches!(e, VmError::Boot(BootError::Cmdline(_))), "{e}");
    assert!(e.to_string().contains("at most 2047"), "{e}");
    cfg.cmdline = "console=ttyS0\nfoo".into();
    assert!(matches!(
        Vm::create(&cfg).unwrap_err(),
        VmError::Boot(BootError::Cmdline(_))
    ));
}

#[test]
fn kvm_error_zero_vcpus() {
    let mut cfg = kernel_cfg(not_a_kernel_file());
    cfg.vcpus = 0;
    let e = Vm::create(&cfg).unwrap_err();
    assert!(
        matches!(&e, VmError::Config(m) if m.contains("at least one vCPU")),
        "{e}"
    );
    cfg.vcpus = 33;
    assert!(matches!(Vm::create(&cfg).unwrap_err(), VmError::Config(_)));
    let raw = raw_config(4 << 20, vec![], vec![]);
    assert!(matches!(
        Vm::create_raw(&raw).unwrap_err(),
        VmError::Config(_)
    ));
}

#[test]
fn kvm_error_raw_code_outside_ram() {
    require_kvm();
    let raw = raw_config(
        4 << 20,
        vec![(8 << 20, vec![0x90])],
        vec![RawVcpu::default()],
    );
    assert!(matches!(
        Vm::create_raw(&raw).unwrap_err(),
        VmError::Memory(_)
    ));
}

#[test]
fn kvm_error_serial_file_unwritable() {
    require_kvm();
    let raw = RawConfig {
        serial: SerialOut::File("/nonexistent-dir/serial.txt".into()),
        ..raw_config(4 << 20, vec![], vec![RawVcpu::default()])
    };
    assert!(matches!(
        Vm::create_raw(&raw).unwrap_err(),
        VmError::Device(DeviceError::Serial { .. })
    ));
}

#[test]
fn kvm_wait_before_start_is_an_error() {
    require_kvm();
    let mut vm = Vm::create_raw(&raw_config(4 << 20, vec![], vec![RawVcpu::default()])).unwrap();
    assert!(matches!(vm.wait_exit().unwrap_err(), VmError::State(_)));
    let mut c = vm.control();
    assert!(patcher::GuestControl::pause(&mut c).is_err());
}
