//! Module text in a stack: a synthetic module (struct module, text range and ORC tables laid out
//! with the guest's own BTF offsets, in unmapped module space via an overlay) is linked into the
//! real `modules` list of the 6.12 snapshot, and a sleeping task's return address is moved into
//! its text. With the module the stack stays reliable; without it, or without module ORC, it is
//! unreliable — like the kernel's `__kernel_text_address` / `orc_find`.

mod stacks_support;

use introspect::model::GuestAccess;
use introspect::stack::task_stack;
use stacks_support::*;

const MOD: u64 = 0xffff_ffff_c020_0000;
const TEXT: u64 = 0xffff_ffff_c010_0000;
const ORC_IP: u64 = 0xffff_ffff_c030_0000;
const ORC: u64 = 0xffff_ffff_c030_1000;

fn check(ver: &'static str) {
    let s = load(ver);
    let g = introspect::model::KernelGuest {
        kernel: &s.kernel,
        mem: &s.mem,
    };
    let m = s.kernel.model(&s.mem).unwrap();
    let btf = &m.btf;
    assert!(
        s.kernel.modules(&s.mem).unwrap().is_empty(),
        "snapshot has no modules"
    );
    let tasks = s.kernel.tasks(&s.mem, &s.regs).unwrap();
    let t = tasks.iter().find(|t| t.comm == "kthreadd").unwrap();
    let st = s.kernel.task_stack(&s.mem, t).unwrap();
    assert!(st.reliable);
    // The return address into kthreadd (caller of schedule()).
    let x = st
        .frames
        .iter()
        .find(|f| f.symbol.as_ref().unwrap().0 == "kthreadd")
        .unwrap()
        .addr;
    let mut slot = t.thread_sp;
    while g.read_u64(slot).unwrap() != x {
        slot += 8;
        assert!(slot < t.stack_base + 0x4000);
    }
    let entry_idx = m.orc.index_of(x - 1).unwrap();
    let entry = {
        let e0 = g.symbol("__start_orc_unwind").unwrap();
        let mut b = [0u8; 6];
        g.read_virt(e0 + 6 * entry_idx as u64, &mut b).unwrap();
        b
    };
    let ret = TEXT + 0x101;

    let build = |with_module: bool, with_orc: bool| {
        let mut o = Overlay::new(&s);
        o.put_u64(slot, ret);
        if with_module {
            let head = g.symbol("modules").unwrap();
            let list = btf.member_offset("module", "list").unwrap();
            o.put(MOD, &[0u8; 0x400]);
            o.put_u64(head, MOD + list);
            o.put_u64(MOD + list, head);
            o.put_u64(MOD + list + 8, head);
            o.put(
                MOD + btf.member_offset("module", "name").unwrap(),
                b"fake\0",
            );
            let (base, size) = if let Ok(mem) = btf.member_offset("module", "mem") {
                let text = btf.enum_value("MOD_TEXT").unwrap() as u64;
                let at = mem + text * btf.struct_size("module_memory").unwrap();
                (
                    at + btf.member_offset("module_memory", "base").unwrap(),
                    at + btf.member_offset("module_memory", "size").unwrap(),
                )
            } else {
                let at = btf.member_offset("module", "core_layout").unwrap();
                (
                    at + btf.member_offset("module_layout", "base").unwrap(),
                    at + btf.member_offset("module_layout", "text_size").unwrap(),
                )
            };
            o.put_u64(MOD + base, TEXT);
            o.put(MOD + size, &0x1000u32.to_le_bytes());
            if with_orc {
                o.put_u64(
                    MOD + btf.member_offset("module", "arch.orc_unwind_ip").unwrap(),
                    ORC_IP,
                );
                o.put_u64(
                    MOD + btf.member_offset("module", "arch.orc_unwind").unwrap(),
                    ORC,
                );
                o.put(
                    MOD + btf.member_offset("module", "arch.num_orcs").unwrap(),
                    &2u32.to_le_bytes(),
                );
                for (i, ip) in [TEXT, TEXT + 0x200].into_iter().enumerate() {
                    let at = ORC_IP + 4 * i as u64;
                    o.put(at, &(ip.wrapping_sub(at) as i32).to_le_bytes());
                }
                o.put(ORC, &entry);
                o.put(ORC + 6, &[0u8; 6]);
            }
        }
        o
    };

    let o = build(true, true);
    let mods = introspect::modules::read_modules(&o, m.modules.as_ref().unwrap()).unwrap();
    assert_eq!(mods.len(), 1);
    assert_eq!(
        (mods[0].name.as_str(), mods[0].text[0]),
        ("fake", (TEXT, TEXT + 0x1000))
    );
    let st2 = task_stack(&o, m, t).unwrap();
    assert!(st2.reliable, "{ver}: {:?}", st2.reason);
    let want: Vec<u64> = st
        .frames
        .iter()
        .map(|f| if f.addr == x { ret } else { f.addr })
        .collect();
    assert_eq!(st2.frames.iter().map(|f| f.addr).collect::<Vec<_>>(), want);

    let st3 = task_stack(&build(false, false), m, t).unwrap();
    assert!(
        !st3.reliable && st3.reason.as_deref().unwrap().contains("not kernel text"),
        "{st3:?}"
    );

    let st4 = task_stack(&build(true, false), m, t).unwrap();
    assert!(
        !st4.reliable && st4.reason.as_deref().unwrap().contains("no ORC entry"),
        "{st4:?}"
    );

    // A module list that loops back on itself is ignored (treated as no modules).
    let mut o = build(true, true);
    let list = btf.member_offset("module", "list").unwrap();
    o.put_u64(MOD + list, MOD + list);
    assert!(introspect::modules::read_modules(&o, m.modules.as_ref().unwrap()).is_err());
    assert!(!task_stack(&o, m, t).unwrap().reliable);
}

#[test]
fn module_text_6_12() {
    check("6.12");
}

#[test]
fn module_text_6_1() {
    check("6.1");
}
