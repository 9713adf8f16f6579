//! BTF read from guest memory of the snapshots, cross-checked against KERNEL-FACTS §5 tables
//! (the tables are used here only; product code takes every offset from BTF).

mod stacks_support;

use introspect::btf::BtfError;
use stacks_support::*;

fn common(ver: &'static str) -> (Snapshot, Vec<(&'static str, &'static str, u64)>) {
    let s = load(ver);
    let checks = vec![
        ("list_head", "next", 0),
        ("list_head", "prev", 8),
        ("task_struct", "thread_info.flags", 0),
        ("task_struct", "thread_info.cpu", 0x14),
        ("task_struct", "__state", 0x18),
        ("task_struct", "stack", 0x20),
        ("task_struct", "flags", 0x2c),
        ("task_struct", "on_cpu", 0x34),
        ("task_struct", "comm", 0xba0),
        ("task_struct", "patch_state", 0x145c),
        ("task_struct", "thread_node", 0xa30),
        ("task_struct", "cred", 0xb90),
        ("inactive_task_frame", "r15", 0),
        ("inactive_task_frame", "bp", 0x28),
        ("inactive_task_frame", "ret_addr", 0x30),
        ("pt_regs", "r15", 0),
        ("pt_regs", "bp", 0x20),
        ("pt_regs", "r10", 0x38),
        ("pt_regs", "ax", 0x50),
        ("pt_regs", "di", 0x70),
        ("pt_regs", "orig_ax", 0x78),
        ("pt_regs", "ip", 0x80),
        ("pt_regs", "cs", 0x88),
        ("pt_regs", "sp", 0x98),
        ("pt_regs", "ss", 0xa0),
    ];
    (s, checks)
}

fn run(s: &Snapshot, checks: &[(&str, &str, u64)], sizes: &[(&str, u64)]) {
    let btf = s.kernel.btf(&s.mem).unwrap();
    assert!(
        btf.type_count() > 50_000,
        "{}: only {} BTF types",
        s.ver,
        btf.type_count()
    );
    for (st, m, want) in checks {
        assert_eq!(
            btf.member_offset(st, m).unwrap(),
            *want,
            "{}: {st}.{m}",
            s.ver
        );
    }
    for (st, want) in sizes {
        assert_eq!(
            btf.struct_size(st).unwrap(),
            *want,
            "{}: sizeof {st}",
            s.ver
        );
    }
    assert_eq!(btf.member("task_struct", "comm").unwrap().size, 16);
    assert_eq!(btf.member("new_utsname", "release").unwrap().size, 65);
    let rel = btf.member_offset("uts_namespace", "name.release").unwrap();
    assert_eq!(
        rel,
        btf.member_offset("uts_namespace", "name").unwrap() + 2 * 65
    ); // sysname, nodename, release
       // Bitfields and unknown members are errors, not garbage offsets.
    assert!(matches!(
        btf.member_offset("task_struct", "sched_reset_on_fork"),
        Err(BtfError::Bitfield(_))
    ));
    assert!(matches!(
        btf.member_offset("task_struct", "no_such_member"),
        Err(BtfError::UnknownMember { .. })
    ));
    assert!(matches!(
        btf.struct_size("no_such_struct"),
        Err(BtfError::UnknownStruct(_))
    ));
    // The release string read through BTF offsets from init_uts_ns matches uname.
    let ns = s.kernel.lookup("init_uts_ns", None).unwrap();
    let mut buf = [0u8; 65];
    s.kernel.read_virt(&s.mem, ns + rel, &mut buf).unwrap();
    let release =
        String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap()]).into_owned();
    let uname = text(s.ver, "uname.txt");
    assert_eq!(
        uname.split_whitespace().nth(2),
        Some(release.as_str()),
        "{}: release via BTF",
        s.ver
    );
}

