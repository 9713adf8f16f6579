//! A hostile guest: corrupted task and thread lists give errors, never hangs or panics;
//! corrupted kthread / workqueue structures only cost a task its /proc-style name.

mod stacks_support;

use introspect::model::GuestAccess;
use introspect::tasks::{list_tasks, TaskError, PF_WQ_WORKER};
use stacks_support::*;

#[test]
fn looping_and_broken_task_lists() {
    let s = load("6.12");
    let m = s.kernel.model(&s.mem).unwrap();
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let procs: Vec<_> = tasks.iter().filter(|t| t.is_process()).collect();
    let off = m.task.tasks;
    let (a, b) = (procs[5].addr + off, procs[20].addr + off);

    // b.next -> a: a loop that never returns to init_task.
    let mut o = Overlay::new(&s);
    o.put_u64(b, a);
    assert_eq!(
        list_tasks(&o, m, &s.regs),
        Err(TaskError::CorruptList("tasks"))
    );

    // A node pointing at itself.
    let mut o = Overlay::new(&s);
    o.put_u64(a, a);
    assert_eq!(
        list_tasks(&o, m, &s.regs),
        Err(TaskError::CorruptList("tasks"))
    );

    // A node pointing into unmapped kernel space or user space.
    for bad in [0xffff_ffff_ffff_0000u64, 0x1000, 0] {
        let mut o = Overlay::new(&s);
        o.put_u64(a, bad);
        assert!(list_tasks(&o, m, &s.regs).is_err(), "next = {bad:#x}");
    }

    // A looping thread list of a process.
    let sig = o.read_u64(procs[3].addr + m.task.signal).unwrap();
    let head = sig + m.task.signal_thread_head.unwrap();
    let first = o.read_u64(head).unwrap();
    let mut o = Overlay::new(&s);
    o.put_u64(first, first);
    assert_eq!(
        list_tasks(&o, m, &s.regs),
        Err(TaskError::CorruptList("thread"))
    );

    // Random garbage in list pointers: always terminates with Ok or Err.
    let mut rng = Rng(0x5eed);
    for _ in 0..300 {
        let mut o = Overlay::new(&s);
        for _ in 0..4 {
            let t = procs[(rng.next() % procs.len() as u64) as usize];
            let v = match rng.next() % 3 {
                0 => procs[(rng.next() % procs.len() as u64) as usize].addr + off,
                1 => t.addr.wrapping_add(rng.next() % 0x3000),
                _ => rng.next(),
            };
            o.put_u64(t.addr + off, v);
        }
        let _ = list_tasks(&o, m, &s.regs);
    }
}

