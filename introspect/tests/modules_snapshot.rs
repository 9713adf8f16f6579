//! The module layouts read from the snapshots' own BTF: `struct module` (6.1 `core_layout` /
//! `init_layout`, 6.12 `mem[]`), `struct mod_kallsyms`, `struct kernel_symbol` (PREL32 on
//! x86-64) and `Elf64_Sym`; the snapshot guests load no module, so the readers answer empty.

mod stacks_support;

use introspect::modsyms::{ElfSymLayout, KernelSymbolLayout};
use introspect::modules::RegionLayout;
use introspect::RegionKind;
use stacks_support::*;

fn check(ver: &'static str, mem_array: bool) {
    let s = load(ver);
    let m = s.kernel.model(&s.mem).unwrap();
    let l = m.modules.as_ref().expect("struct module layout from BTF");
    let btf = &m.btf;
    match &l.regions {
        RegionLayout::Mem(r) => {
            assert!(mem_array, "{ver}: mem[] layout on a 6.1 kernel");
            let kinds: Vec<RegionKind> = r.iter().map(|x| x.0).collect();
            assert_eq!(kinds, RegionKind::ALL, "{ver}");
            let stride = btf.struct_size("module_memory").unwrap();
            for w in r.windows(2) {
                assert_eq!(w[1].1 - w[0].1, stride, "{ver}: mem[] stride");
            }
        }
        RegionLayout::Layouts { core, init } => {
            assert!(!mem_array, "{ver}: core_layout on a 6.4+ kernel");
            assert_eq!(
                core.base,
                btf.member_offset("module", "core_layout").unwrap(),
                "{ver}"
            );
            assert_eq!(init.size - init.base, core.size - core.base, "{ver}");
        }
    }
    let k = l.kallsyms.as_ref().expect("mod_kallsyms layout from BTF");
    assert_eq!(k.sym, ElfSymLayout::ELF64, "{ver}: Elf64_Sym");
    assert!(
        matches!(
            k.ksym,
            KernelSymbolLayout::Relative {
                size: 12,
                value: 0,
                name: 4
            }
        ),
        "{ver}: kernel_symbol {:?}",
        k.ksym
    );
    assert_eq!(
        (k.symtab, k.num_symtab, k.strtab, k.typetab),
        (0, 8, 16, 24),
        "{ver}: mod_kallsyms"
    );
    assert_eq!(
        k.kallsyms,
        btf.member_offset("module", "kallsyms").unwrap(),
        "{ver}"
    );
    assert!(s.kernel.modules(&s.mem).unwrap().is_empty(), "{ver}");
    assert!(s.kernel.module_symbols(&s.mem).unwrap().is_empty(), "{ver}");
    assert!(matches!(
        s.kernel
            .lookup_in_module(&s.mem, "isofs", "isofs_mount", None),
        Err(introspect::ModuleError::NoModule(_))
    ));
}

#[test]
fn module_layouts_6_1() {
    check("6.1", false);
}

#[test]
fn module_layouts_6_12() {
    check("6.12", true);
}
