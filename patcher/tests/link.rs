//! Linker unit tests on real objects built by gcc from the C files in `tests/c/`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use introspect::SymbolError;
use patcher::build::{compile, BuildOptions};
use patcher::link::{link, pick_sympos, LinkError, Resolver};
use patcher::patchobj::{ObjectError, PatchObject};

fn build(name: &str, release: Option<&str>) -> Vec<u8> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/c")
        .join(name);
    // One output per call: tests build the same sources concurrently.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out =
        std::env::temp_dir().join(format!("hvpatch-test-{}-{n}-{name}.o", std::process::id()));
    let mut o = BuildOptions::new(&src, &out);
    o.kernel_release = release.map(str::to_string);
    compile(&o).unwrap_or_else(|e| panic!("building {name} (needs gcc): {e}"));
    std::fs::read(&out).unwrap()
}

struct Map {
    syms: BTreeMap<&'static str, Vec<u64>>,
    thunk: Option<u64>,
}

impl Resolver for Map {
    fn resolve(&self, name: &str, sympos: u64) -> Result<u64, LinkError> {
        pick_sympos(
            name,
            self.syms.get(name).map(|v| v.as_slice()).unwrap_or(&[]),
            sympos,
        )
    }
    fn return_thunk(&self) -> Result<Option<u64>, LinkError> {
        Ok(self.thunk)
    }
}

const CODE: u64 = 0xffff_ffff_c020_0000;
const DATA: u64 = 0xffff_ffff_c020_8000;

fn map(thunk: Option<u64>) -> Map {
    let mut syms = BTreeMap::new();
    syms.insert("seq_printf", vec![0xffff_ffff_8130_0000]);
    syms.insert("cmdline_proc_show", vec![0xffff_ffff_8140_0000]);
    syms.insert("nr_processes", vec![0xffff_ffff_8150_0000]);
    syms.insert(
        "dup_static",
        vec![0xffff_ffff_8160_0000, 0xffff_ffff_8170_0000],
    );
    syms.insert("other_fn", vec![0xffff_ffff_8180_0000]);
    syms.insert("__x86_return_thunk", vec![0xffff_ffff_8190_0000]);
    syms.insert("__x86_indirect_thunk_rax", vec![0xffff_ffff_8191_0000]);
    syms.insert("__x86_indirect_thunk_r11", vec![0xffff_ffff_8191_0040]);
    Map { syms, thunk }
}

fn rel32_target(code: &[u8], at: usize) -> u64 {
    let v = i32::from_le_bytes(code[at..at + 4].try_into().unwrap());
    (CODE + at as u64 + 4).wrapping_add(v as i64 as u64)
}

/// Finds every `e8/e9 rel32` whose target is `target`.
fn branches_to(code: &[u8], target: u64) -> Vec<(u8, usize)> {
    (1..code.len().saturating_sub(4))
        .filter(|&i| matches!(code[i - 1], 0xe8 | 0xe9) && rel32_target(code, i) == target)
        .map(|i| (code[i - 1], i - 1))
        .collect()
}

#[test]
fn cmdline_patch_links_with_ret_instead_of_return_thunk() {
    let bytes = build("cmdline.c", None);
    let obj = PatchObject::parse(&bytes, "cmdline.o").unwrap();
    assert_eq!(obj.name, "cmdline-fix");
    assert_eq!(obj.kernel_release, None);
    assert_eq!(obj.funcs.len(), 1);
    assert_eq!(obj.funcs[0].old_name, "cmdline_proc_show");
    assert_eq!(obj.funcs[0].new_name, "livepatch_cmdline_proc_show");
    assert!(
        obj.undefined.contains(&"seq_printf".to_string()),
        "{:?}",
        obj.undefined
    );
    let m = map(None);
    let l = link(&obj, &m, CODE, DATA).unwrap();
    assert_eq!(l.funcs[0].old_addr, 0xffff_ffff_8140_0000);
    let f = (l.funcs[0].new_addr - CODE) as usize;
    // -fcf-protection=branch: endbr64 first.
    assert_eq!(&l.code[f..f + 4], &[0xf3, 0x0f, 0x1e, 0xfa]);
    // A call or tail jump to seq_printf, none to the return thunk, and a `ret; int3` somewhere.
    assert!(!branches_to(&l.code, 0xffff_ffff_8130_0000).is_empty());
    assert!(branches_to(&l.code, 0xffff_ffff_8190_0000).is_empty());
    // The format string: a PC32/32S reference into the data part holding the text.
    let s = b"this has been live patched";
    assert!(l.data.windows(s.len()).any(|w| w == s));
}

