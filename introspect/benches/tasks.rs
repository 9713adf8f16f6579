//! Task walk + unwind of every task and vCPU on a guest snapshot, and the one-time model build
//! (BTF + ORC copied out of the guest).
//!
//! `cargo bench -p hvpatch-introspect --bench tasks -- [ram.bin] [regs.txt]`
//! (defaults: the 6.12 guest snapshot, see `tests/common/snapshot_dir.rs`).

mod common;

use std::time::Instant;

use common::{best, load_snapshot};
use introspect::{Kernel, SliceMemory};

fn main() {
    let (ram, vcpus) = load_snapshot();
    let mem = SliceMemory::flat(&ram);
    let (t_model, _) = best(3, || {
        let k = Kernel::open(&mem, &vcpus).expect("Kernel::open");
        let t = Instant::now();
        k.model(&mem).expect("model");
        t.elapsed()
    });
    let k = Kernel::open(&mem, &vcpus).expect("Kernel::open");
    let t0 = Instant::now();
    k.model(&mem).expect("model");
    let t_model_once = t0.elapsed();
    let (t_tasks, tasks) = best(20, || k.tasks(&mem, &vcpus).expect("tasks"));
    let (t_all, frames) = best(20, || {
        let tasks = k.tasks(&mem, &vcpus).expect("tasks");
        let mut frames = 0;
        for t in &tasks {
            frames += k.task_stack(&mem, t).expect("stack").frames.len();
        }
        for v in 0..vcpus.len() {
            frames += k
                .vcpu_stack(&mem, &vcpus, v)
                .expect("vcpu stack")
                .frames
                .len();
        }
        frames
    });
    let m = k.model(&mem).expect("model");
    println!("kernel:                       {:?}", k.info().release);
    println!("model build (BTF+ORC, once):  {:>8.2} ms  ({} BTF types, {} ORC entries; best of 3 {:.2} ms)",
        t_model_once.as_secs_f64() * 1e3, m.btf.type_count(), m.orc.len(), t_model.as_secs_f64() * 1e3);
    println!(
        "task walk:                    {:>8.3} ms  ({} tasks)",
        t_tasks.as_secs_f64() * 1e3,
        tasks.len()
    );
    println!(
        "task walk + unwind all:       {:>8.3} ms  ({} frames; tasks + {} vCPUs)",
        t_all.as_secs_f64() * 1e3,
        frames,
        vcpus.len()
    );
    println!("(best of 20 runs)");
}
