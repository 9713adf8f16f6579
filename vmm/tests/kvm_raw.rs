//! Raw guests on this machine's /dev/kvm: pause/resume, registers, memory writes, hardware
//! breakpoints, serial output, i8042 reset, emulation-failure reporting.

mod kvm_common;

use std::time::Duration;

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use kvm_common::*;
use patcher::{GuestControl, GuestEvent};
use vmm::kvm::{ExitReason, RawConfig, RawVcpu, SerialOut, Vm, VmError};

/// Guest-physical address of vCPU `i`'s counter (each on its own cache line).
fn counter_addr(i: usize) -> u64 {
    DATA_BASE + i as u64 * 64
}

/// A vCPU entering at `rip` with vCPU 0's stack and all other registers zero.
fn vcpu(rip: u64) -> RawVcpu {
    let mut gprs = [0u64; 16];
    gprs[7] = 0x8_0000;
    RawVcpu { rip, gprs }
}

/// vCPU `i` entering at `rip` with rdi = its counter and its own stack below vCPU 0's.
fn counter_vcpu(rip: u64, i: usize) -> RawVcpu {
    let mut v = vcpu(rip);
    v.gprs[5] = counter_addr(i);
    v.gprs[7] -= i as u64 * 0x1000;
    v
}

/// One vCPU per entry of `rips`, each with rdi = its own counter (see [`counter_vcpu`]).
fn counter_vcpus_at(rips: &[u64]) -> Vec<RawVcpu> {
    rips.iter()
        .enumerate()
        .map(|(i, &rip)| counter_vcpu(rip, i))
        .collect()
}

/// `n` vCPUs entering at [`CODE_BASE`], each with rdi = its own counter.
fn counter_vcpus(n: usize) -> Vec<RawVcpu> {
    counter_vcpus_at(&vec![CODE_BASE; n])
}

/// Creates the raw VM and starts its vCPUs.
fn start(cfg: &RawConfig) -> Vm {
    let mut vm = Vm::create_raw(cfg).expect("create raw VM");
    vm.start().unwrap();
    vm
}

/// Starts an 8 MiB guest with `code` at [`CODE_BASE`] and `vcpus`.
fn start_code(code: Vec<u8>, vcpus: Vec<RawVcpu>) -> Vm {
    start(&raw_config(8 << 20, vec![(CODE_BASE, code)], vcpus))
}

/// Stops the VM and returns how it ended.
fn stop(vm: &mut Vm) -> ExitReason {
    vm.stop();
    vm.wait_exit().unwrap()
}

/// Emits `l: inc qword [rdi]; jmp l` (count forever) and returns `l`.
fn counter_loop(a: &mut CodeAssembler) -> Result<CodeLabel, IcedError> {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.inc(qword_ptr(rdi))?;
    a.jmp(l)?;
    Ok(l)
}

/// Emits `l: pause; jmp l` and returns `l`.
fn pause_loop(a: &mut CodeAssembler) -> Result<CodeLabel, IcedError> {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.pause()?;
    a.jmp(l)?;
    Ok(l)
}

/// The guest's u32 at physical `addr`.
fn phys_u32(c: &impl GuestControl, addr: u64) -> u32 {
    c.memory().read_u32(addr).unwrap()
}

/// The guest's u64 at physical `addr`.
fn phys_u64(c: &impl GuestControl, addr: u64) -> u64 {
    c.memory().read_u64(addr).unwrap()
}

fn counters(c: &impl GuestControl, n: usize) -> Vec<u64> {
    (0..n).map(|i| phys_u64(c, counter_addr(i))).collect()
}

/// Asserts that within `timeout` each of the first `n` counters exceeds `min`.
fn wait_counters_above(c: &impl GuestControl, n: usize, min: u64, timeout: Duration) {
    assert!(
        wait_until(timeout, || counters(c, n).iter().all(|&v| v > min)),
        "counters did not pass {min}: {:?}",
        counters(c, n)
    );
}

