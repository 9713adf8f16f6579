//! The engine on a tiny hand-made guest (no Linux): explicit symbols, explicit page tables and
//! a host arena — the shape of the KVM VMM's small assembled guest.

mod common;

use common::{build_c, Ram, SnapGuest};
use introspect::VcpuRegs;
use patcher::arena::ArenaSource;
use std::time::Duration;

use patcher::reach::BareVcpus;
use patcher::{Engine, KernelPaging, PatchError, PatchState, SymbolMap, Target};

const NO_WAIT: Duration = Duration::ZERO;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const CODE_PA: u64 = 0x20_0000;
const TEXT: u64 = 0xffff_ffff_8100_0000;
const ARENA: (u64, u64) = (0x40_0000, 0x10_0000);

fn put(ram: &mut [u8], pa: u64, v: &[u8]) {
    ram[pa as usize..pa as usize + v.len()].copy_from_slice(v);
}

fn tiny_guest() -> (SnapGuest, SymbolMap) {
    let mut ram = vec![0u8; 8 << 20];
    // PML4[511] -> PDPT[510] -> PD[8] = 2 MiB page at CODE_PA (TEXT = 0xffffffff81000000).
    put(&mut ram, PML4 + 511 * 8, &(PDPT | 0x3).to_le_bytes());
    put(&mut ram, PDPT + 510 * 8, &(PD | 0x3).to_le_bytes());
    put(&mut ram, PD + 8 * 8, &(CODE_PA | 0x83).to_le_bytes());
    // fn_a: NOP5; mov $1,%eax; ret.   fn_b (endbr64 first): endbr64; NOP5; xor %eax,%eax; ret
    put(
        &mut ram,
        CODE_PA,
        &[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xb8, 1, 0, 0, 0, 0xc3],
    );
    put(
        &mut ram,
        CODE_PA + 0x40,
        &[
            0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x31, 0xc0, 0xc3,
        ],
    );
    // fn_c: no NOP site.
    put(
        &mut ram,
        CODE_PA + 0x80,
        &[0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3],
    );
    let mut syms = SymbolMap::new();
    syms.insert("_text", TEXT);
    syms.insert("fn_a", TEXT);
    syms.insert("fn_b", TEXT + 0x40);
    syms.insert("fn_c", TEXT + 0x80);
    syms.insert("counter_base", TEXT + 0x1000);
    syms.insert("_end", TEXT + 0x2000);
    let regs = VcpuRegs {
        cr0: 0x8000_0011,
        cr3: PML4,
        cr4: 0x20,
        efer: 0x500,
        rip: TEXT + 5,
        ..Default::default()
    };
    let mut g = common::snap_guest_default();
    g.ram = Ram(ram);
    g.vcpus = vec![regs];
    g.arena = Some(ARENA);
    (g, syms)
}

#[test]
fn patches_a_small_guest_with_explicit_symbols() {
    let (mut g, syms) = tiny_guest();
    let orig = g.ram.0.clone();
    let paging = KernelPaging {
        pgd_pa: PML4,
        la57: false,
        nx: false,
    };
    let t = Target {
        symbols: &syms,
        paging,
    };
    let obj = build_c(
        "tiny",
        "extern int fn_c(void);\n\
         static int new_a(void) { return 42 + fn_c(); }\n\
         static int new_b(void) { return 7; }\n\
         HVPATCH_FUNC(fn_a, new_a);\nHVPATCH_FUNC(fn_b, new_b);",
    );
    let mut e = Engine::new();
    let info = e.load(&mut g, &t, &obj, "tiny.o").unwrap();
    assert!(matches!(
        e.arena().unwrap().source,
        ArenaSource::Host { .. }
    ));
    // Arena pages from the host range; slot = first 2 MiB after _end.
    assert!(info
        .code
        .pages
        .iter()
        .all(|&p| (ARENA.0..ARENA.0 + ARENA.1).contains(&p)));
    assert_eq!(info.code.va & !0x1f_ffff, TEXT + 0x20_0000);
    let a = info
        .functions
        .iter()
        .find(|f| f.old_name == "fn_a")
        .unwrap();
    let b = info
        .functions
        .iter()
        .find(|f| f.old_name == "fn_b")
        .unwrap();
    assert_eq!((a.site, b.site), (TEXT, TEXT + 0x44));
    let jmp = |site: u64, at: u64| {
        let pa = (at) as usize;
        let d = i32::from_le_bytes(g.ram.0[pa + 1..pa + 5].try_into().unwrap());
        assert_eq!(g.ram.0[pa], 0xe9);
        site.wrapping_add(5).wrapping_add(d as i64 as u64)
    };
    assert_eq!(jmp(a.site, CODE_PA), a.new_addr);
    assert_eq!(jmp(b.site, CODE_PA + 0x44), b.new_addr);
    // The PMD now points at a page table in the arena; the code PTE is present, read-only,
    // and without NX (EFER.NXE is off in this guest).
    let (pmd_pa, pmd) = paging.pmd_entry(&g.ram, info.code.va).unwrap().unwrap();
    assert_eq!(pmd_pa, PD + 9 * 8);
    let pt = pmd & 0x000f_ffff_ffff_f000;
    assert!((ARENA.0..ARENA.0 + ARENA.1).contains(&pt));
    let idx = (info.code.va >> 12) & 511;
    let pte = u64::from_le_bytes(
        g.ram.0[(pt + idx * 8) as usize..(pt + idx * 8 + 8) as usize]
            .try_into()
            .unwrap(),
    );
    assert_eq!(pte & 0x3, 0x1, "present, not writable");
    assert_eq!(pte >> 63, 0, "no NX without EFER.NXE");
    // The call to fn_c from the new code reaches fn_c.
    let mut code = vec![0u8; info.code.len as usize];
    paging.read_virt(&g.ram, info.code.va, &mut code).unwrap();
    let calls_fn_c = (1..code.len() - 4).any(|i| {
        matches!(code[i - 1], 0xe8 | 0xe9) && {
            let d = i32::from_le_bytes(code[i..i + 4].try_into().unwrap());
            (info.code.va + i as u64 + 4).wrapping_add(d as i64 as u64) == TEXT + 0x80
        }
    });
    assert!(calls_fn_c, "no call to fn_c in {code:02x?}");
    // fn_c has no NOP site: refused.
    let bad = build_c(
        "tiny-c",
        "static int n(void) { return 0; }\nHVPATCH_FUNC(fn_c, n);",
    );
    let err = e.load(&mut g, &t, &bad, "c.o").unwrap_err();
    assert!(
        err.to_string().contains("fn_c") && err.to_string().contains("unexpected bytes"),
        "{err}"
    );
    // Unload: byte-for-byte original memory.
    e.unload(&mut g, "tiny", &BareVcpus { paging }, NO_WAIT)
        .unwrap();
    assert!(g.ram.0 == orig, "memory differs after unload");
}

