//! [`Vm`]: creating a KVM VM for a Linux kernel or for raw test code, starting its vCPU
//! threads and waiting for it to end.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_pit_config, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::acpi::write_acpi;
use super::boot::e820::{build_e820, E820Entry};
use super::boot::mptable::write_mptable;
use super::boot::{load_linux, BootEntry, BootError, BootProtocol, LinuxBoot};
use super::control::KvmControl;
use super::cpuid::{supported_cpuid, to_kvm, vcpu_cpuid};
use super::devices::{Devices, SerialOut};
use super::error::VmError;
use super::layout::{
    BOOT_STACK_POINTER, COM1_IRQ, DEFAULT_ARENA_SIZE, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR,
    MAX_VCPUS, MIN_LINUX_MEMORY, MIN_RAW_MEMORY, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};
use super::memory::{arena_range, create_guest_memory, ram_regions, register_memory, KvmMemory};
use super::pause::{install_kick_handler, lock, ExitReason, Outcome, RunState, Shared, VcpuHandle};
use super::regs::{
    setup_fpu, setup_lint, setup_msrs, setup_regs, setup_sregs, write_boot_tables, EntryMode,
};
use super::vcpu::vcpu_thread;

/// Configuration of a Linux VM (`hvpatch run`).
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux (PVH entry used when the ELF has the Xen PVH note).
    pub kernel: PathBuf,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Guest RAM in bytes (at least 64 MiB plus the patch arena).
    pub memory: u64,
    /// Where COM1 output goes.
    pub serial: SerialOut,
    /// Patch-arena size in bytes (multiple of 4 KiB; 0 = none). Reserved in the e820 map.
    pub patch_arena: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory: 512 << 20,
            serial: SerialOut::Stdio,
            patch_arena: DEFAULT_ARENA_SIZE,
        }
    }
}

/// Initial state of one vCPU of a raw guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawVcpu {
    /// Entry point (identity-mapped, so virtual = physical).
    pub rip: u64,
    /// General registers in [`introspect::VcpuRegs::gprs`] order (rsp is index 7).
    pub gprs: [u64; 16],
}

/// Configuration of a VM running raw code (tests, benchmarks): every vCPU starts in 64-bit
/// mode with identity paging of the low 4 GiB, CS 0x08, DS/SS 0x10, interrupts off.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// Guest RAM in bytes (at least 1 MiB; the boot tables live below 0x10000).
    pub memory: u64,
    /// `(guest-physical address, bytes)` to copy into RAM. Keep clear of 0x500..0x10000.
    pub code: Vec<(u64, Vec<u8>)>,
    /// One entry per vCPU (1..=32).
    pub vcpus: Vec<RawVcpu>,
    /// CPU mode (only [`EntryMode::Long64`] is supported for raw guests).
    pub mode: EntryMode,
    /// Where COM1 output goes.
    pub serial: SerialOut,
    /// Patch-arena size (reserved range at the top of RAM; 0 = none).
    pub patch_arena: u64,
}

/// A KVM virtual machine.
pub struct Vm {
    shared: Arc<Shared>,
    // Keep the VM fd (and with it the irqchip, memory slots) alive as long as the VM.
    _vm: VmFd,
    _kvm: Kvm,
    threads: Vec<JoinHandle<()>>,
    e820: Vec<E820Entry>,
    boot: Option<BootEntry>,
    stdin_forward: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.shared.vcpus.len())
            .field("arena", &self.shared.arena)
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

struct Base {
    kvm: Kvm,
    vm: VmFd,
    mem: Arc<GuestMemoryMmap>,
    regions: Vec<(u64, u64)>,
    arena: Option<(u64, u64)>,
}

fn check_vcpus(n: usize) -> Result<u8, VmError> {
    if n == 0 {
        return Err(VmError::Config("at least one vCPU is needed".into()));
    }
    if n > MAX_VCPUS as usize {
        return Err(VmError::Config(format!(
            "{n} vCPUs; at most {MAX_VCPUS} are supported"
        )));
    }
    Ok(n as u8)
}