fn pause_resume(n: usize) {
    require_kvm();
    // Every vCPU runs `inc qword [rdi]; jmp` with rdi = its own counter.
    let (code, _) = assemble(CODE_BASE, |a| {
        counter_loop(a)?;
        Ok(vec![])
    });
    let mut vm = start(&RawConfig {
        patch_arena: 2 << 20,
        ..raw_config(16 << 20, vec![(CODE_BASE, code)], counter_vcpus(n))
    });
    let mut c = vm.control();
    assert_eq!(c.vcpu_count(), n);
    wait_counters_above(&c, n, 1000, Duration::from_secs(20));
    for round in 0..3 {
        c.pause().unwrap();
        assert!(c.is_paused());
        let a = counters(&c, n);
        std::thread::sleep(Duration::from_millis(100));
        let b = counters(&c, n);
        assert_eq!(a, b, "round {round}: counters moved while paused");
        c.resume().unwrap();
        assert!(!c.is_paused());
        assert!(
            wait_until(Duration::from_secs(20), || {
                counters(&c, n).iter().zip(&b).all(|(x, y)| x > y)
            }),
            "round {round}: counters did not move after resume: {b:?} -> {:?}",
            counters(&c, n)
        );
    }
    assert_eq!(stop(&mut vm), ExitReason::Stopped);
    assert!(c.pause().is_err(), "pausing a stopped VM must fail");
}

#[test]
fn kvm_pause_resume_1_vcpu() {
    pause_resume(1);
}

#[test]
fn kvm_pause_resume_2_vcpus() {
    pause_resume(2);
}

#[test]
fn kvm_pause_resume_4_vcpus() {
    pause_resume(4);
}

#[test]
fn kvm_registers_read_back_as_set() {
    require_kvm();
    let (code, labels) = assemble(CODE_BASE, |a| Ok(vec![pause_loop(a)?]));
    let vcpus: Vec<RawVcpu> = (0..2u64)
        .map(|v| {
            let mut gprs = [0u64; 16];
            for (i, g) in gprs.iter_mut().enumerate() {
                *g = 0x1111_0000_0000_0000 * (v + 1) + i as u64 * 0x101;
            }
            gprs[7] = 0x7_0000 + v * 0x1000;
            RawVcpu {
                rip: CODE_BASE,
                gprs,
            }
        })
        .collect();
    let mut vm = start_code(code, vcpus.clone());
    let mut c = vm.control();
    assert!(matches!(c.regs(0), Err(patcher::GuestError::NotPaused)));
    std::thread::sleep(Duration::from_millis(50));
    c.pause().unwrap();
    for (i, want) in vcpus.iter().enumerate() {
        let r = c.regs(i).unwrap();
        assert_eq!(r.gprs, want.gprs, "vCPU {i} gprs");
        assert!(
            r.rip == labels[0] || r.rip == labels[0] + 2,
            "vCPU {i} rip {:#x}",
            r.rip
        );
        assert_eq!(r.cs, 0x08);
        assert_eq!(r.ss, 0x10);
        assert_eq!(r.cr3, 0x9000);
        assert_ne!(r.cr0 & 0x8000_0001, 0, "paging + protection on");
        assert_eq!(r.efer & 0x500, 0x500, "LME|LMA");
        assert_eq!(r.cr4 & 0x20, 0x20, "PAE");
        assert_eq!(r.lstar, Some(0));
        assert_eq!(r.idtr_base, Some(0x520));
        assert_eq!(r.kernel_gs_base, 0);
    }
    assert!(matches!(c.regs(2), Err(patcher::GuestError::NoSuchVcpu(2))));
    c.resume().unwrap();
    stop(&mut vm);
}

