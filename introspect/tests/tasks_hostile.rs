//! A hostile guest: corrupted task and thread lists give errors, never hangs or panics.

mod stacks_support;

use introspect::model::GuestAccess;
use introspect::tasks::{list_tasks, TaskError};
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
