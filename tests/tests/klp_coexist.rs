//! hvpatch beside the guest's own livepatch (klp), on booted 6.1 and 6.12 guests with a klp
//! module built for that exact Debian kernel (`tests/klp/`, the kernel's livepatch-sample):
//! - the guest's klp patches `cmdline_proc_show`, hvpatch then patches `version_proc_show` under
//!   its consistency model: both changes show, and hvpatch refuses the function klp owns;
//! - while an hvpatch transition runs, the guest's klp cannot start one (`insmod` of the klp
//!   module fails with EBUSY, no warning), and works again once ours is over;
//! - the same change (enable, then disable) made by klp and by hvpatch, idle and under a
//!   getpid hammer on both vCPUs, timed in the same guest and printed side by side (the README's
//!   benchmark table).
//!
//! Every step fails on any oops/BUG/WARNING in the guest's dmesg.

use std::time::{Duration, Instant};

use harness::klp::{build_klp_module, KLP_CMDLINE, KLP_MODULE};
use harness::patching::patch_file;
use harness::soak::kernel_complaints;
use harness::{AttachServer, Guest, GuestSpec, KernelSeries};

const VERSION_PATCH: &str = "static int show(struct seq_file *m, void *v) { seq_printf(m, \"hvpatch was here\\n\"); return 0; }\n\
    HVPATCH_FUNC(version_proc_show, show);";
const CMDLINE_PATCH: &str =
    "static int show(struct seq_file *m, void *v) { seq_printf(m, \"x\\n\"); return 0; }\n\
    HVPATCH_FUNC(cmdline_proc_show, show);";
const KTHREADD_PATCH: &str = "HVPATCH_ORIG(int, kthreadd, (void *unused));\n\
    static int new_kthreadd(void *unused) { return hvpatch_orig_kthreadd(unused); }\n\
    HVPATCH_FUNC(kthreadd, new_kthreadd);";

/// The guest's own klp crashed the guest: an `int3` trap from its `text_poke_bp()`, the
/// multi-threaded-TCG race KLP-INTERNALS §10 describes (klp rewrites hundreds of static-call
/// sites while the other vCPU runs stale translated code). Carries the console tail.
struct KlpCrashed(String);

/// Runs `action` in the guest and waits until the klp transition is over; ms, as the guest's
/// uptime clock measures them (10 ms resolution, polling every 5 ms).
fn klp_timed(g: &mut Guest, action: &str) -> Result<u64, KlpCrashed> {
    let t = format!("/sys/kernel/livepatch/{KLP_MODULE}/transition");
    let out = match g.run_timeout(
        &format!(
            "t0=$(cut -d' ' -f1 /proc/uptime | tr -d .); {action}; \
             while [ \"$(cat {t} 2>/dev/null)\" = 1 ]; do usleep 5000; done; \
             t1=$(cut -d' ' -f1 /proc/uptime | tr -d .); echo $(( (t1 - t0) * 10 ))"
        ),
        Duration::from_secs(120),
    ) {
        Ok(out) => out,
        Err(e) => {
            let text = format!("{e:?}");
            // Only the guest's own text-poke crash during a klp action is retried: "Oops: int3"
            // on the console (the error carries only the tail; the whole log has it).
            let log = std::fs::read_to_string(g.serial_log()).unwrap_or_default();
            let oops = log
                .lines()
                .rev()
                .find(|l| l.contains("Oops:"))
                .is_some_and(|l| l.contains("int3"));
            if text.contains("QemuExited") && (text.contains("int3") || oops) {
                return Err(KlpCrashed(text));
            }
            panic!("klp action `{action}`: {text}");
        }
    };
    Ok(out
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("klp timing: {out}")))
}

/// Runs the hvpatch CLI `args` (a load, enable or disable that waits for its transition):
/// "<wall-clock ms of the CLI> (<transition ms, as the engine measured it>)".
fn hv_timed(srv: &AttachServer, args: &[&str]) -> String {
    let t = Instant::now();
    let v = srv
        .json(args)
        .unwrap_or_else(|e| panic!("hvpatch {args:?}: {e}\n{}", srv.log_text()));
    let wall = t.elapsed().as_millis();
    let lt = &v["last_transition"];
    assert!(lt.is_object(), "no last_transition: {v:#}");
    format!("{wall} ({} in transition)", lt["elapsed_ms"])
}

fn healthy(g: &mut Guest, before: &[String], when: &str) {
    harness::soak::assert_no_new_complaints(g, before, when);
}

/// Runs [`scenario`]; a guest that the guest's own klp crashed (never one of hvpatch's writes,
/// which are made with every vCPU stopped) is booted again, at most 3 guests in all, and the
/// crash is printed.
fn coexist(series: KernelSeries) {
    let release = harness::find_kernel(series)
        .expect("guest images (scripts/setup)")
        .release;
    let ko = build_klp_module(&release).unwrap_or_else(|e| panic!("{e}"));
    for attempt in 1..=3 {
        match scenario(series, &release, &ko) {
            Ok(()) => return,
            Err(KlpCrashed(tail)) => eprintln!(
                "klp_coexist {release}, guest {attempt}: the guest's own klp crashed it \
                 (int3 from its text_poke_bp under multi-threaded TCG); booting another:\n{tail}"
            ),
        }
    }
    panic!("{release}: the guest's own klp crashed 3 guests in a row");
}