#[test]
fn kvm_write_while_paused_is_seen_after_resume() {
    require_kvm();
    const SRC: u64 = DATA_BASE;
    const DST: u64 = DATA_BASE + 0x100;
    const DST2: u64 = DATA_BASE + 0x200;
    // Loop: copy [SRC] to [DST]; store an immediate (patched below) to [DST2].
    let (code, labels) = assemble(CODE_BASE, |a| {
        let mut top = a.create_label();
        let mut imm = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(SRC))?;
        a.mov(qword_ptr(DST), rax)?;
        a.set_label(&mut imm)?;
        a.mov(ecx, 0x1111_1111u32)?;
        a.mov(dword_ptr(DST2), ecx)?;
        a.jmp(top)?;
        Ok(vec![top, imm])
    });
    let mut vm = start_code(code.clone(), vec![vcpu(CODE_BASE)]);
    let mut c = vm.control();
    assert!(wait_until(Duration::from_secs(10), || phys_u32(&c, DST2)
        == 0x1111_1111));
    c.pause().unwrap();
    c.write_phys(SRC, &0xfeed_face_cafe_beefu64.to_le_bytes())
        .unwrap();
    // Patch the immediate of `mov ecx, imm32` (opcode b9, imm at +1).
    let imm_off = (labels[1] - CODE_BASE) as usize;
    assert_eq!(code[imm_off], 0xb9);
    c.write_phys(labels[1] + 1, &0x2222_2222u32.to_le_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(phys_u64(&c, DST), 0, "guest ran while paused");
    assert!(c.write_phys(0xffff_ffff_0000, &[1]).is_err());
    c.resume().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || phys_u64(&c, DST)
            == 0xfeed_face_cafe_beef),
        "data write not seen by the guest"
    );
    assert!(
        wait_until(Duration::from_secs(10), || phys_u32(&c, DST2)
            == 0x2222_2222),
        "code write not seen by the guest's instruction fetch"
    );
    stop(&mut vm);
}

