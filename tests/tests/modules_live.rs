//! Issue 10, first part: module symbols and the module list read from guest memory alone, on
//! booted Debian 6.1 and 6.12 guests (QEMU TCG, KASLR on) that `insmod` stock Debian modules
//! from their own kernel package (`guest_images::modules`: the .ko files of the cached
//! linux-image .deb with their `depends=`, .ko.xz decompressed on the host).
//!
//! Compared with the guest's own view, read as root over the serial console:
//! - the module lines of `hvpatch inspect symbols` equal the module lines of /proc/kallsyms
//!   (order, address, type letter, name, module; a JITed BPF program's `[bpf]` line too), and
//!   the whole listing equals the file;
//! - a module caught at `do_init_module` (coming) reads with its init text and full table;
//! - `hvpatch inspect modules` equals /proc/modules (order, name, size, state, address) and
//!   /sys/module/NAME/sections (`.text` is the core text base; `.rodata`, `.data`, `.bss`
//!   lie in the matching regions);
//! - `Kernel::lookup_in_module` finds module functions at the /proc/kallsyms address.
//!
//! A mismatch fails with a diff.

use std::collections::BTreeMap;
use std::time::Instant;

use harness::{AttachServer, Guest, GuestSpec, KernelSeries};
use introspect::{ModuleError, RegionKind, SymbolError};
use patcher::GuestControl;
use serde_json::Value;

/// The modules asked for (their dependencies come along): two file systems, the loop device
/// and the NLS tables vfat mounts with, a network device and a network protocol — small, and
/// loadable in a bare initramfs.
const MODULES: &[&str] = &[
    "isofs",
    "loop",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "dummy",
    "ipip",
];

/// Uses the modules from user space with busybox: a vfat file system on a loop device
/// (mkdosfs, losetup, mount, write, read back) and a dummy network device.
const EXERCISE: &str = "dd if=/dev/zero of=/tmp/fat.img bs=1k count=2048 2>/dev/null \
    && mkdosfs /tmp/fat.img >/dev/null && losetup /dev/loop0 /tmp/fat.img && mkdir -p /mnt \
    && mount -t vfat /dev/loop0 /mnt && echo hvpatch-vfat > /mnt/hello.txt && umount /mnt \
    && mount -t vfat /dev/loop0 /mnt && cat /mnt/hello.txt && umount /mnt \
    && losetup -d /dev/loop0 && ip link add hvd0 type dummy && ip link set hvd0 up \
    && ip link show hvd0 | grep -c hvd0";

/// `tests/bpf/bpfhold.c` built static with the host's gcc: loads a BPF program named
/// `hvpatch_test` (JITed, so /proc/kallsyms shows it as `[bpf]`) and holds it.
fn bpfhold() -> Vec<u8> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf/bpfhold.c");
    let dir = std::env::temp_dir().join(format!("hvpatch-bpfhold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join(format!("bpfhold-{:?}", std::thread::current().id()));
    let r = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("running gcc (apt-get install gcc; scripts/setup does): {e}"));
    assert!(
        r.status.success(),
        "gcc -static {}: {}",
        src.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    let bin = std::fs::read(&out).expect("bpfhold binary");
    let _ = std::fs::remove_file(&out);
    bin
}

/// Boots `series` with the stock modules in `/lib/modules/NAME.ko` and loads them all;
/// returns the guest and the module names in load order.
fn boot_with_modules(series: KernelSeries) -> (Guest, Vec<String>) {
    let mods =
        guest_images::modules::existing_modules(series.into(), MODULES).unwrap_or_else(|e| {
            panic!(
                "stock modules of the {series} kernel package: {e}\n(the package is kept in the \
             image cache by `cargo run -p hvpatch-guest-images -- fetch`, i.e. scripts/setup)"
            )
        });
    let mut spec = GuestSpec::new(series).file("/bpfhold", bpfhold());
    for m in &mods {
        spec = spec.file(&format!("/lib/modules/{}.ko", m.name), m.bytes.clone());
    }
    let mut g = Guest::boot(spec).unwrap_or_else(|e| panic!("booting {series}: {e}"));
    let mut names = Vec::new();
    for m in &mods {
        let (rc, out) = g
            .run_status(&format!("insmod /lib/modules/{}.ko", m.name))
            .expect("insmod");
        assert_eq!(
            rc,
            0,
            "{series}: insmod {} (depends {:?}) failed: {out}\n{}",
            m.name,
            m.depends,
            g.run("dmesg | tail -20").unwrap_or_default()
        );
        names.push(m.name.clone());
    }
    eprintln!("{series}: loaded {names:?}");
    (g, names)
}

/// The module lines (`addr type name\t[module]`) of a /proc/kallsyms-format text.
fn module_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| l.contains("\t["))
        .map(str::to_string)
        .collect()
}