#[test]
fn btf_6_1_matches_facts() {
    let (s, mut c) = common("6.1");
    c.extend([
        ("task_struct", "tasks", 0x890),
        ("task_struct", "mm", 0x8e0),
        ("task_struct", "exit_state", 0x904),
        ("task_struct", "pid", 0x970),
        ("task_struct", "tgid", 0x974),
        ("task_struct", "thread_group", 0xa20),
        ("task_struct", "thread", 0x14c0),
        ("task_struct", "thread.sp", 0x14d8),
        ("mm_struct", "pgd", 0x48),
        ("rq", "curr", 0x960),
        ("rq", "idle", 0x968),
        ("rq", "cpu", 0xa70),
    ]);
    run(
        &s,
        &c,
        &[
            ("task_struct", 0x2600),
            ("inactive_task_frame", 56),
            ("pt_regs", 0xa8),
            ("list_head", 16),
        ],
    );
    assert!(s.kernel.btf(&s.mem).unwrap().struct_id("pcpu_hot").is_err());
}

#[test]
fn btf_6_12_matches_facts() {
    let (s, mut c) = common("6.12");
    c.extend([
        ("task_struct", "tasks", 0x8b0),
        ("task_struct", "mm", 0x900),
        ("task_struct", "pid", 0x980),
        ("task_struct", "tgid", 0x984),
        ("task_struct", "thread.sp", 0x1518),
        ("mm_struct", "pgd", 0x78),
        ("pcpu_hot", "current_task", 0),
        ("pcpu_hot", "preempt_count", 8),
        ("pcpu_hot", "cpu_number", 0xc),
        ("pcpu_hot", "top_of_stack", 0x18),
        ("pcpu_hot", "hardirq_stack_ptr", 0x20),
    ]);
    run(
        &s,
        &c,
        &[
            ("inactive_task_frame", 56),
            ("pt_regs", 0xa8),
            ("pcpu_hot", 64),
        ],
    );
    let btf = s.kernel.btf(&s.mem).unwrap();
    assert!(btf.member_offset("task_struct", "thread_group").is_err());
    // pt_regs.cs lives in an anonymous union in 6.12 (FRED); the walk into it must work.
    assert_eq!(btf.member("pt_regs", "cs").unwrap().size, 2);
}

/// Random mutations and truncations of the real 6.1 BTF blob: parse and queries return
/// errors or values, never panic or hang.
#[test]
fn btf_real_blob_mutations() {
    use introspect::btf::Btf;
    let s = load("6.1");
    let g = introspect::model::KernelGuest {
        kernel: &s.kernel,
        mem: &s.mem,
    };
    use introspect::model::GuestAccess;
    let (a, b) = (
        g.symbol("__start_BTF").unwrap(),
        g.symbol("__stop_BTF").unwrap(),
    );
    let mut blob = vec![0u8; (b - a) as usize];
    g.read_virt(a, &mut blob).unwrap();
    let mut rng = Rng(0x0b7f);
    let mut parsed = 0;
    for i in 0..150 {
        let mut d = blob.clone();
        match i % 3 {
            // Header fields (lengths/offsets) get random values.
            0 => {
                let at = 4 + 4 * (rng.next() % 5) as usize;
                d[at..at + 4].copy_from_slice(&(rng.next() as u32).to_le_bytes());
            }
            // Random bytes anywhere in the first part of the type section.
            1 => {
                for _ in 0..64 {
                    let at = 24 + (rng.next() % 200_000) as usize;
                    d[at] = rng.next() as u8;
                }
            }
            _ => d.truncate((rng.next() % blob.len() as u64) as usize),
        }
        if let Ok(b) = Btf::parse(d) {
            parsed += 1;
            for (st, m) in [
                ("task_struct", "pid"),
                ("task_struct", "thread.sp"),
                ("pt_regs", "cs"),
            ] {
                let _ = b.member(st, m);
                let _ = b.struct_size(st);
            }
            let _ = b.enum_value("MODULE_STATE_UNFORMED");
        }
    }
    assert!(parsed > 0 && parsed < 150, "{parsed}");
}

#[test]
fn pt_regs_layout_matches_btf() {
    for ver in ["6.1", "6.12"] {
        let s = load(ver);
        let btf = s.kernel.btf(&s.mem).expect("BTF");
        assert_eq!(
            introspect::unwind::PtRegsLayout::from_btf(btf).unwrap(),
            introspect::unwind::PtRegsLayout::X86_64,
            "{ver}"
        );
    }
}
