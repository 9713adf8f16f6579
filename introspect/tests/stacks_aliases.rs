//! Text aliases (hvpatch's prologue trampolines) on real stacks of both booted guests: a return
//! address standing for one in a kernel function unwinds, and is reported, as that one.

mod stacks_support;

use introspect::model::GuestAccess;
use introspect::stack::task_stack;
use stacks_support::*;

/// Where the alias "lives": an address outside every text range (the arena is no text).
const TRAMP_RET: u64 = 0xffff_ffff_ff00_1005;

fn aliased(ver: &'static str) {
    let s = load(ver);
    let m = s.kernel.model(&s.mem).unwrap();
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let plain = Overlay::new(&s);
    // A sleeping task with a reliable stack of at least three frames.
    let (t, want) = tasks
        .iter()
        .filter(|t| t.running_on_vcpu.is_none() && t.pid > 0)
        .find_map(|t| {
            let st = task_stack(&plain, m, t).ok()?;
            (st.reliable && st.frames.len() >= 3).then_some((t, st))
        })
        .expect("a sleeping task with a reliable stack");
    // The slot holding its second frame's return address.
    let ret = want.frames[1].addr;
    let mut a = t.thread_sp;
    while plain.read_u64(a).unwrap() != ret {
        a += 8;
        assert!(a < t.stack_base + 0x8000, "{ret:#x} not on the stack");
    }
    let mut o = Overlay::new(&s);
    o.put_u64(a, TRAMP_RET);
    // Unlisted: not text, unreliable.
    let st = task_stack(&o, m, t).unwrap();
    assert!(!st.reliable, "{ver}: {st:?}");
    assert!(
        st.reason
            .as_deref()
            .unwrap_or("")
            .contains("not kernel text"),
        "{ver}: {st:?}"
    );
    // Listed: the same frames and verdict as the original stack.
    o.aliases = vec![(TRAMP_RET, ret)];
    let st = task_stack(&o, m, t).unwrap();
    let addrs = |s: &introspect::stack::Stack| s.frames.iter().map(|f| f.addr).collect::<Vec<_>>();
    assert_eq!(addrs(&st), addrs(&want), "{ver}");
    assert!(st.reliable, "{ver}: {st:?}");
    eprintln!(
        "{ver}: pid {} {:?}",
        t.pid,
        want.frames.iter().map(|f| &f.symbol).collect::<Vec<_>>()
    );
}

#[test]
fn aliased_return_addresses_6_1() {
    aliased("6.1");
}

#[test]
fn aliased_return_addresses_6_12() {
    aliased("6.12");
}
