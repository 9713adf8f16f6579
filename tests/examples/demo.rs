//! The hvpatch demo: boot a Debian guest kernel in QEMU, attach hvpatch from the outside,
//! live-patch `cmdline_proc_show` and show `cat /proc/cmdline` change — and change back.
//!
//! `cargo run --release -p hvpatch-tests --example demo [-- 6.1|6.12]` (scripts/demo does it).

use std::path::PathBuf;
use std::process::ExitCode;

use harness::{hvpatch, AttachServer, Guest, GuestSpec, KernelSeries};

fn step(what: &str) {
    println!("\n\x1b[1m== {what}\x1b[0m");
}

fn host(args: &[&str]) -> Result<String, String> {
    println!("$ hvpatch {}", args.join(" "));
    let out = hvpatch(args).map_err(|e| e.to_string())?;
    print!("{}", out.stdout);
    if !out.success {
        return Err(format!("hvpatch {} failed: {}", args.join(" "), out.stderr));
    }
    Ok(out.stdout)
}

fn guest(g: &mut Guest, cmd: &str) -> Result<String, String> {
    println!("guest# {cmd}");
    let out = g.run(cmd).map_err(|e| e.to_string())?;
    println!("{}", out.trim_end());
    Ok(out)
}

fn demo(series: KernelSeries) -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let patch_src = root.join("examples/patches/cmdline.c");
    let out_dir = root.join("target/demo");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let patch_obj = out_dir.join("cmdline.o");

    step(&format!(
        "Booting a Debian {} cloud kernel in QEMU (TCG, 2 vCPUs, 512 MiB, KASLR on)",
        series.dir_name()
    ));
    let mut g = Guest::boot(GuestSpec::new(series)).map_err(|e| e.to_string())?;
    guest(&mut g, "uname -r")?;
    let before = guest(&mut g, "cat /proc/cmdline")?;

    step("Attaching hvpatch through QEMU's gdbstub and the shared RAM file (nothing inside the guest)");
    let srv = AttachServer::start(&g).map_err(|e| e.to_string())?;
    let sock = srv.socket().display().to_string();
    println!(
        "$ hvpatch attach --qemu-gdb {} --qemu-mem {} --api-socket {sock} &",
        g.gdb_socket().display(),
        g.mem_file().display()
    );
    host(&["--api-socket", &sock, "inspect", "kernel"])?;
    host(&[
        "--api-socket",
        &sock,
        "inspect",
        "symbol",
        "cmdline_proc_show",
    ])?;

    step("Building the patch (the kernel's livepatch sample) and loading it");
    host(&[
        "build",
        &patch_src.display().to_string(),
        "-o",
        &patch_obj.display().to_string(),
    ])?;
    host(&[
        "--api-socket",
        &sock,
        "patch",
        "load",
        &patch_obj.display().to_string(),
    ])?;
    let patched = guest(&mut g, "cat /proc/cmdline")?;
    if patched.trim() != "this has been live patched" {
        return Err(format!("the patch did not take effect: {patched:?}"));
    }
    host(&["--api-socket", &sock, "patch", "list"])?;

    step("Unloading the patch: the original function is back, byte for byte");
    host(&["--api-socket", &sock, "patch", "unload", "livepatch-sample"])?;
    let after = guest(&mut g, "cat /proc/cmdline")?;
    if after != before {
        return Err(format!(
            "after unload /proc/cmdline is {after:?}, was {before:?}"
        ));
    }
    guest(&mut g, "echo the guest is still fine: $(cat /proc/loadavg)")?;
    drop(srv);
    g.shutdown().map_err(|e| e.to_string())?;
    step("Done: patched and unpatched a running kernel from the hypervisor");
    Ok(())
}

fn main() -> ExitCode {
    let series = match std::env::args().nth(1).as_deref() {
        None | Some("6.12") => KernelSeries::V6_12,
        Some("6.1") => KernelSeries::V6_1,
        Some(other) => {
            eprintln!("usage: demo [6.1|6.12] (got {other})");
            return ExitCode::FAILURE;
        }
    };
    match demo(series) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