fn create_base(memory: u64, min: u64, arena: u64) -> Result<Base, VmError> {
    if !memory.is_multiple_of(4096) {
        return Err(VmError::Config(format!(
            "memory size {memory:#x} is not a multiple of 4 KiB"
        )));
    }
    if memory < min + arena {
        return Err(VmError::Config(format!(
            "memory too small: {} MiB given, at least {} MiB needed (including a {} KiB patch arena)",
            memory >> 20,
            (min + arena).div_ceil(1 << 20),
            arena >> 10
        )));
    }
    if memory > (1u64 << 40) {
        return Err(VmError::Config(format!(
            "memory too large: {} GiB",
            memory >> 30
        )));
    }
    let regions = ram_regions(memory);
    let arena = arena_range(arena, &regions)?;
    install_kick_handler()?;
    let kvm = Kvm::new().map_err(VmError::NoKvm)?;
    let vm = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(VmError::kvm("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(VmError::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(VmError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(VmError::kvm("KVM_CREATE_PIT2"))?;
    let mem = Arc::new(create_guest_memory(&regions)?);
    register_memory(&vm, &mem)?;
    Ok(Base {
        kvm,
        vm,
        mem,
        regions,
        arena,
    })
}

fn create_vcpu(base: &Base, id: u8, count: u8) -> Result<VcpuFd, VmError> {
    let fd = base
        .vm
        .create_vcpu(u64::from(id))
        .map_err(VmError::kvm("KVM_CREATE_VCPU"))?;
    let cpuid = vcpu_cpuid(&supported_cpuid(&base.kvm)?, id, count);
    fd.set_cpuid2(&to_kvm(&cpuid)?)
        .map_err(VmError::kvm("KVM_SET_CPUID2"))?;
    setup_msrs(&fd)?;
    setup_fpu(&fd)?;
    setup_lint(&fd)?;
    Ok(fd)
}

fn finish(
    base: Base,
    vcpus: Vec<VcpuFd>,
    serial: &SerialOut,
    e820: Vec<E820Entry>,
    boot: Option<BootEntry>,
) -> Result<Vm, VmError> {
    let (devices, serial_irq) = Devices::new(serial)?;
    base.vm
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(VmError::kvm("KVM_IRQFD"))?;
    // The irqfd holds its own reference to the eventfd; the device keeps the other end.
    drop(serial_irq);
    let shared = Arc::new(Shared {
        state: Mutex::new(RunState::default()),
        cond: Condvar::new(),
        vcpus: vcpus.into_iter().map(VcpuHandle::new).collect(),
        devices: Mutex::new(devices),
        mem: base.mem,
        arena: base.arena,
    });
    Ok(Vm {
        shared,
        _vm: base.vm,
        _kvm: base.kvm,
        threads: Vec::new(),
        e820,
        boot,
        stdin_forward: *serial == SerialOut::Stdio,
    })
}

impl Vm {
    /// Creates a VM that boots a Linux kernel. Nothing runs until [`Vm::start`].
    pub fn create(cfg: &VmConfig) -> Result<Vm, VmError> {
        let count = check_vcpus(cfg.vcpus as usize)?;
        if !cfg.kernel.is_file() {
            return Err(BootError::KernelFile {
                path: cfg.kernel.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            }
            .into());
        }
        super::boot::make_cmdline(&cfg.cmdline)?;
        let base = create_base(cfg.memory, MIN_LINUX_MEMORY, cfg.patch_arena)?;
        let e820 = build_e820(&base.regions, base.arena);
        let rsdp = write_acpi(&base.mem, count)?;
        let boot = load_linux(
            &base.mem,
            &LinuxBoot {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cfg.cmdline,
                e820: &e820,
                rsdp,
            },
        )?;
        write_mptable(&base.mem, count)?;
        let mode = match boot.protocol {
            BootProtocol::Pvh => EntryMode::Protected32,
            BootProtocol::BzImage64 | BootProtocol::Elf64 => EntryMode::Long64,
        };
        let cr3 = write_boot_tables(&base.mem, mode)?;
        let mut vcpus = Vec::new();
        for id in 0..count {
            let fd = create_vcpu(&base, id, count)?;
            if id == 0 {
                let mut gprs = [0u64; 16];
                match boot.protocol {
                    BootProtocol::Pvh => gprs[1] = PVH_INFO_ADDR,
                    _ => {
                        gprs[4] = ZERO_PAGE_ADDR;
                        gprs[6] = BOOT_STACK_POINTER;
                        gprs[7] = BOOT_STACK_POINTER;
                    }
                }
                setup_sregs(&fd, mode, cr3)?;
                setup_regs(&fd, boot.rip, &gprs)?;
            }
            vcpus.push(fd);
        }
        finish(base, vcpus, &cfg.serial, e820, Some(boot))
    }

    /// Creates a VM that runs raw code on every vCPU (see [`RawConfig`]).
    pub fn create_raw(cfg: &RawConfig) -> Result<Vm, VmError> {
        let count = check_vcpus(cfg.vcpus.len())?;
        if cfg.mode != EntryMode::Long64 {
            return Err(VmError::Config(
                "raw guests start in 64-bit mode only".into(),
            ));
        }
        let base = create_base(cfg.memory, MIN_RAW_MEMORY, cfg.patch_arena)?;
        let e820 = build_e820(&base.regions, base.arena);
        let cr3 = write_boot_tables(&base.mem, cfg.mode)?;
        for (gpa, bytes) in &cfg.code {
            base.mem
                .write_slice(bytes, GuestAddress(*gpa))
                .map_err(|e| {
                    VmError::Memory(format!("raw code at {gpa:#x}+{:#x}: {e}", bytes.len()))
                })?;
        }
        let mut vcpus = Vec::new();
        for (id, v) in cfg.vcpus.iter().enumerate() {
            let fd = create_vcpu(&base, id as u8, count)?;
            setup_sregs(&fd, cfg.mode, cr3)?;
            setup_regs(&fd, v.rip, &v.gprs)?;
            // With the in-kernel LAPIC, APs wait for INIT/SIPI; raw APs start right away.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(VmError::kvm("KVM_SET_MP_STATE"))?;
            vcpus.push(fd);
        }
        finish(base, vcpus, &cfg.serial, e820, None)
    }

    /// Starts one thread per vCPU (and, for [`SerialOut::Stdio`], a stdin→COM1 thread).
    pub fn start(&mut self) -> Result<(), VmError> {
        {
            let mut st = self.shared.state();
            if st.started {
                return Err(VmError::State("the VM was already started"));
            }
            st.started = true;
            st.running = self.shared.vcpus.len();
        }
        for i in 0..self.shared.vcpus.len() {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(shared, i));
            match spawned {
                Ok(h) => self.threads.push(h),
                Err(e) => {
                    let err = VmError::Host(format!("cannot spawn vCPU thread: {e}"));
                    let mut st = self.shared.state();
                    st.running -= self.shared.vcpus.len() - i;
                    drop(st);
                    self.shared.finish(Outcome::Exit(ExitReason::Stopped));
                    return Err(err);
                }
            }
        }
        if self.stdin_forward {
            let input = self.serial_input();
            // Detached: blocks on stdin; ends with the process.
            let _ = std::thread::Builder::new()
                .name("serial-stdin".into())
                .spawn(move || {
                    let mut buf = [0u8; 64];
                    let mut stdin = std::io::stdin();
                    while let Ok(n) = stdin.read(&mut buf) {
                        if n == 0 || !input.write_all(&buf[..n], Duration::from_secs(3600)) {
                            break;
                        }
                    }
                });
        }
        Ok(())
    }

    /// A controller for this VM (pause, registers, memory, breakpoints, events).
    pub fn control(&self) -> KvmControl {
        KvmControl::new(self.shared.clone())
    }

    /// Guest memory.
    pub fn memory(&self) -> KvmMemory {
        KvmMemory::new(self.shared.mem.clone())
    }

    /// The e820 map handed to the guest.
    pub fn e820(&self) -> &[E820Entry] {
        &self.e820
    }

    /// The patch arena `(start, len)`.
    pub fn patch_arena(&self) -> Option<(u64, u64)> {
        self.shared.arena
    }

    /// How the kernel is entered (None for raw guests).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.boot
    }

    /// A handle that feeds bytes to the guest's COM1 input.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput {
            shared: self.shared.clone(),
        }
    }

    /// Stops the VM from the host side (vCPU threads end; [`Vm::wait_exit`] then returns
    /// [`ExitReason::Stopped`] unless the guest ended first).
    pub fn stop(&self) {
        self.shared.finish(Outcome::Exit(ExitReason::Stopped));
    }

    /// Whether the VM has ended (guest exit, error or stop).
    pub fn has_exited(&self) -> bool {
        self.shared.state().outcome.is_some()
    }

    /// Waits for the VM to end and joins its vCPU threads. Guest reset/shutdown and host stop
    /// are `Ok`; a KVM internal error (emulation failure) or failed entry is an `Err`.
    pub fn wait_exit(&mut self) -> Result<ExitReason, VmError> {
        self.wait_exit_timeout(None)?
            .ok_or(VmError::State("unreachable: no timeout"))
    }

    /// Like [`Vm::wait_exit`] but gives up after `timeout` with `Ok(None)` (the VM keeps
    /// running).
    pub fn wait_exit_timeout(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitReason>, VmError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.shared.state();
        if !st.started {
            return Err(VmError::State("the VM was not started"));
        }
        while st.outcome.is_none() || st.running > 0 {
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    d - now
                }
                None => Duration::from_secs(1),
            };
            st = self
                .shared
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let outcome = st.outcome.take();
        // Keep the VM marked as ended for controllers.
        st.outcome = Some(Outcome::Exit(ExitReason::Stopped));
        drop(st);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        match outcome {
            Some(Outcome::Exit(r)) => Ok(Some(r)),
            Some(Outcome::Error(e)) => Err(e),
            None => Err(VmError::State("the VM ended without an outcome")),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.finish(Outcome::Exit(ExitReason::Stopped));
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// Feeds bytes into the guest's COM1 receive FIFO.
#[derive(Clone)]
pub struct SerialInput {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialInput")
    }
}

impl SerialInput {
    /// Queues all of `bytes`, waiting while the 64-byte FIFO is full. Returns false if the
    /// VM ended or `timeout` passed first.
    pub fn write_all(&self, mut bytes: &[u8], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !bytes.is_empty() {
            if self.shared.state().outcome.is_some() || Instant::now() >= deadline {
                return false;
            }
            let n = lock(&self.shared.devices).serial_input(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        true
    }
}
