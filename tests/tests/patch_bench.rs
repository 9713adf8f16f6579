//! Benchmark: pause window of 1- and 10-function loads/unloads and end-to-end load latency
//! (build excluded, attach + kernel discovery excluded) on booted guests through QEMU attach.
//! `cargo test -p hvpatch-tests --test patch_bench -- --ignored --nocapture`

use std::time::{Duration, Instant};

use harness::{Guest, GuestSpec, KernelSeries};
use patcher::kernel::KernelSymbols;
use patcher::{Engine, GuestControl, Target};

/// `*_proc_show` functions present once in both guests.
const SHOW_FUNCS: [&str; 10] = [
    "cmdline_proc_show",
    "version_proc_show",
    "loadavg_proc_show",
    "uptime_proc_show",
    "meminfo_proc_show",
    "filesystems_proc_show",
    "execdomains_proc_show",
    "rtc_proc_show",
    "irq_spurious_proc_show",
    "cn_proc_show",
];

fn build(n: usize) -> Vec<u8> {
    let mut s = format!("HVPATCH_NAME(\"bench{n}\");\n");
    for f in &SHOW_FUNCS[..n] {
        s += &format!(
            "static int new_{f}(struct seq_file *m, void *v) {{ seq_printf(m, \"{f} patched\\n\"); return 0; }}\n\
             HVPATCH_FUNC({f}, new_{f});\n"
        );
    }
    harness::patching::build_patch(&format!("bench{n}"), &s)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench(series: KernelSeries) {
    let mut g = Guest::boot(GuestSpec::new(series)).expect("boot");
    let (mut ctl, kernel, regs) = harness::patching::attach_and_open(&g);
    let ks = KernelSymbols::new(&kernel, ctl.memory());
    let t = Target {
        symbols: &ks,
        paging: ks.paging(regs[0].nx_enabled()),
    };
    let mut e = Engine::new();
    for n in [1usize, 10] {
        let obj = build(n);
        let (mut pause, mut total, mut upause) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let t0 = Instant::now();
            e.load(&mut ctl, &t, &obj, "b.o").expect("load");
            total.push(t0.elapsed());
            pause.push(e.last_timing().pause);
            e.unload(
                &mut ctl,
                &format!("bench{n}"),
                &kernel,
                Duration::from_secs(10),
            )
            .expect("unload");
            upause.push(e.last_timing().pause);
        }
        println!(
            "{series:?}: {n:2} function(s): load pause window median {:.2?} (min {:.2?}), end-to-end load {:.2?}, unload pause {:.2?}",
            median(pause.clone()),
            pause.iter().min().unwrap(),
            median(total),
            median(upause)
        );
    }
    assert_eq!(g.run("echo alive").unwrap(), "alive\n");
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_6_1() {
    bench(KernelSeries::V6_1);
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_6_12() {
    bench(KernelSeries::V6_12);
}