#[test]
fn kvm_hardware_breakpoint_stops_the_vcpu_that_hit_it() {
    require_kvm();
    // vCPU 0 spins on its counter; vCPU 1 runs a loop with a distinct instruction at `bp`.
    let (code, labels) = assemble(CODE_BASE, |a| {
        let spin = counter_loop(a)?;
        let mut other = a.create_label();
        let mut brk = a.create_label();
        a.set_label(&mut other)?;
        a.inc(qword_ptr(rdi))?;
        a.set_label(&mut brk)?;
        a.add(qword_ptr(rdi + 8), 1)?;
        a.jmp(other)?;
        Ok(vec![spin, other, brk])
    });
    let mut vm = start_code(code, counter_vcpus_at(&labels[..2]));
    let mut c = vm.control();
    wait_counters_above(&c, 2, 100, Duration::from_secs(10));
    assert!(matches!(
        c.set_breakpoints(&[1, 2, 3, 4, 5]),
        Err(patcher::GuestError::TooManyBreakpoints(5))
    ));
    c.set_breakpoints(&[labels[2]]).unwrap();
    let hit = Some(GuestEvent::Breakpoint {
        vcpu: 1,
        rip: labels[2],
    });
    assert_eq!(c.wait_event(Duration::from_secs(20)).unwrap(), hit);
    assert!(c.is_paused(), "a breakpoint pauses all vCPUs");
    let r = c.regs(1).unwrap();
    assert_eq!(r.rip, labels[2]);
    let a = counters(&c, 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(a, counters(&c, 2));
    // `wait_event` never resumes: a paused guest is an error.
    assert!(matches!(
        c.wait_event(Duration::from_millis(10)),
        Err(patcher::GuestError::Paused)
    ));
    // Hit it again: resuming steps over the breakpoint and the loop comes back to it.
    c.resume().unwrap();
    assert_eq!(c.wait_event(Duration::from_secs(20)).unwrap(), hit);
    let before = counters(&c, 2);
    assert_eq!(
        before[1],
        a[1] + 1,
        "exactly one loop iteration between two hits"
    );
    c.set_breakpoints(&[]).unwrap();
    c.resume().unwrap();
    assert_eq!(c.wait_event(Duration::from_millis(300)).unwrap(), None);
    // No breakpoint any more: both vCPUs keep running.
    assert!(
        wait_until(Duration::from_secs(20), || {
            let after = counters(&c, 2);
            after[1] > before[1] + 10 && after[0] > before[0] + 10
        }),
        "{before:?} -> {:?}",
        counters(&c, 2)
    );
    stop(&mut vm);
}

/// Emits `l: inc qword [rdi]; b: add qword [rdi+8], 1; j: jmp l` and returns `[l, b, j]`.
fn three_step_loop(a: &mut CodeAssembler) -> Result<Vec<CodeLabel>, IcedError> {
    let mut l = a.create_label();
    let mut b = a.create_label();
    let mut j = a.create_label();
    a.set_label(&mut l)?;
    a.inc(qword_ptr(rdi))?;
    a.set_label(&mut b)?;
    a.add(qword_ptr(rdi + 8), 1)?;
    a.set_label(&mut j)?;
    a.jmp(l)?;
    Ok(vec![l, b, j])
}

#[test]
fn kvm_per_vcpu_breakpoint_stops_only_that_vcpu() {
    require_kvm();
    // Both vCPUs run the same loop (own counters); only vCPU 1 gets the breakpoint.
    let (code, labels) = assemble(CODE_BASE, three_step_loop);
    let mut vm = start_code(code, counter_vcpus_at(&[labels[0], labels[0]]));
    let mut c = vm.control();
    wait_counters_above(&c, 2, 100, Duration::from_secs(10));
    assert!(matches!(
        c.set_vcpu_breakpoints(2, &[labels[1]]),
        Err(patcher::GuestError::NoSuchVcpu(2))
    ));
    assert!(matches!(
        c.set_vcpu_breakpoints(0, &[1, 2, 3, 4, 5]),
        Err(patcher::GuestError::TooManyBreakpoints(5))
    ));
    c.set_vcpu_breakpoints(1, &[labels[1]]).unwrap();
    let hit1 = Some(GuestEvent::Breakpoint {
        vcpu: 1,
        rip: labels[1],
    });
    let first = counters(&c, 2);
    let mut last = first.clone();
    let t = std::time::Instant::now();
    let mut round = 0;
    // Until vCPU 0 has looped through the same address 100 times: every hit is vCPU 1's,
    // and vCPU 1 does exactly one loop per hit.
    while round < 5 || counters(&c, 2)[0] < first[0] + 100 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "vCPU 0 did not run past vCPU 1's breakpoint: {first:?} -> {:?}",
            counters(&c, 2)
        );
        assert_eq!(
            c.wait_event(Duration::from_secs(20)).unwrap(),
            hit1,
            "round {round}"
        );
        assert!(c.is_paused());
        assert_eq!(c.regs(1).unwrap().rip, labels[1]);
        let now = counters(&c, 2);
        if round > 0 {
            assert_eq!(
                now[1],
                last[1] + 1,
                "round {round}: vCPU 1 ran past its breakpoint"
            );
        }
        last = now;
        round += 1;
        c.resume().unwrap();
    }
    // Now vCPU 0 gets it too, and vCPU 1's is cleared: only vCPU 0 stops. Changed while
    // paused; a hit of vCPU 1 queued after the last resume is dropped.
    c.pause().unwrap();
    c.set_vcpu_breakpoints(0, &[labels[1]]).unwrap();
    c.set_vcpu_breakpoints(1, &[]).unwrap();
    while let Ok(Some(ev)) = c.wait_event(Duration::ZERO) {
        assert_eq!(Some(ev), hit1, "only vCPU 1's hits can be queued");
    }
    c.resume().unwrap();
    let hit0 = Some(GuestEvent::Breakpoint {
        vcpu: 0,
        rip: labels[1],
    });
    for round in 0..3 {
        let ev = c.wait_event(Duration::from_secs(20)).unwrap();
        assert_eq!(ev, hit0, "round {round}");
        c.resume().unwrap();
    }
    // Cleared while paused (a hit after the last resume would keep the VM paused).
    c.pause().unwrap();
    c.set_breakpoints(&[]).unwrap();
    while let Ok(Some(ev)) = c.wait_event(Duration::ZERO) {
        assert_eq!(Some(ev), hit0);
    }
    c.resume().unwrap();
    let before = counters(&c, 2);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let after = counters(&c, 2);
            after[0] > before[0] + 10 && after[1] > before[1] + 10
        }),
        "{before:?} -> {:?}",
        counters(&c, 2)
    );
    stop(&mut vm);
}