/// The module of a module line.
fn module_of(line: &str) -> &str {
    line.rsplit_once("\t[")
        .map_or("", |(_, m)| m.trim_end_matches(']'))
}

/// A readable diff of two module-line lists: per module, the lines only on one side, then
/// the first place where the order differs.
fn diff(proc: &[String], ours: &[String]) -> String {
    let mut per: BTreeMap<&str, (BTreeMap<&str, i64>, usize, usize)> = BTreeMap::new();
    for l in proc {
        let e = per.entry(module_of(l)).or_default();
        *e.0.entry(l).or_default() += 1;
        e.1 += 1;
    }
    for l in ours {
        let e = per.entry(module_of(l)).or_default();
        *e.0.entry(l).or_default() -= 1;
        e.2 += 1;
    }
    let mut s = String::new();
    for (m, (lines, np, no)) in &per {
        let only: Vec<String> = lines
            .iter()
            .filter(|(_, &n)| n != 0)
            .take(30)
            .map(|(l, &n)| {
                let side = if n > 0 { "- /proc" } else { "+ hvpatch" };
                format!("    {side}: {l}")
            })
            .collect();
        if !only.is_empty() || np != no {
            s.push_str(&format!(
                "  [{m}]: {np} lines in /proc/kallsyms, {no} from hvpatch\n{}\n",
                only.join("\n")
            ));
        }
    }
    if let Some(i) = proc.iter().zip(ours).position(|(a, b)| a != b) {
        s.push_str(&format!(
            "  first difference in order at module line {}:\n    - /proc:   {}\n    + hvpatch: {}\n",
            i + 1,
            proc[i],
            ours[i]
        ));
    }
    s
}

/// Parses /proc/modules: (name, size, state, address).
fn proc_modules(text: &str) -> Vec<(String, u64, String, u64)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let addr = f.get(5)?.trim_start_matches("0x");
            Some((
                f.first()?.to_string(),
                f.get(1)?.parse().ok()?,
                f.get(4)?.to_string(),
                u64::from_str_radix(addr, 16).ok()?,
            ))
        })
        .collect()
}

fn hex(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| introspect::hex::parse_hex(s).ok())
        .unwrap_or_else(|| panic!("not a hex string: {v}"))
}

/// Module symbols and the module list through the library: counts, time to read, and
/// `lookup_in_module` against /proc/kallsyms.
fn check_library(g: &mut Guest, loaded: &[String], proc: &[String]) {
    let series = g.kernel().series;
    let (mut ctl, kernel, _) = harness::patching::attach_and_open(g);
    ctl.pause().expect("pause");
    let mem = ctl.memory();
    // The BTF model is built once per kernel; time the module reads alone.
    let t = Instant::now();
    kernel.model(mem).expect("kernel model (BTF)");
    let t_model = t.elapsed();
    let t = Instant::now();
    let mods = kernel.modules(mem).expect("Kernel::modules");
    let t_mods = t.elapsed();
    let t = Instant::now();
    let syms = kernel.module_symbols(mem).expect("Kernel::module_symbols");
    let t_syms = t.elapsed();
    let mut counts = Vec::new();
    for m in loaded {
        let n = syms.iter().filter(|s| &s.module == m).count();
        let exported = syms.iter().filter(|s| &s.module == m && s.exported).count();
        counts.push(format!("{m} {n} ({exported} exported)"));
    }
    eprintln!(
        "{series}: model (BTF) {t_model:?}; {} modules in {t_mods:?}; {} module symbols in \
         {t_syms:?}: {}",
        mods.len(),
        syms.len(),
        counts.join(", ")
    );
    // Every text symbol that is unique in its module resolves to its /proc/kallsyms address.
    let mut checked = 0;
    let mut errors = Vec::new();
    for m in loaded {
        let mine: Vec<(u64, &str)> = proc
            .iter()
            .filter(|l| module_of(l) == m)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let a = u64::from_str_radix(f.next()?, 16).ok()?;
                let t = f.next()?;
                let n = f.next()?;
                matches!(t, "t" | "T").then_some((a, n))
            })
            .collect();
        for &(a, n) in &mine {
            if mine.iter().filter(|x| x.1 == n).count() != 1 {
                continue;
            }
            match kernel.lookup_in_module(mem, m, n, None) {
                Ok(x) if x == a => checked += 1,
                other => errors.push(format!("{m}:{n}: /proc {a:#x}, hvpatch {other:?}")),
            }
        }
    }
    let m0 = &loaded[0];
    let unknown = kernel.lookup_in_module(mem, m0, "no_such_symbol_hvpatch", None);
    let nomod = kernel.lookup_in_module(mem, "no_such_module", "init_module", None);
    ctl.resume().expect("resume");
    drop(ctl);
    assert!(
        errors.is_empty(),
        "{series}: lookup_in_module differs from /proc/kallsyms:\n{}",
        errors.join("\n")
    );
    assert!(
        checked >= 50,
        "{series}: only {checked} module functions looked up"
    );
    assert!(
        matches!(
            unknown,
            Err(ModuleError::Symbol {
                source: SymbolError::Unknown { .. },
                ..
            })
        ),
        "{unknown:?}"
    );
    assert!(matches!(nomod, Err(ModuleError::NoModule(_))), "{nomod:?}");
}