#[test]
fn return_thunk_is_jmp_to_runtime_thunk_when_mitigated() {
    let bytes = build("counter.c", None);
    let obj = PatchObject::parse(&bytes, "counter.o").unwrap();
    let srso = 0xffff_ffff_81a0_0000;
    let l = link(&obj, &map(Some(srso)), CODE, DATA).unwrap();
    assert!(l.return_sites >= 1);
    let j = branches_to(&l.code, srso);
    assert!(
        !j.is_empty() && j.iter().all(|&(op, _)| op == 0xe9),
        "{j:?}"
    );
    assert!(branches_to(&l.code, 0xffff_ffff_8190_0000).is_empty());
    // Without mitigation: c3 cc cc cc cc replaces each.
    let l2 = link(&obj, &map(None), CODE, DATA).unwrap();
    assert_eq!(l2.return_sites, l.return_sites);
    for &(_, at) in &j {
        assert_eq!(&l2.code[at..at + 5], &[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
    }
}

#[test]
fn counter_patch_sympos_static_data_and_indirect_thunk() {
    let bytes = build("counter.c", None);
    let obj = PatchObject::parse(&bytes, "counter.o").unwrap();
    assert_eq!(obj.kernel_release.as_deref(), Some("6.1.0-56-cloud-amd64"));
    assert_eq!(obj.sympos.get("dup_static"), Some(&2));
    assert_eq!(obj.funcs.len(), 2);
    let other = obj.funcs.iter().find(|f| f.old_name == "other_fn").unwrap();
    assert_eq!(
        (other.sympos, other.flags, other.new_name.as_str()),
        (1, 1, "new_other")
    );
    let show = obj
        .funcs
        .iter()
        .find(|f| f.old_name == "cmdline_proc_show")
        .unwrap();
    assert_eq!(
        (show.sympos, show.flags, show.new_name.as_str()),
        (0, 0, "new_show")
    );
    let l = link(&obj, &map(None), CODE, DATA).unwrap();
    // dup_static resolved to the 2nd occurrence.
    assert!(
        !branches_to(&l.code, 0xffff_ffff_8170_0000).is_empty()
            || l.code
                .windows(4)
                .any(|w| w == (0x8170_0000u32 as i32).to_le_bytes())
    );
    assert!(branches_to(&l.code, 0xffff_ffff_8160_0000).is_empty());
    // indirect call through a retpoline thunk.
    let thunks = [0xffff_ffff_8191_0000u64, 0xffff_ffff_8191_0040];
    assert!(
        thunks.iter().any(|&t| !branches_to(&l.code, t).is_empty()),
        "no indirect thunk call"
    );
    // table[] initialised in data: 1,2,3,4 as u64.
    let t: Vec<u8> = [1u64, 2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert!(l.data.windows(32).any(|w| w == t.as_slice()));
    let other = l.funcs.iter().find(|f| f.old_name == "other_fn").unwrap();
    assert_eq!(other.old_addr, 0xffff_ffff_8180_0000);
}

#[test]
fn ambiguous_and_unknown_symbols_are_refused() {
    let bytes = build("counter.c", None);
    let mut obj = PatchObject::parse(&bytes, "counter.o").unwrap();
    obj.sympos.clear();
    let e = link(&obj, &map(None), CODE, DATA).unwrap_err();
    assert!(
        matches!(&e, LinkError::Symbol(SymbolError::Ambiguous { name, count: 2, .. }) if name == "dup_static"),
        "{e}"
    );
    let mut m = map(None);
    m.syms.remove("nr_processes");
    let obj = PatchObject::parse(&bytes, "counter.o").unwrap();
    let e = link(&obj, &m, CODE, DATA).unwrap_err();
    assert_eq!(
        e,
        LinkError::Symbol(SymbolError::Unknown {
            name: "nr_processes".into()
        })
    );
    assert!(e.to_string().contains("nr_processes"));
    obj_sympos_out_of_range();
}

fn obj_sympos_out_of_range() {
    let e = pick_sympos("x", &[1, 2], 3).unwrap_err();
    assert!(matches!(
        e,
        LinkError::Symbol(SymbolError::NoSuchPos {
            count: 2,
            sympos: 3,
            ..
        })
    ));
    assert!(e.to_string().contains("only 2 symbols"), "{e}");
    // klp's rule: sympos 0 needs one entry, even where aliases share an address.
    let e = pick_sympos("x", &[5, 5], 0).unwrap_err();
    assert!(
        e.to_string().contains("sympos 1 = 0x5, 2 = 0x5")
            && e.to_string().contains("HVPATCH_SYMPOS"),
        "{e}"
    );
    assert_eq!(pick_sympos("x", &[5, 5], 2).unwrap(), 5);
}

#[test]
fn out_of_range_rel32_is_refused_naming_symbol() {
    let bytes = build("cmdline.c", None);
    let obj = PatchObject::parse(&bytes, "cmdline.o").unwrap();
    let mut m = map(None);
    m.syms.insert("seq_printf", vec![0xffff_8880_0000_0000]);
    let e = link(&obj, &m, CODE, DATA).unwrap_err();
    match &e {
        LinkError::OutOfRange {
            symbol, section, ..
        } => {
            assert_eq!(symbol, "seq_printf");
            assert!(section.starts_with(".text"), "{section}");
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn kernel_release_is_recorded_by_build() {
    let bytes = build("cmdline.c", Some("6.12.117+deb12-cloud-amd64"));
    let obj = PatchObject::parse(&bytes, "x.o").unwrap();
    assert_eq!(
        obj.kernel_release.as_deref(),
        Some("6.12.117+deb12-cloud-amd64")
    );
}

#[test]
fn non_patch_inputs_are_refused() {
    let e = PatchObject::parse(b"hello world", "a.o").unwrap_err();
    assert!(matches!(e, ObjectError::NotElf { .. }), "{e}");
    assert!(e.to_string().contains("not an ELF"));
    // The test binary itself: an executable or PIE, not a relocatable object.
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let e = PatchObject::parse(&exe, "exe").unwrap_err();
    assert!(matches!(e, ObjectError::WrongKind { .. }), "{e}");
    // A 32-bit object.
    let mut b = build("cmdline.c", None);
    b[4] = 1;
    assert!(matches!(
        PatchObject::parse(&b, "a.o").unwrap_err(),
        ObjectError::WrongKind { .. }
    ));
    // Truncated garbage after a valid header must error, not panic.
    let b = build("cmdline.c", None);
    for cut in [20, 64, 200, b.len() / 2] {
        let _ = PatchObject::parse(&b[..cut], "cut.o");
    }
}

/// Corrupted objects (byte flips everywhere, truncations) never panic the parser or linker.
#[test]
fn corrupted_objects_never_panic() {
    let good = build("counter.c", None);
    let m = map(None);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut parsed = 0;
    for i in 0..3000 {
        let mut b = good.clone();
        let flips = 1 + (next() % 4) as usize;
        for _ in 0..flips {
            let at = (next() % b.len() as u64) as usize;
            b[at] = next() as u8;
        }
        if i % 10 == 0 {
            b.truncate((next() % b.len() as u64) as usize);
        }
        if let Ok(obj) = PatchObject::parse(&b, "fuzz.o") {
            parsed += 1;
            let _ = link(&obj, &m, CODE, DATA);
        }
    }
    assert!(
        parsed > 100,
        "mutations too destructive to exercise the linker ({parsed})"
    );
}

#[test]
fn build_command_line_has_kernel_flags() {
    let o = BuildOptions::new("p.c", "p.o");
    let argv = patcher::build::command_line(&o, std::path::Path::new("/inc"));
    for f in [
        "-mcmodel=kernel",
        "-mno-red-zone",
        "-mfunction-return=thunk-extern",
        "-fno-pic",
        "-I/inc",
    ] {
        assert!(argv.iter().any(|a| a == f), "{f} missing in {argv:?}");
    }
    assert_eq!(argv.last().map(String::as_str), Some("p.c"));
    // A compile error is reported with the compiler's message.
    let d = std::env::temp_dir().join(format!("hvpatch-bad-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("bad.c"), "int f( {").unwrap();
    let e = compile(&BuildOptions::new(d.join("bad.c"), d.join("bad.o"))).unwrap_err();
    assert!(e.to_string().contains("error"), "{e}");
    // A release mismatch between HVPATCH_KERNEL and --kernel-release is refused.
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/c/counter.c");
    let mut o = BuildOptions::new(&src, d.join("c.o"));
    o.kernel_release = Some("6.12.117+deb12-cloud-amd64".into());
    let e = compile(&o).unwrap_err();
    assert!(e.to_string().contains("6.1.0-56-cloud-amd64"), "{e}");
}

#[test]
fn objects_of_module_functions() {
    let obj = PatchObject::parse(&build("modobj.c", None), "modobj.o").unwrap();
    let by: BTreeMap<&str, (Option<&str>, u64)> = obj
        .funcs
        .iter()
        .map(|f| (f.old_name.as_str(), (f.object.as_deref(), f.sympos)))
        .collect();
    assert_eq!(by["cmdline_proc_show"], (None, 0));
    assert_eq!(by["fat_a"], (Some("fat"), 0));
    assert_eq!(by["fat_b"], (Some("fat"), 2));
    assert_eq!(obj.modules(), vec!["fat".to_string()]);
    assert!(
        obj.undefined.iter().any(|u| u == "fat:fat_helper"),
        "{:?}",
        obj.undefined
    );
    // A resolver without modules refuses the module's functions, naming the module.
    let e = link(&obj, &map(None), CODE, DATA).unwrap_err();
    assert!(e.to_string().contains("fat"), "{e}");
}
