//! Benchmarks of the KVM VMM on this host's /dev/kvm:
//! - pause+resume round trip with 1, 2 and 4 spinning vCPUs (median, p99, max over N runs);
//! - the VMM's memory overhead: process RSS minus the guest RAM that is resident.
//!
//! `cargo run --release -p hvpatch-vmm --example kvm_bench [-- ITERATIONS]`

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use patcher::GuestControl;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::kvm::{EntryMode, RawConfig, RawVcpu, SerialOut, Vm};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

fn spin_vm(n: usize, memory: u64, code: Vec<u8>) -> Vm {
    let vcpus = (0..n)
        .map(|i| {
            let mut gprs = [0u64; 16];
            gprs[5] = DATA + i as u64 * 64;
            gprs[7] = 0x8_0000 - i as u64 * 0x1000;
            RawVcpu { rip: CODE, gprs }
        })
        .collect();
    Vm::create_raw(&RawConfig {
        memory,
        code: vec![(CODE, code)],
        vcpus,
        mode: EntryMode::Long64,
        serial: SerialOut::Null,
        patch_arena: 2 << 20,
    })
    .expect("create VM (is /dev/kvm usable?)")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn bench_pause(n: usize, iters: usize) {
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(qword_ptr(rdi))?;
        a.jmp(top)
    });
    let mut vm = spin_vm(n, 16 << 20, code);
    vm.start().unwrap();
    let mut c = vm.control();
    let t = Instant::now();
    while (0..n).any(|i| c.memory().read_u64(DATA + i as u64 * 64).unwrap() == 0) {
        assert!(t.elapsed() < Duration::from_secs(20), "vCPUs did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (mut pause, mut resume, mut round) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        let t0 = Instant::now();
        c.pause().unwrap();
        let t1 = Instant::now();
        c.resume().unwrap();
        let t2 = Instant::now();
        pause.push(t1 - t0);
        resume.push(t2 - t1);
        round.push(t2 - t0);
        // Let the vCPUs re-enter the guest before the next pause.
        std::thread::sleep(Duration::from_micros(200));
    }
    for v in [&mut pause, &mut resume, &mut round] {
        v.sort();
    }
    println!(
        "pause+resume, {n} vCPU(s), {iters} iterations: round trip median {:?} p99 {:?} max {:?} \
         (pause median {:?} p99 {:?}; resume median {:?})",
        pct(&round, 0.5),
        pct(&round, 0.99),
        round.last().unwrap(),
        pct(&pause, 0.5),
        pct(&pause, 0.99),
        pct(&resume, 0.5)
    );
    vm.stop();
    vm.wait_exit().unwrap();
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Resident pages of guest RAM (mincore over every region).
fn guest_resident(vm: &Vm) -> u64 {
    let mem = vm.memory();
    let gm = mem.guest_memory();
    let mut total = 0;
    for r in gm.iter() {
        let host = gm.get_host_address(r.start_addr()).unwrap();
        let pages = (r.len() as usize).div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: `host`/`r.len()` describe a live mapping owned by the VM; `vec` has one byte
        // per page as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), r.len() as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        total += vec.iter().filter(|b| **b & 1 == 1).count() as u64 * 4096;
    }
    total
}

fn bench_memory() {
    // The guest touches 64 MiB of its 256 MiB (one write per page), then spins.
    let touch: u64 = 64 << 20;
    let code = assemble(|a| {
        let mut lp = a.create_label();
        let mut spin = a.create_label();
        a.mov(rax, 0x100_0000u64)?;
        a.mov(rcx, 0x100_0000u64 + touch)?;
        a.set_label(&mut lp)?;
        a.mov(byte_ptr(rax), 1)?;
        a.add(rax, 4096)?;
        a.cmp(rax, rcx)?;
        a.jb(lp)?;
        a.mov(qword_ptr(rdi), 1)?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)
    });
    let before = rss_bytes();
    let mut vm = spin_vm(1, 256 << 20, code);
    vm.start().unwrap();
    let c = vm.control();
    let t = Instant::now();
    while c.memory().read_u64(DATA).unwrap() != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "guest did not finish touching memory"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss = rss_bytes();
    let guest = guest_resident(&vm);
    println!(
        "memory: 256 MiB guest, 64 MiB touched by the guest: process RSS {:.1} MiB (before the VM \
         {:.1} MiB), guest RAM resident {:.1} MiB, VMM overhead (RSS - resident guest RAM) {:.1} \
         MiB, of which the VM added {:.1} MiB",
        rss as f64 / 1048576.0,
        before as f64 / 1048576.0,
        guest as f64 / 1048576.0,
        (rss - guest) as f64 / 1048576.0,
        (rss.saturating_sub(guest).saturating_sub(before)) as f64 / 1048576.0
    );
    vm.stop();
    vm.wait_exit().unwrap();
}

fn main() {
    let iters = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    for n in [1, 2, 4] {
        bench_pause(n, iters);
    }
    bench_memory();
}