#[test]
fn kvm_single_step_runs_one_instruction_of_one_vcpu() {
    require_kvm();
    let (code, labels) = assemble(CODE_BASE, three_step_loop);
    let mut vm = start_code(code, counter_vcpus_at(&[labels[0], labels[0]]));
    let mut c = vm.control();
    wait_counters_above(&c, 2, 100, Duration::from_secs(10));
    assert!(matches!(
        c.single_step(0),
        Err(patcher::GuestError::NotPaused)
    ));
    // A breakpoint on vCPU 0's next instruction must not stop the step.
    c.set_vcpu_breakpoints(0, &[labels[2]]).unwrap();
    c.pause().unwrap();
    assert!(matches!(
        c.single_step(2),
        Err(patcher::GuestError::NoSuchVcpu(2))
    ));
    let other = c.regs(1).unwrap();
    let start_rip = c.regs(0).unwrap().rip;
    let mut at = labels
        .iter()
        .position(|&l| l == start_rip)
        .unwrap_or_else(|| panic!("vCPU 0 paused at {start_rip:#x}, not in {labels:x?}"));
    for step in 0..7 {
        let before = counters(&c, 2);
        let before_add = phys_u64(&c, counter_addr(0) + 8);
        let r = c.single_step(0).unwrap();
        assert!(c.is_paused(), "step {step}: the guest stays paused");
        let next = (at + 1) % 3;
        assert_eq!(r.rip, labels[next], "step {step}: from {:#x}", labels[at]);
        assert_eq!(r.rip, c.regs(0).unwrap().rip);
        let after = counters(&c, 2);
        // `inc` adds one to vCPU 0's counter, `add` one to the word after it; nothing else.
        assert_eq!(after[0], before[0] + u64::from(at == 0), "step {step}");
        assert_eq!(
            phys_u64(&c, counter_addr(0) + 8),
            before_add + u64::from(at == 1),
            "step {step}"
        );
        assert_eq!(after[1], before[1], "step {step}: vCPU 1 ran");
        at = next;
    }
    let o = c.regs(1).unwrap();
    assert_eq!((o.rip, o.gprs), (other.rip, other.gprs), "vCPU 1 moved");
    // The guest still runs normally afterwards (vCPU 0's breakpoint still armed).
    c.resume().unwrap();
    let ev = c.wait_event(Duration::from_secs(20)).unwrap();
    assert_eq!(
        ev,
        Some(GuestEvent::Breakpoint {
            vcpu: 0,
            rip: labels[2]
        })
    );
    c.set_breakpoints(&[]).unwrap();
    c.resume().unwrap();
    let before = counters(&c, 2);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let after = counters(&c, 2);
            after[0] > before[0] + 10 && after[1] > before[1] + 10
        }),
        "{before:?} -> {:?}",
        counters(&c, 2)
    );
    stop(&mut vm);
}

#[test]
fn kvm_serial_output_and_i8042_reset() {
    require_kvm();
    let msg = b"hello from the raw guest\r\n";
    let (code, _) = assemble(CODE_BASE, |a| {
        let mut lp = a.create_label();
        a.mov(dx, 0x3f8u32)?;
        a.mov(rsi, DATA_BASE)?;
        a.mov(ecx, msg.len() as u32)?;
        a.set_label(&mut lp)?;
        a.mov(al, byte_ptr(rsi))?;
        a.out(dx, al)?;
        a.inc(rsi)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.mov(al, 0xfeu32)?;
        a.out(0x64u32, al)?;
        let mut hang = a.create_label();
        a.set_label(&mut hang)?;
        a.jmp(hang)?;
        Ok(vec![])
    });
    let out = temp_path("serial-raw.txt");
    let mut vm = Vm::create_raw(&RawConfig {
        serial: SerialOut::File(out.clone()),
        ..raw_config(
            8 << 20,
            vec![(CODE_BASE, code), (DATA_BASE, msg.to_vec())],
            vec![vcpu(CODE_BASE)],
        )
    })
    .unwrap();
    let mut c = vm.control();
    vm.start().unwrap();
    let r = vm.wait_exit_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(r, Some(ExitReason::Reset));
    assert_eq!(ExitReason::Reset.exit_code(), 0);
    assert_eq!(std::fs::read(&out).unwrap(), msg);
    assert_eq!(
        c.wait_event(Duration::from_secs(1)).unwrap(),
        Some(GuestEvent::Exited)
    );
}

