//! A hostile guest: garbage stacks, garbage ORC data and bad stack pointers give errors or
//! unreliable verdicts, never hangs or panics.

mod stacks_support;

use introspect::model::GuestAccess;
use introspect::orc::{OrcFormat, OrcTable};
use introspect::stack::task_stack;
use introspect::unwind::MAX_FRAMES;
use stacks_support::*;

#[test]
fn garbage_stacks_and_stack_pointers() {
    let s = load("6.12");
    let m = s.kernel.model(&s.mem).unwrap();
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let sleeping: Vec<_> = tasks
        .iter()
        .filter(|t| t.running_on_vcpu.is_none() && t.pid > 0)
        .collect();
    let text = m.text_ranges[0];
    let mut rng = Rng(0xfeed_beef);
    let mut unreliable = 0;
    for i in 0..400 {
        let t = sleeping[i % sleeping.len()];
        let mut o = Overlay::new(&s);
        // Overwrite the live part of the stack (thread.sp .. top) with a mix of values.
        let mut a = t.thread_sp;
        while a < t.stack_base + 0x4000 {
            let v = match rng.next() % 5 {
                0 => text.0 + rng.next() % (text.1 - text.0),
                1 => t.stack_base + rng.next() % 0x4000,
                2 => 0x33,
                3 => o.read_u64(a).unwrap(),
                _ => rng.next(),
            };
            o.put_u64(a, v);
            a += 8;
        }
        let st = task_stack(&o, m, t).expect("reading thread.sp frame works");
        assert!(st.frames.len() <= MAX_FRAMES);
        unreliable += usize::from(!st.reliable);
    }
    assert!(
        unreliable > 100,
        "garbage stacks should mostly be unreliable ({unreliable}/400)"
    );

    // thread.sp pointing to unmapped memory, outside the stack, or at the stack end.
    let t = sleeping[0];
    for sp in [
        0xffff_ffff_ffff_f000u64,
        0xdead_0000,
        t.stack_base + 0x4000 - 8,
        s.kernel.lookup("init_task", None).unwrap(),
    ] {
        let mut tt = t.clone();
        tt.thread_sp = sp;
        // Either the inactive frame cannot be read (error) or the walk is unreliable.
        if let Ok(st) = task_stack(&s_guest(&s), m, &tt) {
            assert!(!st.reliable, "sp {sp:#x}: {st:?}");
        }
    }
}

fn s_guest(s: &Snapshot) -> introspect::model::KernelGuest<'_> {
    introspect::model::KernelGuest {
        kernel: &s.kernel,
        mem: &s.mem,
    }
}

#[test]
fn garbage_orc_entries() {
    let s = load("6.1");
    let g = s_guest(&s);
    let base = s.kernel.model(&s.mem).unwrap();
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let sleeping: Vec<_> = tasks
        .iter()
        .filter(|t| t.running_on_vcpu.is_none() && t.pid > 0)
        .collect();
    let ip0 = g.symbol("__start_orc_unwind_ip").unwrap();
    let e0 = g.symbol("__start_orc_unwind").unwrap();
    let e1 = g.symbol("__stop_orc_unwind").unwrap();
    let mut ips = vec![0u8; (e0 - ip0) as usize];
    g.read_virt(ip0, &mut ips).unwrap();
    let mut ents = vec![0u8; (e1 - e0) as usize];
    g.read_virt(e0, &mut ents).unwrap();
    // Only mutate entries covering the functions on our stacks, so every walk meets garbage.
    let mut hot = Vec::new();
    for t in &sleeping {
        for f in s.kernel.task_stack(&s.mem, t).unwrap().frames {
            hot.push(base.orc.index_of(f.addr - 1).unwrap());
        }
    }
    let mut rng = Rng(0xabcdef);
    for round in 0..60 {
        let mut e = ents.clone();
        for &i in &hot {
            if rng.next() & 1 == 0 {
                for b in &mut e[i * 6..i * 6 + 6] {
                    *b = rng.next() as u8;
                }
                if round % 3 == 0 {
                    // Huge sp offsets.
                    e[i * 6] = 0xf0;
                    e[i * 6 + 1] = 0x7f;
                }
            }
        }
        let mut m = base.clone();
        m.orc = OrcTable::new(&ips, ip0, e, OrcFormat::Legacy).unwrap();
        for t in &sleeping {
            let st = task_stack(&g, &m, t).unwrap();
            assert!(st.frames.len() <= MAX_FRAMES);
        }
        for v in 0..s.regs.len() {
            let st = introspect::stack::vcpu_stack(&g, &m, &s.regs, v).unwrap();
            assert!(st.frames.len() <= MAX_FRAMES);
        }
    }
    // A table whose ips point anywhere (shuffled self-relative offsets).
    let mut bad_ips = ips.clone();
    for c in bad_ips.chunks_exact_mut(4) {
        c.copy_from_slice(&(rng.next() as u32).to_le_bytes());
    }
    let mut m = base.clone();
    m.orc = OrcTable::new(&bad_ips, ip0, ents.clone(), OrcFormat::Legacy).unwrap();
    let mut unreliable = 0;
    for t in &sleeping {
        unreliable += usize::from(!task_stack(&g, &m, t).unwrap().reliable);
    }
    assert!(unreliable > 0);
}