/// A module caught while it loads: a hardware breakpoint on `do_init_module` (the module is
/// relocated, `MODULE_STATE_COMING`, its init not yet run) stops the guest during `insmod`.
/// Then the module is listed as coming with its init text, its symbols are the full ELF
/// table (init functions and undefined symbols included, as /proc/kallsyms would show them),
/// and its init function resolves inside init text. After init it is live, without init
/// text, with the cut-down core table.
fn check_coming_module(g: &mut Guest, name: &str, init_fn: &str) {
    let series = g.kernel().series;
    g.run(&format!("rmmod {name}")).expect("rmmod");
    let (mut ctl, kernel, _) = harness::patching::attach_and_open(g);
    let at = kernel
        .lookup("do_init_module", None)
        .expect("do_init_module in vmlinux");
    ctl.set_breakpoints(&[at]).expect("breakpoint");
    g.spawn(&format!("insmod /lib/modules/{name}.ko"))
        .expect("insmod in the background");
    let ev = ctl
        .wait_event(std::time::Duration::from_secs(60))
        .expect("wait for the breakpoint");
    assert!(
        matches!(ev, Some(patcher::GuestEvent::Breakpoint { rip, .. }) if rip == at),
        "{series}: insmod {name} did not stop at do_init_module: {ev:?}"
    );
    let mem = ctl.memory();
    let mods = kernel.modules(mem).expect("modules while coming");
    let syms = kernel
        .module_symbols(mem)
        .expect("module symbols while coming");
    let lookup = kernel.lookup_in_module(mem, name, init_fn, None);
    ctl.set_breakpoints(&[]).expect("clear breakpoints");
    ctl.resume().expect("resume");
    drop(ctl);
    let m = mods
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{series}: {name} not listed while coming: {mods:?}"));
    assert_eq!(m.state, introspect::ModuleState::Coming, "{series}: {m:?}");
    let init = m
        .init_text()
        .unwrap_or_else(|| panic!("{series}: coming {name} has no init text: {m:?}"));
    let mine: Vec<_> = syms.iter().filter(|y| y.module == name).collect();
    let undefined = mine.iter().filter(|y| !y.defined).count();
    assert!(
        undefined > 0 && mine.iter().any(|y| y.name == init_fn),
        "{series}: coming {name}: {} symbols, {undefined} undefined, no {init_fn}?",
        mine.len()
    );
    let a = lookup.unwrap_or_else(|e| panic!("{series}: {name}:{init_fn} while coming: {e}"));
    assert!(
        a >= init.0 && a < init.1,
        "{series}: {init_fn} at {a:#x}, not in init text {init:x?}"
    );
    // After init: live, no init text, the core table only.
    let out = g
        .run(&format!("sleep 1; grep '^{name} ' /proc/modules"))
        .expect("/proc/modules");
    assert!(out.contains("Live"), "{series}: {name} after init: {out}");
    let (mut ctl, kernel, _) = harness::patching::attach_and_open(g);
    ctl.pause().expect("pause");
    let mem = ctl.memory();
    let live = kernel.modules(mem).expect("modules");
    let after = kernel.module_symbols(mem).expect("module symbols");
    ctl.resume().expect("resume");
    drop(ctl);
    let m = live
        .iter()
        .find(|m| m.name == name)
        .expect("module after init");
    assert_eq!(m.state, introspect::ModuleState::Live, "{series}: {m:?}");
    assert!(
        m.init_text().is_none(),
        "{series}: init text after init: {m:?}"
    );
    let n = after.iter().filter(|y| y.module == name).count();
    assert!(
        n < mine.len() && after.iter().all(|y| y.module != name || y.defined),
        "{series}: {name} after init: {n} symbols (coming: {})",
        mine.len()
    );
    eprintln!(
        "{series}: {name} while coming: {} symbols ({undefined} undefined), init text {:#x}-{:#x}; \
         live: {n} symbols",
        mine.len(),
        init.0,
        init.1
    );
}

