//! The API `Session` on the booted-guest RAM snapshots (6.1, 6.12), driven through
//! `Handler::handle` exactly as the controller drives it. Ground truth: the guest's own
//! /proc/kallsyms and `uname -r`. (RAM after load/unload is checked byte for byte by the
//! engine snapshot tests.)

#[path = "../../patcher/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use vmm::api::{Handler, InspectWhat, Reply, Request, Response, Session};

fn call(s: &mut Session, req: Request) -> Response {
    let (reply, rx) = Reply::channel();
    s.handle(req, reply);
    // A waiting unload answers from tick.
    let t0 = Instant::now();
    loop {
        if let Ok(r) = rx.try_recv() {
            return r;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no reply");
        s.tick();
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ok(s: &mut Session, req: Request) -> Value {
    let r = call(s, req.clone());
    assert!(r.ok, "{req:?}: {:?}", r.error);
    let v = r.result.unwrap_or(Value::Null);
    // The result is exactly its type's serialized form (what the CLI and docs/API.md read).
    let typed = req
        .check_result(v.clone())
        .unwrap_or_else(|e| panic!("{req:?}: result does not fit its type: {e}"));
    assert_eq!(typed, v, "{req:?}");
    v
}

fn err_kind(s: &mut Session, req: Request) -> (String, String) {
    let r = call(s, req.clone());
    assert!(!r.ok, "{req:?} should fail: {:?}", r.result);
    let e = r.error.unwrap();
    (e.kind, e.message)
}

fn session_on(snap: &'static common::Snapshot) {
    let mut s = Session::new(Box::new(snap.guest()), "snapshot");
    let st = ok(&mut s, Request::Status {});
    assert_eq!(st["vcpus"], json!(snap.vcpus.len()));
    assert_eq!(st["paused"], false);

    let k = ok(
        &mut s,
        Request::Inspect {
            what: InspectWhat::Kernel,
            name: None,
        },
    );
    assert_eq!(k["release"], json!(snap.release), "{k}");

    // Every symbol, with its address as a hex string, as /proc/kallsyms says.
    let syms = ok(
        &mut s,
        Request::Inspect {
            what: InspectWhat::Symbols,
            name: None,
        },
    );
    let ours: Vec<String> = syms
        .as_array()
        .unwrap()
        .iter()
        .map(|y| {
            let a = y["addr"].as_str().expect("addresses are hex strings");
            let a = introspect::hex::parse_hex(a).unwrap();
            format!(
                "{a:016x} {} {}",
                y["type"].as_str().unwrap(),
                y["name"].as_str().unwrap()
            )
        })
        .collect();
    let proc: Vec<&str> = snap
        .kallsyms
        .lines()
        .filter(|l| !l.contains('['))
        .map(str::trim_end)
        .collect();
    assert_eq!(ours.len(), proc.len(), "symbol count vs /proc/kallsyms");
    assert!(ours.iter().zip(&proc).all(|(a, b)| a == b));

    // Load, list, a refused second load, unload.
    let obj = base64::engine::general_purpose::STANDARD.encode(common::cmdline_patch());
    let load = |o: &str| Request::PatchLoad {
        object_base64: o.to_string(),
        file_name: "cmdline.o".into(),
        immediate: Some(true),
        wait: None,
        timeout_ms: None,
        switcher: None,
    };
    let info = ok(&mut s, load(&obj));
    assert_eq!(info["state"], "Enabled");
    let name = info["name"].as_str().unwrap().to_string();
    assert_eq!(
        ok(&mut s, Request::PatchList {}).as_array().unwrap().len(),
        1
    );
    let (kind, msg) = err_kind(&mut s, load(&obj));
    assert_eq!(kind, "patch", "{msg}");
    assert!(msg.contains("already loaded"), "{msg}");
    let u = ok(
        &mut s,
        Request::PatchUnload {
            name: name.clone(),
            timeout_ms: Some(5000),
        },
    );
    assert_eq!(u["state"], "Unloaded");
    assert!(u["unload"]["checks"].as_u64().unwrap() >= 1);
    assert!(ok(&mut s, Request::PatchList {})
        .as_array()
        .unwrap()
        .is_empty());

    // Bad requests: named errors, nothing written.
    let (kind, _) = err_kind(
        &mut s,
        Request::PatchInfo {
            name: "nope".into(),
        },
    );
    assert_eq!(kind, "not_found");
    let (kind, _) = err_kind(
        &mut s,
        Request::PatchUnload {
            name: "nope".into(),
            timeout_ms: None,
        },
    );
    assert_eq!(kind, "not_found");
    let (kind, msg) = err_kind(&mut s, load("not base64!"));
    assert_eq!(kind, "bad_request", "{msg}");
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"\x7fELF garbage");
    let (kind, _) = err_kind(&mut s, load(&garbage));
    assert_eq!(kind, "patch");
    let (kind, msg) = err_kind(
        &mut s,
        Request::Inspect {
            what: InspectWhat::Symbol,
            name: None,
        },
    );
    assert_eq!(kind, "bad_request", "{msg}");
}

#[test]
fn session_on_snapshot_6_1() {
    session_on(common::snap_6_1());
}

#[test]
fn session_on_snapshot_6_12() {
    session_on(common::snap_6_12());
}
