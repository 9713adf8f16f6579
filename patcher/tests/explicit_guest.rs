//! The engine on a tiny hand-made guest (no Linux): explicit symbols, explicit page tables and
//! a host arena — the shape of the KVM VMM's small assembled guest.

mod common;

use common::{build_c, Ram, SnapGuest};
use introspect::VcpuRegs;
use patcher::arena::ArenaSource;
use patcher::{Engine, KernelPaging, SymbolMap, Target};

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
    e.unload(&mut g, "tiny").unwrap();
    assert!(g.ram.0 == orig, "memory differs after unload");
}

#[test]
fn unload_refuses_while_a_vcpu_runs_the_patch() {
    let (mut g, syms) = tiny_guest();
    let t = Target {
        symbols: &syms,
        paging: KernelPaging {
            pgd_pa: PML4,
            la57: false,
            nx: false,
        },
    };
    let obj = build_c(
        "busy",
        "static int n(void) { return 1; }\nHVPATCH_FUNC(fn_a, n);",
    );
    let mut e = Engine::new();
    let info = e.load(&mut g, &t, &obj, "busy.o").unwrap();
    let snapshot = g.ram.0.clone();
    g.vcpus[0].rip = info.functions[0].new_addr + 1;
    let err = e.unload(&mut g, "busy").unwrap_err();
    assert!(err.to_string().contains("vCPU 0"), "{err}");
    assert!(g.ram.0 == snapshot, "a refused unload wrote memory");
    assert!(!g.is_paused_for_test());
    // A return address into the patch on the vCPU's kernel stack (the patch called something
    // that is running now) also makes unload refuse. Stack: a page mapped at TEXT + 0x10_0000.
    g.vcpus[0].rip = TEXT + 5;
    let stack_va = TEXT + 0x10_0000;
    let stack_pa = CODE_PA + 0x10_0000;
    let ret = info.functions[0].new_addr + 9;
    g.ram.0[(stack_pa + 0x3f80) as usize..(stack_pa + 0x3f88) as usize]
        .copy_from_slice(&ret.to_le_bytes());
    g.vcpus[0].gprs[VcpuRegs::RSP] = stack_va + 0x3f00;
    let snapshot = g.ram.0.clone();
    let err = e.unload(&mut g, "busy").unwrap_err();
    assert!(
        err.to_string().contains("stack")
            && err
                .to_string()
                .contains(&format!("{:#x}", stack_va + 0x3f80)),
        "{err}"
    );
    assert!(g.ram.0 == snapshot);
    // A stack address above the 16 KiB-aligned end is not looked at.
    g.vcpus[0].gprs[VcpuRegs::RSP] = stack_va + 0x4000;
    e.unload(&mut g, "busy").unwrap();
}
