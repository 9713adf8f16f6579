//! Issue 10: patching functions of loaded kernel modules, on booted Debian 6.1 and 6.12 guests
//! (QEMU TCG, 2 vCPUs, KASLR on) that `insmod` stock Debian modules of their own kernel
//! package and use them from busybox: a vfat file system on a loop device, mounted.
//!
//! One patch names two objects (`HVPATCH_FUNC_OBJ`): `fat_show_options` of module `fat` (a
//! wrapper calling the original: `/proc/mounts` shows `,hvpatched` before vfat's options) and
//! `loop_attr_do_show_backing_file` of module `loop` (`/sys/block/loop0/loop/backing_file`
//! reads `hvpatched-loop` and the addresses of two data symbols of `loop` it references, one as
//! `HVPATCH_OBJ_SYM(loop, …)`, one by its plain name: compared with /proc/kallsyms). Checked against the guest's own view:
//! - the function addresses `patch info` reports are the `/proc/kallsyms` addresses of the
//!   module symbols, with their module;
//! - immediate and consistent loads change both outputs; unloads bring the originals back and
//!   the module text is byte for byte what it was;
//! - 40 load/unload cycles (every other one under the consistency model) while four `hammer`s
//!   (two on each vCPU) read `backing_file` and `/proc/mounts` (which calls `fat_show_options`
//!   for the vfat mount on every read): no failed read, both outputs seen, no oops/WARNING;
//! - a patched `fat` removed by `rmmod` (and loaded again): the unload (immediate, or a
//!   disable transition) forgets its site and restores `loop`'s; a disabled patch is refused
//!   `enable` once its module was loaded again (it would be elsewhere);
//! - a `cat /proc/mounts` asleep inside the original `fat_show_options` (in a sleeping callee)
//!   holds a consistent load of it, named by `status`, and finishes in the old function;
//! - refusals, the guest unchanged: a module that is not loaded, a function the module does
//!   not have, a module function that ftrace traces (its site holds `call ftrace_caller`), a
//!   module caught at `do_init_module` (state COMING) or at `free_module` (GOING).

use std::time::{Duration, Instant};

use harness::patching::patch_file;
use harness::soak::{kernel_complaints, parse_hammer};
use harness::{AttachServer, Guest, GuestSpec, KernelSeries};
use patcher::kernel::KernelSymbols;
use patcher::{Engine, GuestControl, PatchError, Target};
use serde_json::Value;

/// The modules loaded (their dependencies come along).
const MODULES: &[&str] = &["loop", "vfat", "nls_cp437", "nls_ascii", "isofs"];

/// The module functions patched: (module, function).
const FUNCS: &[(&str, &str)] = &[
    ("fat", "fat_show_options"),
    ("loop", "loop_attr_do_show_backing_file"),
];

/// A vfat file system on /dev/loop0, mounted on /mnt.
const SETUP: &str = "dd if=/dev/zero of=/tmp/fat.img bs=1k count=2048 2>/dev/null \
    && mkdosfs /tmp/fat.img >/dev/null && losetup /dev/loop0 /tmp/fat.img && mkdir -p /mnt \
    && mount -t vfat /dev/loop0 /mnt && echo ok";

/// The patch: both module functions, one object each.
const MOD_PATCH: &str = "struct dentry; struct device; struct device_attribute;\n\
    HVPATCH_ORIG(int, fat_show_options, (struct seq_file *m, struct dentry *root));\n\
    static int new_show_options(struct seq_file *m, struct dentry *root)\n\
    { seq_printf(m, \",hvpatched\"); return hvpatch_orig_fat_show_options(m, root); }\n\
    extern char backing_attr[] HVPATCH_OBJ_SYM(loop, loop_attr_backing_file);\n\
    extern char loop_attr_offset[];\n\
    static ssize_t new_backing(struct device *d, struct device_attribute *a, char *b)\n\
    { return sprintf(b, \"hvpatched-loop %lx %lx\\n\", (unsigned long)backing_attr,\n\
                     (unsigned long)loop_attr_offset); }\n\
    HVPATCH_FUNC_OBJ(fat, fat_show_options, new_show_options);\n\
    HVPATCH_FUNC_OBJ(loop, loop_attr_do_show_backing_file, new_backing);";

