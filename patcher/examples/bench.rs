//! Engine cost on a guest memory snapshot (no real vCPUs: the pause window here is the
//! engine's own verify+write time; the QEMU-attach numbers come from the end-to-end bench
//! `cargo test -p hvpatch-tests --test patch_bench -- --ignored --nocapture`).
//!
//! `cargo run -p hvpatch-patcher --example bench -- [6.1|6.12]` (guest snapshots, see
//! `tests/common/mod.rs` `snapshot_dir`; made by `scripts/setup`).

use std::time::Instant;

#[path = "../tests/common/mod.rs"]
mod common;

use patcher::{Engine, KernelPaging, Target};

/// `*_proc_show` functions present once in both guests (same signature as the replacement).
pub const SHOW_FUNCS: [&str; 10] = [
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

fn patch_src(n: usize) -> String {
    let mut s = format!("HVPATCH_NAME(\"bench{n}\");\n");
    for f in &SHOW_FUNCS[..n] {
        s += &format!(
            "static int new_{f}(struct seq_file *m, void *v) {{ seq_printf(m, \"{f} patched\\n\"); return 0; }}\n\
             HVPATCH_FUNC({f}, new_{f});\n"
        );
    }
    s
}

fn main() {
    let v = std::env::args().nth(1).unwrap_or_else(|| "6.12".into());
    let snap = if v == "6.1" {
        common::snap_6_1()
    } else {
        common::snap_6_12()
    };
    let t = Target {
        symbols: &snap.syms,
        paging: KernelPaging::from_regs(&snap.vcpus[0]),
    };
    for n in [1usize, 10] {
        let tb = Instant::now();
        let obj = common::build_c(&format!("bench{n}"), &patch_src(n));
        let build = tb.elapsed();
        let mut g = snap.guest();
        let kernel = common::kernel(snap);
        let mut e = Engine::new();
        let mut loads = Vec::new();
        for _ in 0..20 {
            let t0 = Instant::now();
            e.load(&mut g, &t, &obj, "b.o").expect("load");
            let total = t0.elapsed();
            loads.push((e.last_timing(), total));
            e.unload(&mut g, &format!("bench{n}"), &kernel, common::UNLOAD_WAIT)
                .expect("unload");
        }
        loads.sort_by_key(|l| l.0.pause);
        let (med, total) = loads[loads.len() / 2];
        println!(
            "{v}: {n:2} function(s): build {build:.1?}; load median: prepare {:.1?}, pause window {:.1?}, total {total:.1?}",
            med.prepare, med.pause
        );
    }
    check_cost(snap);
}

/// What one check of a transition reads in its pause (`Transition::classify`): the task list
/// with the livepatch fields, and every task's stack, cold (first check) and with the unwinds
/// of switched-out tasks cached (later checks).
fn check_cost(snap: &common::Snapshot) {
    use patcher::view::TaskView;
    let mem = introspect::SliceMemory::flat(&snap.ram);
    let mut rows = Vec::new();
    for _ in 0..20 {
        let kernel = common::kernel(snap);
        let _ = TaskView::tasks(&kernel, &mem, &snap.vcpus).expect("tasks");
        let t0 = Instant::now();
        let tasks = TaskView::tasks(&kernel, &mem, &snap.vcpus).expect("tasks");
        let t_tasks = t0.elapsed();
        let frames: usize = tasks
            .iter()
            .map(|t| kernel.stack_frames(&mem, &snap.vcpus, t).frames.len())
            .sum();
        let t_cold = t0.elapsed() - t_tasks;
        let t1 = Instant::now();
        for t in &tasks {
            let _ = kernel.stack_frames(&mem, &snap.vcpus, t);
        }
        rows.push((t_tasks, t_cold, t1.elapsed(), tasks.len(), frames));
    }
    rows.sort();
    let (tl, cold, warm, n, frames) = rows[rows.len() / 2];
    println!(
        "{}: one transition check, medians: task list {tl:.1?} ({n} tasks); stacks cold {cold:.1?}, cached {warm:.1?} ({frames} frames)",
        snap.version
    );
}