#[test]
fn unload_disables_at_once_and_frees_only_when_unreachable() {
    let (mut g, syms) = tiny_guest();
    let paging = KernelPaging {
        pgd_pa: PML4,
        la57: false,
        nx: false,
    };
    let t = Target {
        symbols: &syms,
        paging,
    };
    let reach = BareVcpus { paging };
    let orig = g.ram.0.clone();
    let obj = build_c(
        "busy",
        "static int n(void) { return 1; }\nHVPATCH_FUNC(fn_a, n);",
    );
    let mut e = Engine::new();
    let info = e.load(&mut g, &t, &obj, "busy.o").unwrap();
    let site_pa = (info.functions[0].site - TEXT + CODE_PA) as usize;
    let code_pa = info.code.pages[0] as usize;
    let loaded_code = g.ram.0[code_pa..code_pa + 16].to_vec();
    // A vCPU executes the patch: unload disables it (the entry NOP is back) but keeps the
    // code, and says who holds it.
    g.vcpus[0].rip = info.functions[0].new_addr + 1;
    let err = e.unload(&mut g, "busy", &reach, NO_WAIT).unwrap_err();
    assert!(
        matches!(err, PatchError::Held { .. }) && err.to_string().contains("vCPU 0"),
        "{err}"
    );
    assert_eq!(g.ram.0[site_pa..site_pa + 5], orig[site_pa..site_pa + 5]);
    assert_eq!(
        g.ram.0[code_pa..code_pa + 16],
        loaded_code[..],
        "held code was touched"
    );
    assert!(!g.is_paused_for_test());
    let held = e.info("busy").unwrap();
    assert_eq!(held.state, PatchState::Held);
    assert!(!held.functions[0].active);
    let hold = held.held.expect("why it is held");
    assert_eq!(hold.kinds, vec!["code in rip".to_string()], "{hold:?}");
    // A new patch of the same name loads meanwhile; the held one stays.
    let info2 = e.load(&mut g, &t, &obj, "busy.o").unwrap();
    assert_ne!(info2.code.va, info.code.va);
    e.unload(&mut g, "busy", &reach, NO_WAIT).unwrap();
    assert_eq!(e.list().len(), 1);
    // A return address into the patch on the vCPU's kernel stack (the patch called something
    // that is running now) also holds it. Stack: a page mapped at TEXT + 0x10_0000.
    g.vcpus[0].rip = TEXT + 5;
    let stack_va = TEXT + 0x10_0000;
    let stack_pa = CODE_PA + 0x10_0000;
    let ret = info.functions[0].new_addr + 9;
    g.ram.0[(stack_pa + 0x3f80) as usize..(stack_pa + 0x3f88) as usize]
        .copy_from_slice(&ret.to_le_bytes());
    g.vcpus[0].gprs[VcpuRegs::RSP] = stack_va + 0x3f00;
    assert!(e.reap(&mut g, &reach).unwrap().is_empty());
    let by = e.info("busy").unwrap().held.unwrap().by;
    assert!(by.contains(&format!("{:#x}", stack_va + 0x3f80)), "{by}");
    // A data pointer in a register holds it too.
    g.vcpus[0].gprs[VcpuRegs::RSP] = stack_va + 0x3f90;
    g.vcpus[0].gprs[3] = info.data.va + 8;
    assert!(e.reap(&mut g, &reach).unwrap().is_empty());
    assert_eq!(
        e.info("busy").unwrap().held.unwrap().kinds,
        vec!["data in register".to_string()]
    );
    // Once nothing refers to it, the next check frees it: memory as before the first load.
    g.vcpus[0].gprs[3] = 0;
    assert_eq!(e.reap(&mut g, &reach).unwrap(), vec!["busy".to_string()]);
    assert!(e.list().is_empty());
    g.ram.0[(stack_pa + 0x3f80) as usize..(stack_pa + 0x3f88) as usize].fill(0);
    assert!(
        g.ram.0 == orig,
        "memory differs after the held patch was freed"
    );
}