/// `fat_show_options` alone, for a patch that waits for `fat`.
const FAT_PATCH: &str = "struct dentry;\n\
    HVPATCH_ORIG(int, fat_show_options, (struct seq_file *m, struct dentry *root));\n\
    static int new_show_options(struct seq_file *m, struct dentry *root)\n\
    { seq_printf(m, \",hvpatched\"); return hvpatch_orig_fat_show_options(m, root); }\n\
    HVPATCH_FUNC_OBJ(fat, fat_show_options, new_show_options);";

/// `from_kuid_munged` sleeping 3 s for uid 4242 (immediate): `fat_show_options` of a vfat
/// mounted with `uid=4242` calls it, so a `cat /proc/mounts` sleeps inside the original
/// module function.
const KUID_SLEEP_PATCH: &str = "HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE);\n\
    struct user_namespace; typedef struct { unsigned int val; } kuid_t;\n\
    extern void msleep(unsigned int);\n\
    HVPATCH_ORIG(unsigned int, from_kuid_munged, (struct user_namespace *ns, kuid_t uid));\n\
    static unsigned int n(struct user_namespace *ns, kuid_t uid)\n\
    { if (uid.val == 4242) msleep(3000); return hvpatch_orig_from_kuid_munged(ns, uid); }\n\
    HVPATCH_FUNC(from_kuid_munged, n);";

/// The address of `name` in `module` by the guest's /proc/kallsyms text `ksyms`.
fn kallsyms_addr(ksyms: &str, module: &str, name: &str) -> u64 {
    let want = format!(" {name}\t[{module}]");
    let hits: Vec<u64> = ksyms
        .lines()
        .filter(|l| l.trim_end().ends_with(&want))
        .filter_map(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{module}:{name} in /proc/kallsyms: {hits:x?}"
    );
    hits[0]
}

fn boot(series: KernelSeries) -> Guest {
    let mods =
        guest_images::modules::existing_modules(series.into(), MODULES).unwrap_or_else(|e| {
            panic!(
                "stock modules of the {series} kernel package: {e}\n(the package is kept in the \
                 image cache by `cargo run -p hvpatch-guest-images -- fetch`, i.e. scripts/setup)"
            )
        });
    let mut spec = GuestSpec::new(series);
    for m in &mods {
        spec = spec.file(&format!("/lib/modules/{}.ko", m.name), m.bytes.clone());
    }
    let mut g = Guest::boot(spec).unwrap_or_else(|e| panic!("booting {series}: {e}"));
    for m in &mods {
        let (rc, out) = g
            .run_status(&format!("insmod /lib/modules/{}.ko", m.name))
            .expect("insmod");
        assert_eq!(rc, 0, "{series}: insmod {} failed: {out}", m.name);
    }
    let out = g
        .run(SETUP)
        .unwrap_or_else(|e| panic!("{series}: vfat on loop0: {e}"));
    assert_eq!(out.trim(), "ok", "{series}: {out}");
    g
}

/// `(module, function, address, first 16 bytes)` of [`FUNCS`], through a short attach of our
/// own (no server may be attached); the addresses come from /proc/kallsyms.
fn module_text(g: &mut Guest) -> Vec<(String, u64, Vec<u8>)> {
    let ksyms = g.run_bulk("cat /proc/kallsyms").expect("kallsyms");
    let addrs: Vec<(String, u64)> = FUNCS
        .iter()
        .map(|(m, f)| (format!("{m}:{f}"), kallsyms_addr(&ksyms, m, f)))
        .collect();
    let (ctl, k, _) = harness::patching::attach_and_open(g);
    addrs
        .into_iter()
        .map(|(n, a)| {
            let mut b = vec![0u8; 16];
            k.read_virt(ctl.memory(), a, &mut b)
                .unwrap_or_else(|e| panic!("reading {n}: {e}"));
            (n, a, b)
        })
        .collect()
}

struct Ctx {
    g: Guest,
    srv: Option<AttachServer>,
    before: Vec<String>,
    text: Vec<(String, u64, Vec<u8>)>,
    orig_backing: String,
    /// What the patched `backing_file` reads: a marker and the addresses of two data symbols
    /// of `loop` the patch references (one named `loop:…`, one resolved in the patch's
    /// modules first).
    patched_backing: String,
}