/// Corrupted kthread / workqueue pointers never fail the task list: the name falls back to
/// `task_struct.comm`. Names are cut to 63 bytes like /proc's 64-byte buffer.
#[test]
fn hostile_kthread_and_worker_names_fall_back_to_comm() {
    let s = load("6.12");
    let m = s.kernel.model(&s.mem).unwrap();
    let pc = m.task.proc_comm.as_ref().expect("6.12 has struct kthread");
    let w = pc.worker.as_ref().expect("6.12 has wq_worker_comm");
    let id = w.id.as_ref().expect("6.12 has format_worker_id");
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let by = |what: &str, f: &dyn Fn(&introspect::tasks::Task) -> bool| {
        tasks
            .iter()
            .find(|t| f(t))
            .unwrap_or_else(|| panic!("no {what} task"))
            .clone()
    };
    // A kthread with a full_name, a rescuer, and a per-CPU worker with a description.
    let kt = by("long kthread", &|t| {
        t.is_kthread && t.flags & PF_WQ_WORKER == 0 && t.comm.len() > 15
    });
    let rescuer = by("rescuer", &|t| {
        t.comm.starts_with("kworker/R-") && t.comm.len() > 15
    });
    let worker = by("worker", &|t| {
        t.task_comm.starts_with("kworker/")
            && !t.task_comm.contains(['u', 'H', 'R'])
            && t.comm.len() > t.task_comm.len() + 1
    });
    let g = Overlay::new(&s);
    let kthread = |t: &introspect::tasks::Task| g.read_u64(t.addr + pc.kthread).unwrap();
    let data = |t: &introspect::tasks::Task| g.read_u64(kthread(t) + pc.kthread_data).unwrap();
    let full_name = kthread(&kt) + pc.kthread_full_name.unwrap();
    let wq = g.read_u64(data(&rescuer) + id.rescue_wq).unwrap();
    assert_ne!(wq, 0);
    let pool = g.read_u64(data(&worker) + w.pool).unwrap();
    let sites: Vec<(&str, &introspect::tasks::Task, u64, bool)> = vec![
        // (what, task, pointer to corrupt, whether NULL is also a fallback)
        ("worker_private", &kt, kt.addr + pc.kthread, true),
        ("full_name", &kt, full_name, true),
        ("worker_private", &worker, worker.addr + pc.kthread, true),
        (
            "kthread.data",
            &worker,
            kthread(&worker) + pc.kthread_data,
            true,
        ),
        ("worker.pool", &worker, data(&worker) + w.pool, false),
        ("pool.attrs", &worker, pool + id.pool_attrs, true),
        (
            "worker.rescue_wq",
            &rescuer,
            data(&rescuer) + id.rescue_wq,
            false,
        ),
    ];
    for (what, t, va, null_too) in sites {
        let mut bad = vec![
            1u64,
            0x1000,
            0x7fff_ffff_f000,
            0xffff_ffff_ffff_0000,
            0xffff_ffff_ffff_fff8,
            0xdead_beef_dead_beef,
        ];
        if null_too {
            bad.push(0);
        }
        for v in bad {
            let mut o = Overlay::new(&s);
            o.put_u64(va, v);
            let got = list_tasks(&o, m, &s.regs)
                .unwrap_or_else(|e| panic!("{what} = {v:#x}: task list failed: {e}"));
            let got = got.iter().find(|x| x.pid == t.pid).unwrap();
            assert_eq!(got.comm, got.task_comm, "{what} = {v:#x}");
            assert_eq!(got.task_comm, t.task_comm, "{what} = {v:#x}");
        }
    }

    // A detached (pool = NULL) non-rescuer is `kworker/dying` in 6.10+, with no description.
    let mut o = Overlay::new(&s);
    o.put_u64(data(&worker) + w.pool, 0);
    let got = list_tasks(&o, m, &s.regs).unwrap();
    assert_eq!(
        got.iter().find(|x| x.pid == worker.pid).unwrap().comm,
        "kworker/dying"
    );

    // Executing a work item: `+desc`; a description without NUL stops at the array's end.
    let mut o = Overlay::new(&s);
    o.put_u64(data(&worker) + w.current_work, kt.addr);
    o.put(data(&worker) + w.desc, &vec![b'x'; w.desc_len as usize]);
    let got = list_tasks(&o, m, &s.regs).unwrap();
    let want = format!("{}+{}", worker.task_comm, "x".repeat(w.desc_len as usize));
    assert_eq!(got.iter().find(|x| x.pid == worker.pid).unwrap().comm, want);

    // A full_name longer than /proc's buffer (here: linux_banner) is cut to 63 bytes.
    let banner = g.symbol("linux_banner").unwrap();
    let mut o = Overlay::new(&s);
    o.put_u64(full_name, banner);
    let got = list_tasks(&o, m, &s.regs).unwrap();
    let name = &got.iter().find(|x| x.pid == kt.pid).unwrap().comm;
    assert_eq!(name.len(), 63);
    assert!(name.starts_with("Linux version "), "{name}");

    // Garbage all over the kthread and worker structs: always Ok, the comm always kept.
    let mut rng = Rng(0x7a11);
    let targets = [&kt, &rescuer, &worker];
    for _ in 0..300 {
        let mut o = Overlay::new(&s);
        for _ in 0..4 {
            let t = targets[(rng.next() % 3) as usize];
            let off = (rng.next() % 0x100) & !7;
            let (base, off) = match rng.next() % 3 {
                0 => (kthread(t), off),
                1 => (data(t), off),
                _ => (t.addr + pc.kthread, 0),
            };
            let v = match rng.next() % 3 {
                0 => rng.next(),
                1 => tasks[(rng.next() % tasks.len() as u64) as usize].addr,
                _ => 0,
            };
            o.put_u64(base + off, v);
        }
        let got = list_tasks(&o, m, &s.regs).expect("names never fail the list");
        for t in targets {
            let x = got.iter().find(|x| x.pid == t.pid).unwrap();
            assert_eq!(x.task_comm, t.task_comm);
            // At most 63 bytes of the guest's, each shown as at most one char (invalid UTF-8
            // becomes U+FFFD, which takes 3 bytes in the String).
            assert!(x.comm.chars().count() <= 63, "{:?}", x.comm);
        }
    }
}
