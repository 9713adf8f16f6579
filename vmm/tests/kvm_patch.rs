//! Issue acceptance on KVM: the patch engine live-patches a function in a small guest the test
//! assembles (its symbols given explicitly, like a kernel's), on this machine's /dev/kvm. The
//! guest prints what the function returns; the output changes after load and changes back after
//! unload, and the function's bytes are restored exactly.

mod kvm_common;

use std::time::Duration;

use iced_x86::code_asm::*;
use kvm_common::{assemble, require_kvm, temp_path, wait_until};
use patcher::build::{compile, BuildOptions};
use patcher::{Engine, GuestControl, KernelPaging, SymbolMap, Target};
use vmm::kvm::{EntryMode, RawConfig, RawVcpu, SerialOut, Vm};

/// Where the guest's "kernel image" is linked, as in Linux.
const TEXT: u64 = 0xffff_ffff_8100_0000;
/// Where it lives physically (one 2 MiB page).
const CODE_PA: u64 = 0x20_0000;
/// Kernel-half page tables: PML4[511] -> PDPT_HI[510] -> PD_HI[8] = the 2 MiB text page.
const PML4: u64 = 0x9000;
const PDPT_HI: u64 = 0x30_0000;
const PD_HI: u64 = 0x30_1000;
const STACK_TOP: u64 = 0x8_0000;

const PATCH: &str = r#"
#include <hvpatch.h>
HVPATCH_NAME("kvm-fn-a");
static int new_fn_a(void) { return 'B'; }
HVPATCH_FUNC(fn_a, new_fn_a);
"#;

fn entry(pa: u64, flags: u64) -> Vec<u8> {
    (pa | flags).to_le_bytes().to_vec()
}

/// fn_a: an ftrace-style entry (NOP5), returns 'A'. main: forever print fn_a() on COM1.
fn guest_code() -> (Vec<u8>, u64, u64) {
    let (bytes, labels) = assemble(TEXT, |a| {
        let mut fn_a = a.create_label();
        let mut main = a.create_label();
        let mut delay = a.create_label();
        a.set_label(&mut fn_a)?;
        a.db(&[0x0f, 0x1f, 0x44, 0x00, 0x00])?;
        a.mov(eax, 'A' as u32)?;
        a.ret()?;
        a.set_label(&mut main)?;
        a.call(fn_a)?;
        a.mov(dx, 0x3f8u32)?;
        a.out(dx, al)?;
        a.mov(ecx, 20_000u32)?;
        a.set_label(&mut delay)?;
        a.dec(ecx)?;
        a.jnz(delay)?;
        a.jmp(main)?;
        Ok(vec![fn_a, main])
    });
    (bytes, labels[0], labels[1])
}

#[test]
fn engine_patches_an_assembled_guest_on_kvm() {
    require_kvm();
    let (code, fn_a, main) = guest_code();
    assert_eq!(fn_a, TEXT);
    let mut pdpt = vec![0u8; 4096];
    pdpt[510 * 8..511 * 8].copy_from_slice(&entry(PD_HI, 0x3));
    let mut pd = vec![0u8; 4096];
    pd[8 * 8..9 * 8].copy_from_slice(&entry(CODE_PA, 0x83));
    let serial = temp_path("kvm-patch-serial.txt");
    let mut gprs = [0u64; 16];
    gprs[7] = STACK_TOP;
    let cfg = RawConfig {
        memory: 64 << 20,
        code: vec![
            (CODE_PA, code.clone()),
            (PDPT_HI, pdpt),
            (PD_HI, pd),
            (PML4 + 511 * 8, entry(PDPT_HI, 0x3)),
        ],
        vcpus: vec![RawVcpu { rip: main, gprs }],
        mode: EntryMode::Long64,
        serial: SerialOut::File(serial.clone()),
        patch_arena: 2 << 20,
    };
    let mut vm = Vm::create_raw(&cfg).expect("create VM");
    vm.start().expect("start");
    let mut ctl = vm.control();
    let output = || std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || output().len() >= 3),
        "guest printed nothing: {:?}",
        output()
    );
    assert!(
        output().chars().all(|c| c == 'A'),
        "before the patch: {:?}",
        output()
    );

    // Build the patch with the real compiler flags, link it against explicit symbols.
    let src = temp_path("kvm-fn-a.c");
    let obj = temp_path("kvm-fn-a.o");
    std::fs::write(&src, PATCH).unwrap();
    compile(&BuildOptions::new(&src, &obj)).expect("hvpatch build");
    let object = std::fs::read(&obj).unwrap();
    let mut syms = SymbolMap::new();
    syms.insert("_text", TEXT);
    syms.insert("fn_a", fn_a);
    syms.insert("_end", TEXT + 0x1000);
    ctl.pause().unwrap();
    // Not a Linux guest: no PTI pair, so the page-table root is CR3's address bits as they are
    // (`KernelPaging::from_regs` would clear bit 12, the PTI user-PGD bit).
    let regs = ctl.regs(0).unwrap();
    let paging = KernelPaging {
        pgd_pa: regs.cr3 & 0x000f_ffff_ffff_f000,
        la57: regs.la57(),
        nx: regs.efer & (1 << 11) != 0,
    };
    ctl.resume().unwrap();
    let target = Target {
        symbols: &syms,
        paging,
    };
    let mut original = vec![0u8; code.len()];
    ctl.memory().read_phys(CODE_PA, &mut original).unwrap();

    let mut engine = Engine::new();
    let info = engine
        .load(&mut ctl, &target, &object, "kvm-fn-a.o")
        .expect("load");
    assert_eq!(info.functions[0].old_addr, fn_a);
    let (arena_pa, arena_len) = ctl.patch_arena().expect("the VMM reserves an arena");
    assert!(
        info.code
            .pages
            .iter()
            .all(|p| (arena_pa..arena_pa + arena_len).contains(p)),
        "patch code outside the e820-reserved arena: {:?}",
        info.code.pages
    );
    let mark = output().len();
    assert!(
        wait_until(Duration::from_secs(30), || output()[mark..].contains("BBB")),
        "after load the guest still prints {:?}",
        &output()[mark..]
    );

    engine.unload(&mut ctl, "kvm-fn-a").expect("unload");
    let mark = output().len();
    assert!(
        wait_until(Duration::from_secs(30), || output()[mark..]
            .ends_with("AAA")),
        "after unload the guest prints {:?}",
        &output()[mark..]
    );
    let mut restored = vec![0u8; code.len()];
    ctl.memory().read_phys(CODE_PA, &mut restored).unwrap();
    assert_eq!(restored, original, "function bytes not restored exactly");
    vm.stop();
    vm.wait_exit().expect("VM ends cleanly");
}