fn scenario(series: KernelSeries, release: &str, ko: &[u8]) -> Result<(), KlpCrashed> {
    let mut g = Guest::boot(GuestSpec::new(series).file("/klp.ko", ko.to_vec())).expect("boot");
    let before = kernel_complaints(&g.run("dmesg").unwrap());
    let cmdline = g.run("cat /proc/cmdline").unwrap();
    let version = g.run("cat /proc/version").unwrap();
    let srv = AttachServer::start(&g).expect("hvpatch attach");
    let vobj = patch_file("hvversion", VERSION_PATCH);
    // The kernel model (kallsyms, BTF, ORC) is built once per attach, by the first request
    // that needs it: here, not inside the first timed load.
    let t = Instant::now();
    srv.json(&["inspect", "kernel"]).expect("inspect kernel");
    let model_ms = t.elapsed().as_millis();

    let mut rows = Vec::new();
    for load in ["idle", "getpid hammer on both vCPUs"] {
        if load != "idle" {
            g.spawn("exec hammer 0 getpid > /dev/null").unwrap();
            g.spawn("exec hammer 1 getpid > /dev/null").unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        // klp: enable, check, disable, remove.
        let klp_on = klp_timed(&mut g, "insmod /klp.ko")?;
        assert_eq!(g.run("cat /proc/cmdline").unwrap().trim(), KLP_CMDLINE);
        // hvpatch beside it, on another function; klp's function is refused.
        let hv_on = hv_timed(&srv, &["patch", "load", &vobj, "--timeout", "60"]);
        assert_eq!(g.run("cat /proc/version").unwrap(), "hvpatch was here\n");
        assert_eq!(g.run("cat /proc/cmdline").unwrap().trim(), KLP_CMDLINE);
        let r = srv
            .cli(&["patch", "load", &patch_file("hvcmdline", CMDLINE_PATCH)])
            .unwrap();
        assert!(!r.success, "a function klp owns must be refused");
        // Its site calls ftrace (klp's ops): no jump after that call either, since klp's handler
        // redirects the ip past it; the guest's ftrace record says so.
        assert!(
            r.stderr.contains("ftrace") && r.stderr.contains("FTRACE_FL_IPMODIFY"),
            "{}",
            r.stderr
        );
        let r = srv
            .cli(&[
                "patch",
                "load",
                "--immediate",
                &patch_file("hvcmdline", CMDLINE_PATCH),
            ])
            .unwrap();
        assert!(
            !r.success && r.stderr.contains("FTRACE_FL_IPMODIFY"),
            "an immediate load of a function klp owns must be refused: {}",
            r.stderr
        );
        let hv_off = hv_timed(&srv, &["patch", "disable", "hvversion", "--timeout", "60"]);
        assert_eq!(g.run("cat /proc/version").unwrap(), version);
        srv.json(&["patch", "unload", "hvversion"]).unwrap();
        let klp_off = klp_timed(
            &mut g,
            &format!("echo 0 > /sys/kernel/livepatch/{KLP_MODULE}/enabled"),
        )?;
        g.run(&format!("rmmod {KLP_MODULE}")).unwrap();
        assert_eq!(g.run("cat /proc/cmdline").unwrap(), cmdline);
        rows.push(format!(
            "{release}, {load}: enable klp {klp_on} ms / hvpatch {hv_on} ms; disable klp {klp_off} ms / hvpatch {hv_off} ms (hvpatch: the CLI's wall clock, process start included, and the engine's transition time)"
        ));
        healthy(&mut g, &before, load);
    }
    g.run("kill -TERM $(pidof hammer) 2>/dev/null; sleep 1; true")
        .unwrap();

    // While an hvpatch transition runs (kthreadd holds it), the guest's klp cannot start one.
    srv.json(&[
        "patch",
        "load",
        &patch_file("busy", KTHREADD_PATCH),
        "--no-wait",
    ])
    .unwrap();
    assert!(!srv.json(&["patch", "status"]).unwrap()["transition"].is_null());
    let (code, out) = g.run_status("insmod /klp.ko 2>&1").unwrap();
    assert_ne!(
        code, 0,
        "insmod of a klp module during our transition must fail: {out}"
    );
    assert!(out.contains("busy") || out.contains("Busy"), "{out}");
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), cmdline);
    srv.json(&["patch", "disable", "busy"]).unwrap();
    srv.json(&["patch", "unload", "busy"]).unwrap();
    // Idle again: klp works.
    klp_timed(&mut g, "insmod /klp.ko")?;
    assert_eq!(g.run("cat /proc/cmdline").unwrap().trim(), KLP_CMDLINE);
    klp_timed(
        &mut g,
        &format!("echo 0 > /sys/kernel/livepatch/{KLP_MODULE}/enabled"),
    )?;
    g.run(&format!("rmmod {KLP_MODULE}")).unwrap();
    healthy(&mut g, &before, "after the EBUSY check");
    eprintln!("klp vs hvpatch: {release}: hvpatch's kernel model, once per attach: {model_ms} ms");
    for r in rows {
        eprintln!("klp vs hvpatch: {r}");
    }
    Ok(())
}

#[test]
fn klp_coexist_6_1() {
    coexist(KernelSeries::V6_1);
}

#[test]
fn klp_coexist_6_12() {
    coexist(KernelSeries::V6_12);
}
