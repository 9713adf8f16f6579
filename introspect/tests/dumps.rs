//! Kernel model on real guest snapshots (6.1 4-level, 6.12 5-level, KASLR on, PTI on),
//! compared with the guest's own /proc/kallsyms, /proc/PID/stack and uname.

mod common;

use common::Dump;
use introspect::{Kernel, SliceMemory};

fn open(d: &Dump) -> Kernel {
    let mem = SliceMemory::flat(&d.ram);
    let t = std::time::Instant::now();
    let k = Kernel::open(&mem, &d.vcpus).unwrap_or_else(|e| panic!("{}: Kernel::open: {e}", d.version));
    eprintln!("{}: Kernel::open took {:?}; info = {:#x?}", d.version, t.elapsed(), k.info().slide_report);
    k
}

#[test]
fn smoke_6_12() {
    let d = common::dump_6_12();
    let k = open(d);
    let cmp = introspect::kallsyms::compare_with_proc(k.symbols(), &d.kallsyms);
    eprintln!("{cmp:?} {:?}", k.info().kallsyms);
}

#[test]
fn smoke_6_1() {
    let d = common::dump_6_1();
    let k = open(d);
    let cmp = introspect::kallsyms::compare_with_proc(k.symbols(), &d.kallsyms);
    eprintln!("{cmp:?} {:?}", k.info().kallsyms);
}