impl Ctx {
    fn srv(&self) -> &AttachServer {
        self.srv.as_ref().expect("server")
    }

    fn json(&self, args: &[&str]) -> Value {
        self.srv()
            .json(args)
            .unwrap_or_else(|e| panic!("hvpatch {args:?}: {e}\n{}", self.srv().log_text()))
    }

    /// A refused command: its stderr (the guest must be unchanged; checked by the caller).
    fn refused(&self, args: &[&str]) -> String {
        let out = self.srv().cli(args).expect("hvpatch runs");
        assert!(!out.success, "hvpatch {args:?} succeeded: {}", out.stdout);
        out.stderr
    }

    fn run(&mut self, cmd: &str) -> String {
        self.g.run(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    fn healthy(&mut self, when: &str) {
        harness::soak::assert_no_new_complaints(&mut self.g, &self.before, when);
    }

    /// The vfat line of /proc/mounts and the loop device's backing file.
    fn outputs(&mut self) -> (String, String) {
        let mounts = self.run("grep '^/dev/loop0 /mnt vfat ' /proc/mounts");
        let backing = self.run("cat /sys/block/loop0/loop/backing_file");
        (mounts.trim().to_string(), backing.trim().to_string())
    }

    fn assert_patched(&mut self, when: &str) {
        let (m, b) = self.outputs();
        assert!(
            m.contains(" rw,relatime,hvpatched,") && m.contains("fmask="),
            "{when}: /proc/mounts: {m}"
        );
        assert_eq!(b, self.patched_backing, "{when}");
    }

    fn assert_patched_mounts(&mut self, when: &str) {
        let (m, _) = self.outputs();
        assert!(
            m.contains(" rw,relatime,hvpatched,"),
            "{when}: /proc/mounts: {m}"
        );
    }

    fn assert_unpatched(&mut self, when: &str) {
        let (m, b) = self.outputs();
        assert!(
            !m.contains("hvpatched") && m.contains("fmask="),
            "{when}: /proc/mounts: {m}"
        );
        assert_eq!(b, self.orig_backing, "{when}");
    }

    /// Ends the server; the module functions are byte for byte the original (`fat` was
    /// loaded again, maybe elsewhere: its bytes count, not its address).
    fn text_unchanged(&mut self, when: &str) {
        drop(self.srv.take());
        let now = module_text(&mut self.g);
        let bytes = |v: &[(String, u64, Vec<u8>)]| {
            v.iter()
                .map(|(n, _, b)| (n.clone(), b.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bytes(&now),
            bytes(&self.text),
            "{when}: module text differs"
        );
        assert_eq!(now[1], self.text[1], "{when}: loop's text");
    }

    /// Removes vfat and fat (unmounting /mnt first).
    fn remove_fat(&mut self) {
        let out = self.run("umount /mnt && rmmod vfat && rmmod fat && echo removed");
        assert_eq!(out.trim(), "removed", "{out}");
    }

    /// Loads fat and vfat again and mounts /mnt.
    fn insert_fat(&mut self) {
        let out = self.run(
            "insmod /lib/modules/fat.ko && insmod /lib/modules/vfat.ko \
             && mount -t vfat /dev/loop0 /mnt && echo inserted",
        );
        assert_eq!(out.trim(), "inserted", "{out}");
    }
}

fn check(series: KernelSeries) {
    let t_start = Instant::now();
    let mut g = boot(series);
    let text = module_text(&mut g);
    eprintln!("{series}: module functions {text:x?}");
    let before = kernel_complaints(&g.run("dmesg").expect("dmesg"));
    let orig_backing = g
        .run("cat /sys/block/loop0/loop/backing_file")
        .expect("backing_file")
        .trim()
        .to_string();
    assert_eq!(orig_backing, "/tmp/fat.img", "{series}");
    let ksyms = g.run_bulk("cat /proc/kallsyms").expect("kallsyms");
    let patched_backing = format!(
        "hvpatched-loop {:x} {:x}",
        kallsyms_addr(&ksyms, "loop", "loop_attr_backing_file"),
        kallsyms_addr(&ksyms, "loop", "loop_attr_offset")
    );
    let srv = AttachServer::start(&g).expect("hvpatch attach");
    let mut c = Ctx {
        g,
        srv: Some(srv),
        before,
        text,
        orig_backing,
        patched_backing,
    };
    c.assert_unpatched("before any patch");
    let obj = patch_file("modpatch", MOD_PATCH);

    // Immediate load: both objects, at the /proc/kallsyms addresses.
    let v = c.json(&["patch", "load", &obj, "--immediate"]);
    let funcs = v["functions"].as_array().expect("functions").clone();
    assert_eq!(funcs.len(), 2, "{v:#}");
    for (name, addr, _) in &c.text {
        let (m, fname) = name.split_once(':').unwrap();
        let f = funcs
            .iter()
            .find(|f| f["object"] == m)
            .unwrap_or_else(|| panic!("{series}: no function of {m}: {v:#}"));
        assert_eq!(f["object"], m, "{f:#}");
        assert_eq!(f["old_name"], fname, "{f:#}");
        assert_eq!(f["old_addr"], format!("{addr:#x}"), "{f:#}");
        assert!(f["old_size"].as_u64().is_some_and(|s| s > 16), "{f:#}");
        assert_eq!(f["method"], "ftrace-site", "{f:#}");
    }
    let info = c.srv().cli_ok(&["patch", "info", "modpatch"]).unwrap();
    assert!(
        info.contains("fat:fat_show_options")
            && info.contains("loop:loop_attr_do_show_backing_file"),
        "{info}"
    );
    c.assert_patched("after the immediate load");
    c.json(&["patch", "unload", "modpatch"]);
    c.assert_unpatched("after the immediate unload");

    // Consistent load, disable and enable transitions, unload.
    let v = c.json(&["patch", "load", &obj, "--timeout", "60"]);
    assert_eq!(v["state"], "Enabled", "{v:#}");
    c.assert_patched("after the consistent load");
    c.json(&["patch", "disable", "modpatch", "--timeout", "60"]);
    c.assert_unpatched("after disable");
    c.json(&["patch", "enable", "modpatch", "--timeout", "60"]);
    c.assert_patched("after enable");
    c.json(&["patch", "unload", "modpatch", "--timeout", "60"]);
    c.assert_unpatched("after the consistent unload");
    c.healthy("after the single loads");

    // Cycles under four hammers: backing_file and /proc/mounts on each vCPU.
    c.run("rm -f /tmp/h*");
    for (i, (cpu, path)) in [
        (0, "/sys/block/loop0/loop/backing_file"),
        (1, "/sys/block/loop0/loop/backing_file"),
        (0, "/proc/mounts"),
        (1, "/proc/mounts"),
    ]
    .iter()
    .enumerate()
    {
        c.g.spawn(&format!("exec hammer {cpu} read {path} > /tmp/h{i} 2>&1"))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let cycles = 40;
    let t0 = Instant::now();
    for k in 0..cycles {
        let consistent = k % 2 == 1;
        let mut load = vec!["patch", "load", obj.as_str(), "--timeout", "60"];
        if !consistent {
            load.push("--immediate");
        }
        let v = c.json(&load);
        assert_eq!(v["state"], "Enabled", "cycle {k}: {v:#}");
        std::thread::sleep(Duration::from_millis(80));
        c.json(&["patch", "unload", "modpatch", "--timeout", "60"]);
        std::thread::sleep(Duration::from_millis(40));
    }
    let cycle_time = t0.elapsed();
    c.run("kill -TERM $(pidof hammer); sleep 1; true");
    for (i, cpu) in [0u32, 1, 0, 1].iter().enumerate() {
        let out = c.run(&format!("cat /tmp/h{i}"));
        let t = parse_hammer(&out, *cpu).unwrap_or_else(|| panic!("no hammer report: {out}"));
        assert_eq!(t.errors, 0, "{series}: hammer {i}: {out}");
        assert!(t.calls > 0, "{series}: hammer {i}: {out}");
        if i < 2 {
            for want in [c.orig_backing.as_str(), c.patched_backing.as_str()] {
                assert!(
                    t.seen.iter().any(|(_, s)| s == want),
                    "{series}: hammer {i} never saw {want:?}: {:?}",
                    t.seen
                );
            }
        }
        eprintln!(
            "{series}: hammer {i} (cpu {cpu}): {} reads, saw {:?}",
            t.calls, t.seen
        );
    }
    eprintln!(
        "{series}: {cycles} load/unload cycles of 2 module functions under 4 hammers in {cycle_time:.1?}"
    );
    c.healthy("after the cycles under load");
    c.assert_unpatched("after the cycles");

    blocked_in_module(&mut c);

    // Refusals, each leaving the guest unchanged.
    let bad = patch_file(
        "nomod",
        "static int f(void) { return 0; }\nHVPATCH_FUNC_OBJ(no_such_mod, foo, f);\n\
         HVPATCH_FUNC(cmdline_proc_show, f);",
    );
    let e = c.refused(&["patch", "load", &bad, "--immediate"]);
    assert!(
        e.contains("module no_such_mod is not loaded") && e.contains("vmlinux functions"),
        "{series}: {e}"
    );
    let bad = patch_file(
        "halfmod",
        "static int f(void) { return 0; }\nHVPATCH_FUNC_OBJ(no_such_mod, foo, f);\n\
         HVPATCH_FUNC_OBJ(loop, loop_attr_do_show_backing_file, f);",
    );
    let e = c.refused(&["patch", "load", &bad, "--immediate"]);
    assert!(
        e.contains("module no_such_mod is not loaded while loop is"),
        "{series}: {e}"
    );
    let bad = patch_file(
        "nofunc",
        "static int f(void) { return 0; }\nHVPATCH_FUNC_OBJ(fat, cmdline_proc_show, f);",
    );
    let e = c.refused(&["patch", "load", &bad, "--immediate"]);
    assert!(
        e.contains("module fat") && e.contains("cmdline_proc_show"),
        "{series}: {e}"
    );
    // ftrace traces fat_show_options: its site is ftrace's call now.
    let tr = "/sys/kernel/tracing";
    c.run(&format!(
        "mount -t tracefs nodev {tr} 2>/dev/null; echo fat_show_options > {tr}/set_ftrace_filter \
         && echo function > {tr}/current_tracer && echo traced"
    ));
    let e = c.refused(&["patch", "load", &obj, "--immediate"]);
    assert!(
        e.contains("fat_show_options") && e.contains("ftrace"),
        "{series}: {e}"
    );
    c.run(&format!(
        "echo nop > {tr}/current_tracer && echo > {tr}/set_ftrace_filter"
    ));
    assert!(
        c.json(&["patch", "list"]).as_array().unwrap().is_empty(),
        "a refused load left a patch"
    );
    c.assert_unpatched("after the refusals");
    c.healthy("after the refusals");

    // The patched module removed under the patch: unloads forget its site (its memory is
    // not the module's any more) and restore the others.
    c.json(&["patch", "load", &obj, "--immediate"]);
    c.assert_patched("before removing fat");
    c.remove_fat();
    c.json(&["patch", "unload", "modpatch"]);
    assert_eq!(
        c.run("cat /sys/block/loop0/loop/backing_file").trim(),
        c.orig_backing,
        "{series}: loop after the unload"
    );
    c.insert_fat();
    c.assert_unpatched("after fat came back (immediate)");
    // The same under the consistency model (the unload is a disable transition).
    c.json(&["patch", "load", &obj, "--timeout", "60"]);
    c.assert_patched("consistent, before removing fat");
    c.remove_fat();
    c.json(&["patch", "unload", "modpatch", "--timeout", "60"]);
    c.insert_fat();
    c.assert_unpatched("after fat came back (consistent)");
    // A disabled patch is not enabled again on a module loaded again.
    c.json(&["patch", "load", &obj, "--timeout", "60"]);
    c.json(&["patch", "disable", "modpatch", "--timeout", "60"]);
    c.remove_fat();
    c.insert_fat();
    let e = c.refused(&["patch", "enable", "modpatch", "--timeout", "60"]);
    assert!(
        e.contains("module fat was unloaded and loaded again"),
        "{series}: {e}"
    );
    c.assert_unpatched("after the refused enable");
    c.json(&["patch", "unload", "modpatch", "--timeout", "60"]);
    c.assert_unpatched("after the module came and went");
    c.healthy("after the module came and went");

    waiting_for_load(&mut c);
    c.text_unchanged("at the end");

    coming_refused(&mut c.g);
    c.healthy("after the coming module");
    eprintln!("{series}: done in {:.1?}", t_start.elapsed());
}

/// The consistency model with the old function in a module: a `cat /proc/mounts` asleep in a
/// callee of the original `fat_show_options` (vfat mounted with `uid=4242`, `from_kuid_munged`
/// sleeping for that uid) holds the transition of a consistent `fat_show_options` patch; `status`
/// names it; it finishes in the old function (its output has no `,hvpatched`) while new readers
/// already get the new one; then the transition completes.
fn blocked_in_module(c: &mut Ctx) {
    let series = c.g.kernel().series;
    let out = c.run("umount /mnt && mount -t vfat -o uid=4242 /dev/loop0 /mnt && echo ok");
    assert_eq!(out.trim(), "ok", "{out}");
    let kuid = patch_file("kuidsleep", KUID_SLEEP_PATCH);
    c.json(&["patch", "load", &kuid]);
    c.run("rm -f /tmp/m.out");
    c.g.spawn("cat /proc/mounts > /tmp/m.out").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let cat: i64 = c
        .run("pidof cat")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{series}: no sleeping cat"));
    let obj = patch_file("fatcons", FAT_PATCH);
    let v = c.json(&["patch", "load", &obj, "--no-wait"]);
    assert_eq!(v["name"], "fatcons", "{v:#}");
    std::thread::sleep(Duration::from_millis(300));
    let s = c.json(&["patch", "status"]);
    let t = &s["transition"];
    assert_eq!(
        t["patch"], "fatcons",
        "{series}: the cat did not hold it: {s:#}"
    );
    let b = t["blocking"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["pid"] == cat)
        .unwrap_or_else(|| panic!("{series}: the cat {cat} does not block: {s:#}"));
    eprintln!("{series}: blocking: {b}");
    assert_eq!(b["why"]["kind"], "on_stack", "{b:#}");
    // The frame is inside the module function (by the size from the module's symbol table;
    // kallsyms of vmlinux knows nothing there).
    let f = &v["functions"][0];
    let hex =
        |x: &Value| u64::from_str_radix(x.as_str().unwrap_or("").trim_start_matches("0x"), 16);
    let (start, size) = (
        hex(&f["old_addr"]).unwrap(),
        f["old_size"].as_u64().unwrap(),
    );
    let frame = hex(&b["why"]["frame"]).unwrap_or(0);
    assert!(
        frame > start && frame < start + size,
        "{series}: frame {frame:#x} not in fat_show_options {start:#x}+{size:#x}: {b:#}"
    );
    // A new reader already runs the new function (it sleeps too: uid 4242).
    let m = c.run("grep '^/dev/loop0 ' /proc/mounts");
    assert!(m.contains(",hvpatched,"), "{series}: a new reader: {m}");
    let t0 = Instant::now();
    while !c.json(&["patch", "status"])["transition"].is_null() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{series}: never completed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let old = c.run("grep '^/dev/loop0 ' /tmp/m.out");
    assert!(
        old.contains("uid=4242") && !old.contains("hvpatched"),
        "{series}: the blocked cat left the old function mid-way: {old}"
    );
    c.json(&["patch", "unload", "fatcons", "--timeout", "60"]);
    c.json(&["patch", "unload", "kuidsleep"]);
    let out = c.run("umount /mnt && mount -t vfat /dev/loop0 /mnt && echo ok");
    assert_eq!(out.trim(), "ok", "{out}");
    c.healthy("after the blocked task");
}

/// A patch for `fat` while `fat` is not loaded: it waits; each `insmod` applies it before any
/// of fat's code runs (the first `/proc/mounts` after the mount shows the new function), each
/// `rmmod` withdraws it and it waits again. Meanwhile a breakpoints-switcher transition is
/// refused (debug registers). With hvpatch killed, a module load does not stop the guest; the
/// restarted server applies the waiting patch to the module already there. Unloading a
/// waiting or an applied patch works.
fn waiting_for_load(c: &mut Ctx) {
    let series = c.g.kernel().series;
    c.remove_fat();
    let obj = patch_file("fatwait", FAT_PATCH);
    let v = c.json(&["patch", "load", &obj]);
    assert_eq!(v["state"], "Waiting", "{series}: {v:#}");
    assert_eq!(v["waiting_for"][0], "fat", "{series}: {v:#}");
    assert_eq!(v["functions"][0]["object"], "fat", "{series}: {v:#}");
    let info = c.srv().cli_ok(&["patch", "info", "fatwait"]).unwrap();
    assert!(
        info.contains("Waiting for module fat") && info.contains("waiting for load"),
        "{series}: {info}"
    );
    // The breakpoints switcher is refused while the hooks hold 2 debug registers.
    let vm = patch_file(
        "cmdbp",
        "static int s(struct seq_file *m, void *v) { seq_printf(m, \"bp\\n\"); return 0; }\n\
         HVPATCH_FUNC(cmdline_proc_show, s);",
    );
    let e = c.refused(&["patch", "load", &vm, "--switcher", "breakpoints"]);
    assert!(e.contains("debug registers"), "{series}: {e}");
    for round in 0..3 {
        c.insert_fat();
        let (m, _) = c.outputs();
        assert!(
            m.contains(" rw,relatime,hvpatched,"),
            "{series}: round {round}: fat loaded, /proc/mounts: {m}"
        );
        let v = c.json(&["patch", "info", "fatwait"]);
        assert_eq!(v["state"], "Enabled", "{series}: round {round}: {v:#}");
        assert_eq!(v["module_hooked"], true, "{series}: {v:#}");
        let ksyms = c.g.run_bulk("cat /proc/kallsyms").expect("kallsyms");
        let at = kallsyms_addr(&ksyms, "fat", "fat_show_options");
        assert_eq!(v["functions"][0]["old_addr"], format!("{at:#x}"), "{v:#}");
        c.remove_fat();
        let v = c.json(&["patch", "info", "fatwait"]);
        assert_eq!(v["state"], "Waiting", "{series}: round {round}: {v:#}");
        c.healthy(&format!("module round {round}"));
    }
    // hvpatch killed while the patch waits: the guest does not stop at the hooks (the attach
    // guard detached), fat loads unpatched; a new `hvpatch attach` continues from its state
    // file, arms the hooks and applies the patch to the fat already there.
    c.srv.as_mut().unwrap().kill_hard();
    drop(c.srv.take());
    c.insert_fat();
    let (m, _) = c.outputs();
    assert!(!m.contains("hvpatched"), "{series}: with no server: {m}");
    c.srv = Some(AttachServer::start(&c.g).expect("hvpatch attach again"));
    let t0 = Instant::now();
    loop {
        let (m, _) = c.outputs();
        if m.contains(" rw,relatime,hvpatched,") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{series}: the restarted server never applied the waiting patch: {m}\n{}",
            c.srv().log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.remove_fat();
    let v = c.json(&["patch", "info", "fatwait"]);
    assert_eq!(v["state"], "Waiting", "{series}: after the restart: {v:#}");
    c.healthy("after the restart");
    // Unload while waiting; load again, apply, unload while applied.
    c.json(&["patch", "unload", "fatwait"]);
    c.json(&["patch", "load", &obj]);
    c.insert_fat();
    c.assert_patched_mounts("applied, before its unload");
    c.json(&["patch", "unload", "fatwait"]);
    let (m, _) = c.outputs();
    assert!(!m.contains("hvpatched"), "{series}: after the unload: {m}");
    let t0 = Instant::now();
    while !c.json(&["patch", "list"]).as_array().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "patches left");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Hooks gone: a breakpoints transition works again.
    c.json(&[
        "patch",
        "load",
        &vm,
        "--switcher",
        "breakpoints",
        "--timeout",
        "60",
    ]);
    c.json(&["patch", "unload", "cmdbp", "--timeout", "60"]);
    c.healthy("after the waiting patch");
}

/// A module caught at `do_init_module` (relocated, state COMING, init not run) is refused
/// by a load naming it; after its init the same load works; caught at `free_module` (GOING)
/// it is refused again.
fn coming_refused(g: &mut Guest) {
    let series = g.kernel().series;
    g.run("rmmod isofs").expect("rmmod isofs");
    let obj = harness::patching::build_patch(
        "isopatch",
        "HVPATCH_NAME(\"isopatch\");\nHVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE);\n\
         struct super_block;\n\
         HVPATCH_ORIG(struct inode *, isofs_alloc_inode, (struct super_block *sb));\n\
         static struct inode *m(struct super_block *sb) { return hvpatch_orig_isofs_alloc_inode(sb); }\n\
         HVPATCH_FUNC_OBJ(isofs, isofs_alloc_inode, m);",
    );
    let (mut ctl, kernel, regs) = harness::patching::attach_and_open(g);
    let at = kernel
        .lookup("do_init_module", None)
        .expect("do_init_module in vmlinux");
    ctl.set_breakpoints(&[at]).expect("breakpoint");
    g.spawn("insmod /lib/modules/isofs.ko")
        .expect("insmod in the background");
    let ev = ctl
        .wait_event(Duration::from_secs(60))
        .expect("wait for the breakpoint");
    assert!(
        matches!(ev, Some(patcher::GuestEvent::Breakpoint { rip, .. }) if rip == at),
        "{series}: insmod isofs did not stop at do_init_module: {ev:?}"
    );
    let ks = KernelSymbols::new(&kernel, ctl.memory());
    let t = Target {
        symbols: &ks,
        paging: ks.paging(regs[0].nx_enabled()),
    };
    let mut e = Engine::new();
    let r = e.load(&mut ctl, &t, &obj, "isopatch.o");
    ctl.set_breakpoints(&[]).expect("clear breakpoints");
    ctl.resume().expect("resume");
    match r {
        Err(PatchError::Module { module, what, .. }) => {
            assert_eq!(module, "isofs");
            assert!(what.contains("being loaded"), "{series}: {what}");
        }
        other => panic!("{series}: a load for a coming module: {other:?}"),
    }
    assert!(e.list().is_empty());
    // Live now: the same load works, and unloads.
    let t0 = Instant::now();
    loop {
        let m = kernel.modules(ctl.memory()).expect("modules");
        if m.iter()
            .any(|m| m.name == "isofs" && m.state == introspect::ModuleState::Live)
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "isofs never live");
        std::thread::sleep(Duration::from_millis(100));
    }
    let info = e
        .load(&mut ctl, &t, &obj, "isopatch.o")
        .unwrap_or_else(|e| panic!("{series}: load for live isofs: {e}"));
    assert_eq!(info.functions[0].object.as_deref(), Some("isofs"));
    e.unload(&mut ctl, "isopatch", &kernel, Duration::from_secs(30))
        .expect("unload");
    // Caught while it is removed (at `free_module`, state GOING): refused too.
    let free = kernel
        .lookup("free_module", None)
        .expect("free_module in vmlinux");
    ctl.set_breakpoints(&[free]).expect("breakpoint");
    g.spawn("rmmod isofs").expect("rmmod in the background");
    let ev = ctl
        .wait_event(Duration::from_secs(60))
        .expect("wait for the breakpoint");
    assert!(
        matches!(ev, Some(patcher::GuestEvent::Breakpoint { rip, .. }) if rip == free),
        "{series}: rmmod isofs did not stop at free_module: {ev:?}"
    );
    let r = e.load(&mut ctl, &t, &obj, "isopatch.o");
    ctl.set_breakpoints(&[]).expect("clear breakpoints");
    ctl.resume().expect("resume");
    match r {
        Err(PatchError::Module { module, what, .. }) => {
            assert_eq!(module, "isofs");
            assert!(what.contains("being unloaded"), "{series}: {what}");
        }
        other => panic!("{series}: a load for a going module: {other:?}"),
    }
    assert!(e.list().is_empty());
    drop(ctl);
}

#[test]
fn module_patch_6_1() {
    check(KernelSeries::V6_1);
}

#[test]
fn module_patch_6_12() {
    check(KernelSeries::V6_12);
}
