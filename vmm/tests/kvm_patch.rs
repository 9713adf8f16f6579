//! Issue acceptance on KVM: the patch engine live-patches a function in a small guest the test
//! assembles (its symbols given explicitly, like a kernel's), on this machine's /dev/kvm. The
//! guest prints what the function returns; the output changes after load and changes back after
//! unload, and the function's bytes are restored exactly.

mod kvm_common;

use std::time::Duration;

use iced_x86::code_asm::*;
use kvm_common::{
    assemble, kernel_half_guest, raw_paging, require_kvm, temp_path, wait_until, KTEXT, KTEXT_PA,
};
use patcher::build::{compile, BuildOptions};
use patcher::{Engine, GuestControl, SymbolMap, Target};
use vmm::kvm::{SerialOut, Vm};

const PATCH: &str = r#"
#include <hvpatch.h>
HVPATCH_NAME("kvm-fn-a");
static int new_fn_a(void) { return 'B'; }
HVPATCH_FUNC(fn_a, new_fn_a);
"#;

/// fn_a: an ftrace-style entry (NOP5), returns 'A'. main: forever print fn_a() on COM1.
fn guest_code() -> (Vec<u8>, u64, u64) {
    let (bytes, labels) = assemble(KTEXT, |a| {
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
    assert_eq!(fn_a, KTEXT);
    let serial = temp_path("kvm-patch-serial.txt");
    let cfg = kernel_half_guest(code.clone(), main, SerialOut::File(serial.clone()));
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
    syms.insert("_text", KTEXT);
    syms.insert("fn_a", fn_a);
    syms.insert("_end", KTEXT + 0x1000);
    ctl.pause().unwrap();
    let paging = raw_paging(&ctl.regs(0).unwrap());
    ctl.resume().unwrap();
    let target = Target {
        symbols: &syms,
        paging,
    };
    let mut original = vec![0u8; code.len()];
    ctl.memory().read_phys(KTEXT_PA, &mut original).unwrap();

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

    engine
        .unload(
            &mut ctl,
            "kvm-fn-a",
            &patcher::reach::BareVcpus { paging },
            std::time::Duration::from_secs(5),
        )
        .expect("unload");
    let mark = output().len();
    assert!(
        wait_until(Duration::from_secs(30), || output()[mark..]
            .ends_with("AAA")),
        "after unload the guest prints {:?}",
        &output()[mark..]
    );
    let mut restored = vec![0u8; code.len()];
    ctl.memory().read_phys(KTEXT_PA, &mut restored).unwrap();
    assert_eq!(restored, original, "function bytes not restored exactly");
    vm.stop();
    vm.wait_exit().expect("VM ends cleanly");
}
