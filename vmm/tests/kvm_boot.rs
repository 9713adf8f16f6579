//! Early boot of the stock Debian kernels (6.1, 6.12; bzImage and vmlinux) under our VMM on
//! this machine's /dev/kvm, bounded in time. The guest's own console is the ground truth: it
//! must echo our command line, print an e820 map equal to the one we built (patch arena
//! reserved), detect KVM, and count the CPUs of our ACPI MADT (Debian's kernels are built
//! without MP-table parsing).

mod kvm_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_common::*;
use vmm::kvm::{SerialOut, Vm, VmConfig, E820_RAM};

fn images_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HVPATCH_IMAGES") {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").expect("HOME is not set");
    PathBuf::from(home).join(".cache/hvpatch")
}

fn image(rel: &str) -> PathBuf {
    let p = images_dir().join(rel);
    assert!(
        p.is_file(),
        "missing {}: run `cargo run -p hvpatch-guest-images -- fetch` (or set HVPATCH_IMAGES)",
        p.display()
    );
    p
}

/// Parses `BIOS-e820: [mem 0xSTART-0xEND] type` lines.
fn console_e820(console: &str) -> Vec<(u64, u64, String)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("BIOS-e820: [mem ")? + 16..];
            let (range, kind) = rest.split_once("] ")?;
            let (s, e) = range.split_once('-')?;
            let s = u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()?;
            let e = u64::from_str_radix(e.trim_start_matches("0x"), 16).ok()?;
            Some((s, e, kind.trim().to_string()))
        })
        .collect()
}

/// A named check on the console text.
type Check<'a> = &'a dyn Fn(&str) -> bool;