#[test]
fn kvm_emulation_failure_is_a_clear_error() {
    require_kvm();
    // Jump into the MMIO hole: KVM cannot fetch instructions from unbacked memory.
    let (code, _) = assemble(CODE_BASE, |a| {
        a.mov(rax, 0xd000_0000u64)?;
        a.jmp(rax)?;
        Ok(vec![])
    });
    let mut vm = start_code(code, vec![vcpu(CODE_BASE)]);
    let e = vm.wait_exit().unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, VmError::InternalError { vcpu: 0, .. }),
        "want an internal error, got {msg}"
    );
    assert!(
        msg.contains("vCPU 0") && msg.contains("internal error"),
        "{msg}"
    );
}

#[test]
fn kvm_guest_sees_our_cpuid() {
    require_kvm();
    // Each vCPU stores cpuid(1).{ebx,ecx}, cpuid(0x40000000).{ebx,ecx,edx} and
    // cpuid(0xb, 1).{eax,ebx,edx} at rdi, then spins.
    let (code, _) = assemble(CODE_BASE, |a| {
        a.mov(eax, 1u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(dword_ptr(rdi), ebx)?;
        a.mov(dword_ptr(rdi + 4), ecx)?;
        a.mov(eax, 0x4000_0000u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(dword_ptr(rdi + 8), ebx)?;
        a.mov(dword_ptr(rdi + 12), ecx)?;
        a.mov(dword_ptr(rdi + 16), edx)?;
        a.mov(eax, 0xbu32)?;
        a.mov(ecx, 1u32)?;
        a.cpuid()?;
        a.mov(dword_ptr(rdi + 20), eax)?;
        a.mov(dword_ptr(rdi + 24), ebx)?;
        a.mov(dword_ptr(rdi + 28), edx)?;
        a.mov(dword_ptr(rdi + 32), 1)?;
        pause_loop(a)?;
        Ok(vec![])
    });
    let n = 4;
    let mut vm = start_code(code, counter_vcpus(n));
    let c = vm.control();
    let rd = |i: usize, off: u64| phys_u32(&c, counter_addr(i) + off);
    assert!(wait_until(Duration::from_secs(20), || (0..n).all(|i| rd(i, 32) == 1)));
    for i in 0..n {
        let (ebx1, ecx1) = (rd(i, 0), rd(i, 4));
        assert_eq!(ebx1 >> 24, i as u32, "vCPU {i}: initial APIC id");
        assert_eq!(
            (ebx1 >> 16) & 0xff,
            n as u32,
            "vCPU {i}: logical processor count"
        );
        assert_ne!(ecx1 & (1 << 31), 0, "vCPU {i}: hypervisor bit");
        let mut sig = Vec::new();
        for off in [8, 12, 16] {
            sig.extend_from_slice(&rd(i, off).to_le_bytes());
        }
        assert_eq!(&sig[..9], b"KVMKVMKVM", "vCPU {i}: KVM signature");
        // Leaf 0xb core level: shift 2 (4 vCPUs), 4 logical processors, x2APIC id = index.
        assert_eq!(
            (rd(i, 20), rd(i, 24), rd(i, 28)),
            (2, 4, i as u32),
            "vCPU {i}: leaf 0xb"
        );
    }
    stop(&mut vm);
}

#[test]
fn kvm_pause_reaches_halted_vcpus() {
    require_kvm();
    // vCPU 0 halts with interrupts off (stays in the in-kernel halt); vCPU 1 spins.
    let (code, labels) = assemble(CODE_BASE, |a| {
        let mut halt = a.create_label();
        a.set_label(&mut halt)?;
        a.mov(qword_ptr(rdi), 1)?;
        a.hlt()?;
        a.jmp(halt)?;
        let spin = counter_loop(a)?;
        Ok(vec![halt, spin])
    });
    let mut vm = start_code(code, counter_vcpus_at(&labels[..2]));
    let mut c = vm.control();
    wait_counters_above(&c, 2, 0, Duration::from_secs(10));
    for _ in 0..20 {
        c.pause().unwrap();
        let r = c.regs(0).unwrap();
        assert!(
            r.rip > labels[0] && r.rip <= labels[1],
            "vCPU 0 rip {:#x}",
            r.rip
        );
        c.resume().unwrap();
    }
    assert!(!vm.has_exited(), "HLT must not end the VM");
    assert_eq!(stop(&mut vm), ExitReason::Stopped);
}

#[test]
fn kvm_msrs_and_idtr_read_back_as_the_guest_set_them() {
    require_kvm();
    const LSTAR: u64 = 0xffff_ffff_8123_4560;
    const KGS: u64 = 0xffff_8880_1234_5000;
    const IDT: u64 = 0x3000;
    let (code, _) = assemble(CODE_BASE, |a| {
        let mut idtr = a.create_label();
        for (msr, v) in [(0xc000_0082u32, LSTAR), (0xc000_0102u32, KGS)] {
            a.mov(ecx, msr)?;
            a.mov(eax, v as u32)?;
            a.mov(edx, (v >> 32) as u32)?;
            a.wrmsr()?;
        }
        a.lidt(ptr(idtr))?;
        a.mov(qword_ptr(rdi), 1)?;
        pause_loop(a)?;
        a.set_label(&mut idtr)?;
        a.dw(&[0xfff])?;
        a.dq(&[IDT])?;
        Ok(vec![])
    });
    let mut vm = start_code(code, counter_vcpus(1));
    let mut c = vm.control();
    assert!(wait_until(Duration::from_secs(10), || counters(&c, 1)[0] == 1));
    c.pause().unwrap();
    let r = c.regs(0).unwrap();
    assert_eq!(r.lstar, Some(LSTAR));
    assert_eq!(r.kernel_gs_base, KGS);
    assert_eq!(r.idtr_base, Some(IDT));
    c.resume().unwrap();
    stop(&mut vm);
}

#[test]
fn kvm_triple_fault_is_a_shutdown() {
    require_kvm();
    // The boot IDT is empty: #UD -> #GP -> #DF -> triple fault.
    let (code, _) = assemble(CODE_BASE, |a| {
        a.ud2()?;
        Ok(vec![])
    });
    let mut vm = start_code(code, vec![vcpu(CODE_BASE)]);
    let r = vm.wait_exit_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(r, Some(ExitReason::Shutdown));
    assert_eq!(ExitReason::Shutdown.exit_code(), 0);
}

#[test]
fn kvm_large_memory_splits_around_the_mmio_hole() {
    require_kvm();
    let vm = Vm::create_raw(&RawConfig {
        patch_arena: 4 << 20,
        ..raw_config(5 << 30, vec![], vec![RawVcpu::default()])
    })
    .unwrap();
    let mut c = vm.control();
    assert_eq!(
        c.memory().regions(),
        vec![(0, 3 << 30), (4 << 30, 2 << 30)],
        "RAM below the 3 GiB hole and the rest from 4 GiB"
    );
    let arena = (6u64 << 30) - (4 << 20);
    assert_eq!(c.patch_arena(), Some((arena, 4 << 20)));
    let e820: Vec<_> = vm.e820().iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert!(
        e820.contains(&(4 << 30, arena - (4 << 30), vmm::kvm::E820_RAM)),
        "{e820:x?}"
    );
    assert!(
        e820.contains(&(arena, 4 << 20, vmm::kvm::E820_RESERVED)),
        "{e820:x?}"
    );
    assert!(
        !e820.iter().any(|e| e.0 < 4 << 30 && e.0 + e.1 > 3 << 30),
        "{e820:x?}"
    );
    c.write_phys(arena + 8, &[0xab; 8]).unwrap();
    assert_eq!(phys_u64(&c, arena + 8), 0xabab_abab_abab_abab);
    assert!(
        c.write_phys((3 << 30) + 8, &[1]).is_err(),
        "the MMIO hole is not RAM"
    );
}
