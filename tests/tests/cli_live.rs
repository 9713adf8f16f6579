//! The `hvpatch` CLI and API against a live guest through `hvpatch attach`: VM control, patch
//! build/load/list/info/unload as an operator runs them, and clear errors for bad input.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use harness::{hvpatch, AttachServer, Guest, GuestSpec, KernelSeries};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Sends one raw request line; returns the parsed response.
fn raw(srv: &AttachServer, line: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(srv.socket()).expect("connect");
    s.write_all(line).unwrap();
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap_or_else(|e| panic!("bad response {resp:?}: {e}"))
}

/// A 64-bit address from `--json` output: it must be a `"0x…"` string (a JSON number above
/// 2^53 loses precision in jq and JavaScript).
fn addr(v: &serde_json::Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("address {v} is not a hex string"));
    introspect::hex::parse_hex(s).unwrap_or_else(|e| panic!("address {v}: {e}"))
}

/// Runs Debian's jq on `input` with `filter` (`-r`); returns its stdout.
fn jq(filter: &str, input: String) -> String {
    let mut child = Command::new("jq")
        .args(["-r", filter])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running jq (scripts/setup installs it: apt-get install jq)");
    let mut stdin = child.stdin.take().unwrap();
    // Feed it from another thread: the output is as large as the input.
    let feeder = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("jq");
    feeder.join().unwrap().expect("writing to jq");
    assert!(
        out.status.success(),
        "jq {filter}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("jq output is UTF-8")
}

/// `inspect symbols --json` piped through jq gives every address exactly as the guest's
/// /proc/kallsyms does: the addresses are hex strings, which jq passes through unchanged
/// (jq 1.6 prints a number like 18446744071912401472 as 18446744071912400000).
fn jq_reads_the_guests_addresses(g: &mut Guest, srv: &AttachServer) {
    let proc = g
        .run_bulk("cat /proc/kallsyms")
        .expect("cat /proc/kallsyms");
    let out = srv.cli(&["inspect", "symbols", "--json"]).unwrap();
    assert!(out.success, "inspect symbols --json: {}", out.stderr);
    let text = jq(r#".[] | "\(.addr) \(.type) \(.name)""#, out.stdout);
    let ours: Vec<String> = text
        .lines()
        .map(|l| {
            let (a, rest) = l.split_once(' ').unwrap_or((l, ""));
            let digits = a
                .strip_prefix("0x")
                .unwrap_or_else(|| panic!("jq printed an address that is not hex: {l:?}"));
            format!("{digits:0>16} {rest}")
        })
        .collect();
    harness::patching::assert_kallsyms_equal(&proc, &ours, "jq");
}

#[test]
fn cli_controls_and_patches_a_live_guest() {
    let mut g = Guest::boot(GuestSpec::new(KernelSeries::V6_12)).expect("boot");
    let original = g.run("cat /proc/cmdline").unwrap();
    let srv = AttachServer::start(&g).expect("hvpatch attach");

    // VM control.
    let st = srv.json(&["vm", "status"]).unwrap();
    assert_eq!(st["host"], "qemu-attach");
    assert_eq!(st["vcpus"], 2);
    assert_eq!(st["paused"], false);
    jq_reads_the_guests_addresses(&mut g, &srv);
    srv.cli_ok(&["vm", "pause"]).unwrap();
    assert_eq!(srv.json(&["vm", "status"]).unwrap()["paused"], true);
    // Inspection keeps an operator's pause.
    srv.json(&["inspect", "tasks"]).unwrap();
    assert_eq!(srv.json(&["vm", "status"]).unwrap()["paused"], true);
    srv.cli_ok(&["vm", "resume"]).unwrap();
    assert_eq!(g.run("echo alive").unwrap().trim(), "alive");

    // Build, load, list, info, unload.
    let obj = std::env::temp_dir().join(format!("hvpatch-cli-{}.o", std::process::id()));
    let src = repo().join("examples/patches/cmdline.c");
    let out = hvpatch(&["build", src.to_str().unwrap(), "-o", obj.to_str().unwrap()]).unwrap();
    assert!(out.success, "hvpatch build: {}", out.stderr);
    let loaded = srv.json(&["patch", "load", obj.to_str().unwrap()]).unwrap();
    assert_eq!(loaded["name"], "livepatch-sample");
    assert_eq!(loaded["functions"][0]["old_name"], "cmdline_proc_show");
    // Addresses are hex strings: the old one is the guest's own, the new one in the kernel half.
    let line = g.run("grep ' cmdline_proc_show$' /proc/kallsyms").unwrap();
    let guest_addr = u64::from_str_radix(line.split_whitespace().next().unwrap_or(""), 16)
        .unwrap_or_else(|_| panic!("/proc/kallsyms line {line:?}"));
    assert_eq!(
        addr(&loaded["functions"][0]["old_addr"]),
        guest_addr,
        "{loaded}"
    );
    assert!(
        addr(&loaded["functions"][0]["new_addr"]) >> 63 == 1,
        "{loaded}"
    );
    assert!(addr(&loaded["code"]["va"]) >> 63 == 1, "{loaded}");
    assert_eq!(
        g.run("cat /proc/cmdline").unwrap().trim(),
        "this has been live patched"
    );
    let list = srv.json(&["patch", "list"]).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let info = srv.json(&["patch", "info", "livepatch-sample"]).unwrap();
    assert_eq!(info["functions"][0]["active"], true);
    let text = srv.cli_ok(&["patch", "info", "livepatch-sample"]).unwrap();
    assert!(
        text.contains("patch livepatch-sample: Enabled")
            && text.contains("cmdline_proc_show at ")
            && text.contains("(active)")
            && text.contains("load took"),
        "{text}"
    );
    // Loading the same patch twice is refused.
    let again = srv.cli(&["patch", "load", obj.to_str().unwrap()]).unwrap();
    assert!(
        !again.success && again.stderr.contains("already loaded"),
        "{again:?}"
    );
    let unloaded = srv.json(&["patch", "unload", "livepatch-sample"]).unwrap();
    assert_eq!(unloaded["state"], "Unloaded", "{unloaded}");
    let funcs = unloaded["functions"].as_array().expect("functions");
    assert!(
        !funcs.is_empty() && funcs.iter().all(|f| f["active"] == false),
        "an unloaded patch reports a live function: {unloaded}"
    );
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), original);
    // The unload's own timing: its pause window lies inside its total.
    let (pause, total) = (
        unloaded["unload_pause_us"].as_u64(),
        unloaded["unload_us"].as_u64(),
    );
    assert!(
        matches!((pause, total), (Some(p), Some(t)) if p <= t),
        "{unloaded}"
    );
    // Once more, with the human output.
    srv.cli_ok(&["patch", "load", obj.to_str().unwrap()])
        .unwrap();
    let text = srv
        .cli_ok(&["patch", "unload", "livepatch-sample"])
        .unwrap();
    assert!(
        text.contains("patch livepatch-sample: Unloaded")
            && text.contains("(removed)")
            && text.contains("unload took"),
        "{text}"
    );
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), original);
    assert_eq!(
        srv.json(&["patch", "list"])
            .unwrap()
            .as_array()
            .map(Vec::len),
        Some(0)
    );

    // Bad input: clear errors, non-zero exit, guest unchanged.
    let not_elf = srv.cli(&["patch", "load", "/etc/hostname"]).unwrap();
    assert!(!not_elf.success, "loading a text file succeeded");
    assert!(
        not_elf.stderr.to_lowercase().contains("elf"),
        "error does not say what is wrong: {}",
        not_elf.stderr
    );
    let missing = srv.cli(&["patch", "unload", "no-such-patch"]).unwrap();
    assert!(
        !missing.success && missing.stderr.contains("no-such-patch"),
        "{missing:?}"
    );
    let nosym = srv
        .cli(&["inspect", "symbol", "no_such_symbol_xyz"])
        .unwrap();
    assert!(
        !nosym.success && nosym.stderr.contains("no_such_symbol_xyz"),
        "{nosym:?}"
    );
    let nofile = srv.cli(&["patch", "load", "/nonexistent.o"]).unwrap();
    assert!(
        !nofile.success && nofile.stderr.contains("/nonexistent.o"),
        "{nofile:?}"
    );
    let nosock = hvpatch(&["--api-socket", "/nonexistent.sock", "vm", "status"]).unwrap();
    assert!(
        !nosock.success && nosock.stderr.contains("/nonexistent.sock"),
        "{nosock:?}"
    );

    // Bad API requests.
    for (line, what) in [
        (&b"{not json\n"[..], "malformed"),
        (b"{\"op\":\"format_disk\"}\n", "malformed"),
        (b"{\"op\":\"status\",\"extra\":1}\n", "malformed"),
        (
            b"{\"op\":\"patch_load\",\"object_base64\":\"!!!\",\"file_name\":\"x.o\"}\n",
            "base64",
        ),
        (b"{\"op\":\"inspect\",\"what\":\"symbol\"}\n", "name"),
    ] {
        let r = raw(&srv, line);
        assert_eq!(r["ok"], false, "{}: {r}", String::from_utf8_lossy(line));
        assert!(
            r["error"]["message"].as_str().unwrap_or("").contains(what),
            "{r}"
        );
    }
    assert_eq!(g.run("cat /proc/cmdline").unwrap(), original);
    let _ = std::fs::remove_file(obj);
}

#[test]
fn socket_is_private_and_client_needs_a_socket() {
    let out = hvpatch(&["vm", "status"]).unwrap();
    assert!(
        !out.success && out.stderr.contains("--api-socket"),
        "{out:?}"
    );
    let g = Guest::boot(GuestSpec::new(KernelSeries::V6_1)).expect("boot");
    let srv = AttachServer::start(&g).expect("hvpatch attach");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(srv.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");
    // A second server on the same socket is refused, the first keeps serving.
    let second = hvpatch(&[
        "attach",
        "--qemu-gdb",
        g.gdb_socket().to_str().unwrap(),
        "--qemu-mem",
        g.mem_file().to_str().unwrap(),
        "--api-socket",
        srv.socket().to_str().unwrap(),
    ])
    .unwrap();
    assert!(
        !second.success && second.stderr.contains("in use"),
        "a second server took the socket: {second:?}"
    );
    assert_eq!(srv.json(&["vm", "status"]).unwrap()["host"], "qemu-attach");
}