/// `inspect symbols` vs /proc/kallsyms: module lines with a diff, then the whole file.
fn check_symbols(series: KernelSeries, proc_text: &str, srv: &AttachServer, loaded: &[String]) {
    let proc = module_lines(proc_text);
    let ours_text = srv
        .cli_ok(&["inspect", "symbols"])
        .expect("inspect symbols");
    let ours = module_lines(&ours_text);
    for m in loaded {
        let n = proc.iter().filter(|l| module_of(l) == m).count();
        assert!(
            n >= 5,
            "{series}: /proc/kallsyms shows only {n} lines of module {m}"
        );
    }
    assert!(
        proc.iter()
            .any(|l| l.ends_with("_hvpatch_test\t[bpf]") && l.contains(" t bpf_prog_")),
        "{series}: /proc/kallsyms has no [bpf] line of bpfhold's program"
    );
    assert!(
        !proc.iter().any(|l| l.starts_with("0000000000000000 ")),
        "{series}: /proc/kallsyms shows zeroed module addresses: not read as root?"
    );
    assert!(
        proc == ours,
        "{series}: module lines of `inspect symbols` differ from /proc/kallsyms:\n{}",
        diff(&proc, &ours)
    );
    // `inspect symbol MODULE:NAME` (and plain NAME) finds a function of each module at its
    // /proc/kallsyms address, with sympos 1 and a size.
    let mut errors = Vec::new();
    for m in loaded {
        let mine: Vec<Vec<&str>> = proc
            .iter()
            .filter(|l| module_of(l) == m)
            .map(|l| l.split_whitespace().collect())
            .collect();
        let Some(f) = mine.iter().find(|f| {
            matches!(f[1], "t" | "T") && mine.iter().filter(|g| g[2] == f[2]).count() == 1
        }) else {
            errors.push(format!("{m}: no unique function in /proc/kallsyms"));
            continue;
        };
        for q in [format!("{m}:{}", f[2]), f[2].to_string()] {
            let v = srv
                .json(&["inspect", "symbol", &q])
                .expect("inspect symbol");
            let hit = v
                .as_array()
                .and_then(|a| a.iter().find(|x| x["module"].as_str() == Some(m.as_str())));
            let ok = hit.is_some_and(|x| {
                format!("{:016x}", hex(&x["addr"])) == f[0]
                    && x["sympos"] == 1
                    && x["size"].as_u64().is_some_and(|z| z > 0)
            });
            if !ok {
                errors.push(format!("inspect symbol {q}: {v}; /proc: {}", f.join(" ")));
            }
        }
    }
    assert!(errors.is_empty(), "{series}:\n{}", errors.join("\n"));
    let all: Vec<String> = ours_text.lines().map(str::to_string).collect();
    harness::patching::assert_kallsyms_equal(proc_text, &all, "hvpatch inspect symbols");
    eprintln!(
        "{series}: {} module lines of /proc/kallsyms equal (of {} lines)",
        proc.len(),
        all.len()
    );
}

