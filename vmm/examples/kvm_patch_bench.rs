//! Patch-load benchmark on the KVM VMM: the guest pause window (pause → resume) and the
//! end-to-end load latency for a 1- and a 10-function patch, on a small assembled guest whose
//! ten functions are called in a loop.
//!
//! `cargo run --release -p hvpatch-vmm --example kvm_patch_bench [-- ITERATIONS]`

use std::time::Duration;

#[path = "../tests/kvm_common/mod.rs"]
mod kvm_common;

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use kvm_common::{kernel_half_guest, raw_paging, KTEXT};
use patcher::build::{compile, BuildOptions};
use patcher::{Engine, GuestControl, SymbolMap, Target};
use vmm::kvm::{SerialOut, Vm};

const FUNCS: usize = 10;

fn guest_code() -> (Vec<u8>, Vec<u64>, u64) {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fns: Vec<CodeLabel> = (0..FUNCS).map(|_| a.create_label()).collect();
    let mut main = a.create_label();
    for (i, f) in fns.iter_mut().enumerate() {
        a.set_label(f).unwrap();
        a.db(&[0x0f, 0x1f, 0x44, 0x00, 0x00]).unwrap();
        a.mov(eax, i as u32).unwrap();
        a.ret().unwrap();
    }
    a.set_label(&mut main).unwrap();
    for f in &fns {
        a.call(*f).unwrap();
    }
    a.jmp(main).unwrap();
    let r = a
        .assemble_options(KTEXT, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let addrs = fns.iter().map(|l| r.label_ip(l).unwrap()).collect();
    (
        r.inner.code_buffer.clone(),
        addrs,
        r.label_ip(&main).unwrap(),
    )
}

fn patch_source(n: usize) -> String {
    let mut s = format!("#include <hvpatch.h>\nHVPATCH_NAME(\"bench-{n}\");\n");
    for i in 0..n {
        s += &format!(
            "static int new_fn_{i}(void) {{ return {}; }}\nHVPATCH_FUNC(fn_{i}, new_fn_{i});\n",
            100 + i
        );
    }
    s
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p99 = v[((v.len() * 99) / 100).min(v.len() - 1)];
    format!(
        "median {:>8.1} µs  p99 {:>8.1} µs",
        us(v[v.len() / 2]),
        us(p99)
    )
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let (code, fns, main) = guest_code();
    let cfg = kernel_half_guest(code, main, SerialOut::Null);
    let mut vm = Vm::create_raw(&cfg).expect("create VM (needs /dev/kvm)");
    vm.start().expect("start");
    let mut ctl = vm.control();
    let mut syms = SymbolMap::new();
    syms.insert("_text", KTEXT);
    syms.insert("_end", KTEXT + 0x1000);
    for (i, a) in fns.iter().enumerate() {
        syms.insert(&format!("fn_{i}"), *a);
    }
    ctl.pause().unwrap();
    let regs = ctl.regs(0).unwrap();
    ctl.resume().unwrap();
    let paging = raw_paging(&regs);
    let target = Target {
        symbols: &syms,
        paging,
    };
    let dir = std::env::temp_dir().join(format!("hvpatch-kvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "KVM VMM, 1 vCPU running the patched functions in a loop, {iterations} load/unload cycles"
    );
    for n in [1, FUNCS] {
        let src = dir.join(format!("bench-{n}.c"));
        let obj = dir.join(format!("bench-{n}.o"));
        std::fs::write(&src, patch_source(n)).unwrap();
        compile(&BuildOptions::new(&src, &obj)).expect("build");
        let object = std::fs::read(&obj).unwrap();
        let mut engine = Engine::new();
        let (mut pause, mut total, mut unload_pause) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..iterations {
            engine
                .load(&mut ctl, &target, &object, "bench.o")
                .expect("load");
            let t = engine.last_timing();
            pause.push(t.pause);
            total.push(t.total);
            engine
                .unload(
                    &mut ctl,
                    &format!("bench-{n}"),
                    &patcher::reach::BareVcpus { paging },
                    std::time::Duration::from_secs(5),
                )
                .expect("unload");
            unload_pause.push(engine.last_timing().pause);
        }
        println!("{n:>2} function(s): load pause window   {}", stats(pause));
        println!("{n:>2} function(s): load end-to-end      {}", stats(total));
        println!(
            "{n:>2} function(s): unload pause window {}",
            stats(unload_pause)
        );
    }
    vm.stop();
    let _ = vm.wait_exit();
    let _ = std::fs::remove_dir_all(dir);
}