/// Boots run one at a time: they are CPU-bound and time-bounded.
fn serial_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn early_boot(kernel_rel: &str) {
    require_kvm();
    let _serial = serial_lock();
    let kernel = image(kernel_rel);
    let token = format!(
        "hvpatch.token={}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let cmdline = format!("console=ttyS0 earlyprintk=serial,ttyS0 {token} panic=-1");
    let console_path = temp_path(&format!("console-{}.txt", kernel_rel.replace('/', "-")));
    let cfg = VmConfig {
        kernel,
        initrd: None,
        cmdline: cmdline.clone(),
        vcpus: 2,
        memory: 512 << 20,
        serial: SerialOut::File(console_path.clone()),
        patch_arena: 2 << 20,
    };
    let t0 = Instant::now();
    let mut vm = Vm::create(&cfg).expect("create VM");
    eprintln!("{kernel_rel}: VM created in {:?}", t0.elapsed());
    let arena = vm.patch_arena().unwrap();
    assert_eq!(arena, ((510 << 20), 2 << 20));
    let want_e820: Vec<(u64, u64, String)> = vm
        .e820()
        .iter()
        .map(|e| {
            let kind = if e.kind == E820_RAM {
                "usable"
            } else {
                "reserved"
            };
            (e.addr, e.addr + e.size - 1, kind.to_string())
        })
        .collect();
    assert!(want_e820.contains(&(arena.0, arena.0 + arena.1 - 1, "reserved".into())));
    eprintln!("{kernel_rel}: boot protocol {:?}", vm.boot_entry());
    vm.start().unwrap();

    let mut seen = std::collections::BTreeMap::new();
    let checks: [(&str, Check<'_>); 5] = [
        ("first output", &|c: &str| !c.is_empty()),
        ("command line", &|c: &str| {
            c.lines()
                .any(|l| l.contains("Command line:") && l.contains(&token))
        }),
        ("e820 map", &|c: &str| console_e820(c) == want_e820),
        ("KVM detected", &|c: &str| {
            c.contains("Hypervisor detected: KVM")
        }),
        // 6.1 prints "smpboot: Allowing 2 CPUs", 6.12 "CPU topo: Allowing 2 present CPUs";
        // Debian's kernels lack CONFIG_X86_MPPARSE, so the count comes from our MADT.
        ("2 CPUs from our MADT", &|c: &str| {
            c.contains("smpboot: Allowing 2 CPUs")
                || c.contains("CPU topo: Allowing 2 present CPUs")
                || c.contains("Processor #1")
        }),
    ];
    // Measured on the 2-core emulating-KVM CI machine: all seen after 42-90 s depending on
    // load (the kernel runs ~1.5 M instr/s there); on VT-x/AMD-V hosts after ~1 s.
    // Generous: under this emulating KVM the 6.1 bzImage needs ~165 s (LZ4 decompression in
    // emulated ring 0); the bound only matters when the boot fails.
    let limit = Duration::from_secs(300);
    let mut console = String::new();
    let mut exit = None;
    let mut control = vm.control();
    let mut inspected = false;
    while t0.elapsed() < limit && seen.len() < checks.len() {
        std::thread::sleep(Duration::from_millis(100));
        console =
            String::from_utf8_lossy(&std::fs::read(&console_path).unwrap_or_default()).into_owned();
        for (name, f) in &checks {
            if !seen.contains_key(name) && f(&console) {
                seen.insert(*name, t0.elapsed());
            }
        }
        if vm.has_exited() {
            exit = Some(vm.wait_exit());
            break;
        }
        if !inspected && seen.contains_key("command line") {
            inspected = true;
            inspect_paused_kernel(&mut control, &console_path);
        }
    }
    assert!(
        inspected,
        "{kernel_rel}: never paused the booting kernel (exit {exit:?}); console:\n{console}"
    );
    let elapsed = t0.elapsed();
    vm.stop();
    let _ = vm.wait_exit_timeout(Some(Duration::from_secs(5)));
    eprintln!("{kernel_rel}: seen {seen:?} in {elapsed:?}");
    let tail: String = console
        .lines()
        .rev()
        .take(25)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    for (name, _) in &checks {
        assert!(
            seen.contains_key(name),
            "{kernel_rel}: {name} not seen within {elapsed:?} (VM exit: {exit:?}); console \
             e820 {:?} vs ours {want_e820:?}\n--- console tail ---\n{tail}",
            console_e820(&console)
        );
    }
}

/// Pauses the kernel mid-boot: vCPU 0 is in 64-bit kernel mode with the kernel's own page
/// tables and IDT, its page tables are readable, the console stays quiet while paused; then
/// resumes (the caller's later console checks prove the guest runs on).
fn inspect_paused_kernel(c: &mut vmm::kvm::KvmControl, console_path: &std::path::Path) {
    use patcher::GuestControl;
    c.pause().expect("pause the booting kernel");
    assert!(c.is_paused());
    let r = c.regs(0).unwrap();
    assert!(
        r.rip >= 0xffff_ffff_8000_0000,
        "rip {:#x} not in kernel text",
        r.rip
    );
    assert_eq!(r.cpl(), 0);
    assert_eq!(r.efer & 0x500, 0x500, "long mode");
    assert_ne!(r.cr0 & 0x8000_0000, 0, "paging");
    let idt = r.idtr_base.unwrap();
    assert!(
        idt >= 0xffff_0000_0000_0000,
        "kernel IDT expected, got {idt:#x}"
    );
    let pml4 = r.cr3 & 0x000f_ffff_ffff_f000;
    assert_ne!(pml4, 0x9000, "still on the VMM's boot page tables");
    // The top-level entry mapping the kernel image (slot 511) is present.
    let top = c.memory().read_u64(pml4 + 511 * 8).unwrap();
    assert_eq!(top & 1, 1, "PML4[511] = {top:#x}");
    let len = std::fs::metadata(console_path).unwrap().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        std::fs::metadata(console_path).unwrap().len(),
        len,
        "output while paused"
    );
    c.resume().unwrap();
    assert!(!c.is_paused());
}

#[test]
fn kvm_boot_debian_6_1_vmlinux() {
    early_boot("kernels/6.1/vmlinux");
}

#[test]
fn kvm_boot_debian_6_12_vmlinux() {
    early_boot("kernels/6.12/vmlinux");
}

#[test]
fn kvm_boot_debian_6_1_bzimage() {
    early_boot("kernels/6.1/vmlinuz");
}

#[test]
/// On this machine's emulating KVM the zstd decompressor's BMI2 code (`shlx r8d, r8d, edx`,
/// `c4 42 69 f7 c0`) stops the VM with an emulation failure ~3 s in. Hiding BMI2 from the
/// guest does not help there: that emulator answers CPUID leaf 7 with the host's own bits
/// (guest sees EBX 0x219c03ab while KVM_GET_SUPPORTED_CPUID offers 0x01800002).
#[ignore = "needs hardware virtualization: emulating KVM fails (emulation failure) on the zstd decompressor's BMI2 code (shlx) after ~3 s"]
fn kvm_boot_debian_6_12_bzimage() {
    early_boot("kernels/6.12/vmlinuz");
}

/// Full boot to the busybox shell of the test initramfs, a command over the serial line, then
/// `reboot -f`, which must end the VM with a reset (exit code 0).
#[test]
#[ignore = "needs hardware virtualization: a full boot takes minutes under emulating/nested KVM \
            (and stops with an emulation failure there); run with --ignored on VT-x/AMD-V hosts"]
fn kvm_boot_to_shell_and_run_a_command() {
    require_kvm();
    let _serial = serial_lock();
    let kernel = image("kernels/6.1/vmlinux");
    let initrd = image("initramfs.cpio.gz");
    let console_path = temp_path("console-shell.txt");
    let mut vm = Vm::create(&VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1".into(),
        vcpus: 2,
        memory: 512 << 20,
        serial: SerialOut::File(console_path.clone()),
        patch_arena: 2 << 20,
    })
    .expect("create VM");
    vm.start().unwrap();
    let console =
        || String::from_utf8_lossy(&std::fs::read(&console_path).unwrap_or_default()).into_owned();
    let ready = wait_until(Duration::from_secs(240), || {
        console().contains("hvpatch-guest: ready") || vm.has_exited()
    });
    if !ready || vm.has_exited() {
        let exit = vm.wait_exit_timeout(Some(Duration::from_secs(1)));
        panic!(
            "no 'hvpatch-guest: ready' (VM exit: {exit:?}); console:\n{}",
            console()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let input = vm.serial_input();
    assert!(input.write_all(b"echo hvpatch-$((6*7))-done\n", Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(30), || console()
            .contains("hvpatch-42-done")),
        "command output not seen; console:\n{}",
        console()
    );
    assert!(input.write_all(b"reboot -f\n", Duration::from_secs(10)));
    let r = vm
        .wait_exit_timeout(Some(Duration::from_secs(60)))
        .expect("VM error");
    assert_eq!(
        r,
        Some(vmm::kvm::ExitReason::Reset),
        "console:\n{}",
        console()
    );
    assert_eq!(r.unwrap().exit_code(), 0);
}