/// `inspect modules` vs /proc/modules and /sys/module/NAME/sections.
fn check_modules(g: &mut Guest, srv: &AttachServer, loaded: &[String]) {
    let series = g.kernel().series;
    let text = g.run("cat /proc/modules").expect("/proc/modules");
    let proc = proc_modules(&text);
    let ours = srv.json(&["inspect", "modules"]).expect("inspect modules");
    let ours = ours.as_array().expect("modules array");
    let got: Vec<(String, u64, String, u64)> = ours
        .iter()
        .map(|m| {
            let text = m["regions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["kind"] == "text")
                .map_or(0, |r| hex(&r["start"]));
            let state = match m["state"].as_str().unwrap() {
                "coming" => "Loading",
                "going" => "Unloading",
                _ => "Live",
            };
            (
                m["name"].as_str().unwrap().to_string(),
                m["size"].as_u64().unwrap(),
                state.to_string(),
                text,
            )
        })
        .collect();
    assert_eq!(
        proc.len(),
        loaded.len(),
        "{series}: /proc/modules does not list what was loaded:\n{text}"
    );
    assert_eq!(
        got, proc,
        "{series}: `inspect modules` (left) differs from /proc/modules (right):\n{text}"
    );
    let mut errors = Vec::new();
    for m in ours {
        let name = m["name"].as_str().unwrap();
        let regions: Vec<(String, u64, u64)> = m["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["kind"].as_str().unwrap().to_string(),
                    hex(&r["start"]),
                    hex(&r["end"]),
                )
            })
            .collect();
        let kind_of = |k: RegionKind| serde_json::to_value(k).unwrap();
        let sections = g
            .run(&format!(
                "cd /sys/module/{name}/sections && for s in .text .rodata .data .bss; do [ -e $s ] && echo $s $(cat $s); done; true"
            ))
            .expect("sections");
        let mut seen_text = false;
        for l in sections.lines() {
            let Some((sec, a)) = l.split_once(' ') else {
                continue;
            };
            let Ok(a) = u64::from_str_radix(a.trim().trim_start_matches("0x"), 16) else {
                errors.push(format!("{name}: bad section line {l:?}"));
                continue;
            };
            let want: &[RegionKind] = match sec {
                ".text" => &[RegionKind::Text],
                ".rodata" => &[RegionKind::Rodata],
                _ => &[RegionKind::Data],
            };
            let ok = regions.iter().any(|(k, s, e)| {
                want.iter().any(|w| kind_of(*w) == k.as_str()) && a >= *s && a < *e
            });
            if !ok {
                errors.push(format!(
                    "{name}: section {sec} at {a:#x} is not in a {want:?} region of {regions:x?}"
                ));
            }
            if sec == ".text" {
                seen_text = true;
                let base = regions.iter().find(|r| r.0 == "text").map(|r| r.1);
                if base != Some(a) {
                    errors.push(format!(
                        "{name}: /sys/module sections/.text {a:#x}, hvpatch core text base {base:x?}"
                    ));
                }
            }
        }
        if !seen_text {
            errors.push(format!(
                "{name}: no sections/.text in /sys/module:\n{sections}"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "{series}: `inspect modules` vs /sys/module/*/sections:\n{}",
        errors.join("\n")
    );
}

fn modules_match_guest(series: KernelSeries) {
    let (mut g, loaded) = boot_with_modules(series);
    // A JITed BPF program: its `[bpf]` line follows the module lines in /proc/kallsyms.
    g.run("chmod +x /bpfhold").expect("chmod");
    g.spawn("/bpfhold").expect("bpfhold");
    let (rc, out) = g.run_status(EXERCISE).expect("exercise the modules");
    assert!(
        rc == 0 && out.contains("hvpatch-vfat") && out.trim_end().ends_with('1'),
        "{series}: vfat on a loop device / a dummy device failed ({rc}): {out}\n{}",
        g.run("dmesg | tail -20").unwrap_or_default()
    );
    let proc_text = g
        .run_bulk("cat /proc/kallsyms")
        .expect("cat /proc/kallsyms");
    let proc = module_lines(&proc_text);
    check_library(&mut g, &loaded, &proc);
    check_coming_module(&mut g, "ipip", "ipip_init");
    let srv = AttachServer::start(&g).expect("hvpatch attach");
    // ipip came back elsewhere: read /proc/kallsyms again.
    let again = g
        .run_bulk("cat /proc/kallsyms")
        .expect("cat /proc/kallsyms");
    check_symbols(series, &again, &srv, &loaded);
    check_modules(&mut g, &srv, &loaded);

    // A module that goes disappears; loaded again (elsewhere), it is read again.
    let last = loaded.last().expect("a module").clone();
    g.run(&format!("rmmod {last}")).expect("rmmod");
    let gone = srv.json(&["inspect", "modules"]).expect("inspect modules");
    assert!(
        !gone
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"].as_str() == Some(last.as_str())),
        "{series}: {last} still listed after rmmod: {gone}"
    );
    let fewer = &loaded[..loaded.len() - 1];
    let text = g
        .run_bulk("cat /proc/kallsyms")
        .expect("cat /proc/kallsyms");
    check_symbols(series, &text, &srv, fewer);
    check_modules(&mut g, &srv, fewer);
    g.run(&format!("insmod /lib/modules/{last}.ko"))
        .expect("insmod again");
    let text = g
        .run_bulk("cat /proc/kallsyms")
        .expect("cat /proc/kallsyms");
    check_symbols(series, &text, &srv, &loaded);
    check_modules(&mut g, &srv, &loaded);
}

#[test]
fn module_symbols_match_guest_6_1() {
    modules_match_guest(KernelSeries::V6_1);
}

#[test]
fn module_symbols_match_guest_6_12() {
    modules_match_guest(KernelSeries::V6_12);
}
