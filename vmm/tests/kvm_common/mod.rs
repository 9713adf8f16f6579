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
