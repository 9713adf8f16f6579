//! Unwinds every task and vCPU of the memory snapshots and compares with the guest's own
//! /proc/PID/stack and ps output.

mod stacks_support;

use introspect::model::Model;
use stacks_support::*;

fn check(ver: &str) {
    let regs = parse_regs(&String::from_utf8(read_dump(ver, "regs.txt")).unwrap());
    assert_eq!(regs.len(), 2, "regs.txt should have 2 vCPUs");
    let g = KallsymsGuest::load(ver, &regs);
    let m = Model::build(&g).unwrap();
    let tasks = introspect::tasks::list_tasks(&g, &m, &regs).unwrap();
    for t in &tasks {
        let s = introspect::stack::task_stack(&g, &m, t).unwrap();
        println!("{} {} {} {:?} {:?}", t.pid, t.comm, t.state_char, s.reliable, s.reason);
        for l in introspect::stack::proc_stack_view(&m, &s) {
            println!("   {l}");
        }
    }
    for v in 0..regs.len() {
        let s = introspect::stack::vcpu_stack(&g, &m, &regs, v).unwrap();
        println!("vcpu{v} {:?} {:?} {:?}", s.kind, s.reliable, s.reason);
        for f in &s.frames { println!("   {}", f.render()); }
    }
}

#[test]
fn snapshot_6_12() {
    check("6.12");
}

#[test]
fn snapshot_6_1() {
    check("6.1");
}
