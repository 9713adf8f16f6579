//! `hvpatch run` as a process, on /dev/kvm: it boots a (tiny) ELF kernel, serves the VM API on
//! its socket (status, pause, resume), forwards stdin to the guest's COM1, and exits 0 when the
//! guest resets through the i8042. Invalid arguments fail with clear errors.

mod kvm_common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use kvm_common::{assemble, require_kvm, temp_path, tiny_elf_kernel, TINY_KERNEL_ADDR};

const HVPATCH: &str = env!("CARGO_BIN_EXE_hvpatch");

/// Prints "ready\n" on COM1, waits for a received byte, then resets through the i8042.
fn waiting_kernel() -> Vec<u8> {
    let (code, _) = assemble(TINY_KERNEL_ADDR, |a| {
        let mut wait = a.create_label();
        for b in b"ready\n" {
            a.mov(dx, 0x3f8u32)?;
            a.mov(al, *b as u32)?;
            a.out(dx, al)?;
        }
        a.set_label(&mut wait)?;
        a.mov(dx, 0x3fdu32)?;
        a.in_(al, dx)?;
        a.test(al, 1)?;
        a.jz(wait)?;
        a.mov(al, 0xfeu32)?;
        a.out(0x64, al)?;
        a.hlt()?;
        Ok(vec![])
    });
    tiny_elf_kernel(&code, false)
}

fn cli(sock: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(HVPATCH)
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hvpatch_run_serves_the_api_and_exits_0_on_reset() {
    require_kvm();
    let kernel = temp_path("waiting-kernel.elf");
    std::fs::write(&kernel, waiting_kernel()).unwrap();
    let sock = temp_path("run-api.sock");
    let mut child = Command::new(HVPATCH)
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vcpus",
            "2",
            "--memory",
            "128M",
        ])
        .args(["--api-socket", sock.to_str().unwrap(), "--serial", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "guest console");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    let (ok, out, err) = cli(&sock, &["vm", "status", "--json"]);
    assert!(ok, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["host"], "kvm");
    assert_eq!(st["vcpus"], 2);
    assert_eq!(st["paused"], false);
    let arena = &st["patch_arena"];
    assert_eq!(arena["len"], 2 << 20, "default arena: {st}");
    // Addresses are hex strings (JSON numbers lose precision above 2^53 in jq and JavaScript).
    assert!(
        arena["start"]
            .as_str()
            .is_some_and(|s| introspect::hex::parse_hex(s).is_ok()),
        "arena start is not a hex string: {st}"
    );
    assert!(cli(&sock, &["vm", "pause"]).0);
    let (_, out, _) = cli(&sock, &["vm", "status", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["paused"],
        true
    );
    assert!(cli(&sock, &["vm", "resume"]).0);

    // A byte on stdin reaches COM1; the guest resets; hvpatch run exits 0.
    child.stdin.as_mut().unwrap().write_all(b"x").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hvpatch run did not exit after the reset"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "hvpatch run exit status {status}");
    assert!(!sock.exists(), "API socket left behind");
}

#[test]
fn hvpatch_run_rejects_bad_arguments_clearly() {
    let kernel = temp_path("args-kernel.elf");
    std::fs::write(&kernel, waiting_kernel()).unwrap();
    let k = kernel.to_str().unwrap();
    let sock = temp_path("args.sock");
    let s = sock.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--kernel", "/nonexistent/vmlinuz"],
            "/nonexistent/vmlinuz",
        ),
        (vec!["--kernel", "/etc/hostname"], "kernel"),
        (vec!["--kernel", k, "--memory", "1M"], "memory"),
        (vec!["--kernel", k, "--memory", "lots"], "size"),
        (vec!["--kernel", k, "--vcpus", "0"], "vCPU"),
        (vec!["--kernel", k, "--cmdline", "a\nb"], "command line"),
    ] {
        let out = Command::new(HVPATCH)
            .arg("run")
            .args(&args)
            .args(["--api-socket", s])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.to_lowercase().contains(&expect.to_lowercase()),
            "{args:?}: error does not name the problem ({expect}): {stderr}"
        );
    }
}
