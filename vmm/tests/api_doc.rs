//! docs/API.md checked against the API's types.
//!
//! Convention (stated in the doc's "Operations" section): every request example is a fenced
//! block ```` ```json request ````, followed by one or more ```` ```json result ```` blocks,
//! the results that request answers. Checks:
//! - a request example is a [`Request`] (unknown fields are refused by the type); over all
//!   examples of an op, the keys shown are exactly the keys of that request with every
//!   optional argument given;
//! - a result example read as its type ([`Request::check_result`]) and written again has
//!   exactly the keys of the example, recursively: a documented field the type lacks
//!   disappears, a field of the type the doc lacks appears (as `null` at least: result types
//!   always write every field), a wrong type fails;
//! - no array in a result example is empty (its elements' fields would go unchecked);
//! - every op and every `inspect` `what` has a request example with a result.
//!
//! Limitation: the fields of an object shown as `null` are not checked by that example; show
//! the object in some other example.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use vmm::api::{InspectWhat, Request};

/// One request example and the result examples after it.
#[derive(Debug)]
struct Example {
    line: usize,
    request: String,
    results: Vec<(usize, String)>,
}

/// The ```` ```json request ```` / ```` ```json result ```` blocks of `doc`.
fn examples(doc: &str) -> Result<Vec<Example>, String> {
    let mut out: Vec<Example> = Vec::new();
    let mut lines = doc.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let info = match line.trim_end().strip_prefix("```") {
            Some(info) => info.trim(),
            None => continue,
        };
        let kind = match info {
            "json request" => "request",
            "json result" => "result",
            _ => {
                // Another fenced block: skip to its end.
                for (_, l) in lines.by_ref() {
                    if l.trim_end() == "```" {
                        break;
                    }
                }
                continue;
            }
        };
        let mut body = String::new();
        let mut closed = false;
        for (_, l) in lines.by_ref() {
            if l.trim_end() == "```" {
                closed = true;
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        if !closed {
            return Err(format!("line {}: unclosed ```{info} block", i + 1));
        }
        if kind == "request" {
            out.push(Example {
                line: i + 1,
                request: body,
                results: Vec::new(),
            });
        } else {
            match out.last_mut() {
                Some(e) => e.results.push((i + 1, body)),
                None => return Err(format!("line {}: a result before any request", i + 1)),
            }
        }
    }
    Ok(out)
}

/// Compares key sets recursively; `path` names the place for messages.
fn same_keys(doc: &Value, typed: &Value, path: &str, errs: &mut Vec<String>) {
    match (doc, typed) {
        (Value::Object(d), Value::Object(t)) => {
            for k in d.keys().filter(|k| !t.contains_key(*k)) {
                errs.push(format!("{path}.{k}: documented but not in the type"));
            }
            for k in t.keys().filter(|k| !d.contains_key(*k)) {
                errs.push(format!("{path}.{k}: in the type but not documented"));
            }
            for (k, dv) in d {
                if let Some(tv) = t.get(k) {
                    same_keys(dv, tv, &format!("{path}.{k}"), errs);
                }
            }
        }
        (Value::Array(d), Value::Array(t)) => {
            if d.is_empty() {
                errs.push(format!("{path}: empty array (show an element)"));
            }
            for (i, (dv, tv)) in d.iter().zip(t).enumerate() {
                same_keys(dv, tv, &format!("{path}[{i}]"), errs);
            }
        }
        (Value::Object(_), _) | (Value::Array(_), _) => {
            errs.push(format!(
                "{path}: documented as {doc} but the type writes {typed}"
            ));
        }
        _ => {}
    }
}

/// The names serde accepts for a unit-variant or tagged enum: from its "unknown variant"
/// error, so a variant added to the type is found without listing it here.
fn variant_names(error: serde_json::Error) -> Vec<String> {
    let msg = error.to_string();
    let list = msg
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("no variant list in {msg:?}"));
    list.split(',')
        .map(|v| {
            v.trim()
                .trim_matches(|c: char| c == '`' || c.is_whitespace())
        })
        .map(|v| v.split('`').next().unwrap_or(v).to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn all_ops() -> Vec<String> {
    variant_names(serde_json::from_str::<Request>(r#"{"op": "-"}"#).unwrap_err())
}

fn all_whats() -> Vec<String> {
    variant_names(serde_json::from_str::<InspectWhat>(r#""-""#).unwrap_err())
}

/// `r` with every optional argument given: its keys are all the request's keys.
fn with_all_arguments(r: &Request) -> Request {
    match r.clone() {
        Request::Inspect { what, name } => Request::Inspect {
            what,
            name: Some(name.unwrap_or_default()),
        },
        Request::PatchUnload { name, timeout_ms } => Request::PatchUnload {
            name,
            timeout_ms: Some(timeout_ms.unwrap_or_default()),
        },
        Request::PatchLoad {
            object_base64,
            file_name,
            immediate,
            wait,
            timeout_ms,
            switcher,
        } => Request::PatchLoad {
            object_base64,
            file_name,
            immediate: Some(immediate.unwrap_or_default()),
            wait: Some(wait.unwrap_or_default()),
            timeout_ms: Some(timeout_ms.unwrap_or_default()),
            switcher: Some(switcher.unwrap_or_default()),
        },
        Request::PatchEnable {
            name,
            wait,
            timeout_ms,
            switcher,
        } => Request::PatchEnable {
            name,
            wait: Some(wait.unwrap_or_default()),
            timeout_ms: Some(timeout_ms.unwrap_or_default()),
            switcher: Some(switcher.unwrap_or_default()),
        },
        Request::PatchDisable {
            name,
            wait,
            timeout_ms,
            switcher,
        } => Request::PatchDisable {
            name,
            wait: Some(wait.unwrap_or_default()),
            timeout_ms: Some(timeout_ms.unwrap_or_default()),
            switcher: Some(switcher.unwrap_or_default()),
        },
        Request::PatchStatus { name } => Request::PatchStatus {
            name: Some(name.unwrap_or_default()),
        },
        r @ (Request::Status {}
        | Request::Pause {}
        | Request::Resume {}
        | Request::PatchForce { .. }
        | Request::PatchList {}
        | Request::PatchInfo { .. }) => r,
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every problem of `doc` (empty: the doc fits the types).
fn check(doc: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let examples = match examples(doc) {
        Ok(e) => e,
        Err(e) => return vec![e],
    };
    // op -> (keys shown over its request examples, keys of the full request)
    let mut shown: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    let mut whats = BTreeSet::new();
    for ex in &examples {
        let at = format!("request at line {}", ex.line);
        let raw: Value = match serde_json::from_str(&ex.request) {
            Ok(v) => v,
            Err(e) => {
                errs.push(format!("{at}: not JSON: {e}"));
                continue;
            }
        };
        let req: Request = match serde_json::from_value(raw.clone()) {
            Ok(r) => r,
            Err(e) => {
                errs.push(format!("{at}: not a request: {e}"));
                continue;
            }
        };
        let op = raw["op"].as_str().unwrap_or_default().to_string();
        let full = serde_json::to_value(with_all_arguments(&req)).expect("requests serialize");
        let entry = shown.entry(op.clone()).or_default();
        entry.0.extend(keys(&raw));
        entry.1 = keys(&full);
        if ex.results.is_empty() {
            errs.push(format!("{at}: no ```json result after it"));
        }
        for (line, body) in &ex.results {
            let at = format!("{op} result at line {line}");
            let doc: Value = match serde_json::from_str(body) {
                Ok(v) => v,
                Err(e) => {
                    errs.push(format!("{at}: not JSON: {e}"));
                    continue;
                }
            };
            match req.check_result(doc.clone()) {
                Ok(typed) => same_keys(&doc, &typed, &at, &mut errs),
                Err(e) => errs.push(format!("{at}: does not fit the result type: {e}")),
            }
        }
        if let Request::Inspect { what, .. } = &req {
            if !ex.results.is_empty() {
                whats.insert(
                    serde_json::to_value(what)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            }
        }
    }
    for (op, (doc_keys, type_keys)) in &shown {
        for k in doc_keys.difference(type_keys) {
            errs.push(format!(
                "{op} request: {k:?} documented but not an argument"
            ));
        }
        for k in type_keys.difference(doc_keys) {
            errs.push(format!(
                "{op} request: argument {k:?} not shown in any example"
            ));
        }
    }
    for op in all_ops() {
        if !shown.contains_key(&op) {
            errs.push(format!("op {op:?} has no ```json request example"));
        }
    }
    for w in all_whats() {
        if !whats.contains(&w) {
            errs.push(format!("inspect {w:?} has no example with a result"));
        }
    }
    errs
}

fn api_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn api_md_matches_the_types() {
    let doc = api_md();
    let n = examples(&doc).unwrap().len();
    assert!(n >= 13, "only {n} request examples found");
    let errs = check(&doc);
    assert!(
        errs.is_empty(),
        "docs/API.md vs the API types:\n{}",
        errs.join("\n")
    );
}

#[test]
fn variant_lists_come_from_the_types() {
    let ops = all_ops();
    assert!(
        ops.contains(&"status".to_string()) && ops.contains(&"patch_unload".to_string()),
        "{ops:?}"
    );
    assert_eq!(all_whats().len(), 7, "{:?}", all_whats());
}

/// The checker rejects what it should: each of these edits of the real doc is an error.
#[test]
fn the_check_can_fail() {
    let doc = api_md();
    let edit = |from: &str, to: &str| {
        assert!(doc.contains(from), "the doc no longer has {from:?}");
        doc.replacen(from, to, 1)
    };
    let status = r#"{"host": "kvm", "vcpus": 1,"#;
    let cases = [
        (
            "an extra result field",
            edit(status, r#"{"host": "kvm", "new_name": "x", "vcpus": 1,"#),
            "new_name: documented but not in the type",
        ),
        (
            "a missing optional result field",
            edit(
                r#", "patch_arena": null, "patches": 1}"#,
                r#", "patches": 1}"#,
            ),
            "patch_arena: in the type but not documented",
        ),
        (
            "a missing required result field",
            edit(status, r#"{"host": "kvm","#),
            "missing field `vcpus`",
        ),
        (
            "a nested extra field",
            edit(
                r#""active": true, "flags": 0, "new_size": 46,"#,
                r#""active": true, "flags": 0, "x": 2, "new_size": 46,"#,
            ),
            ".x: documented but not in the type",
        ),
        (
            "a number for an address",
            edit(r#""start": "0x1fe00000""#, r#""start": "1fe00000""#),
            "does not fit the result type",
        ),
        (
            "an extra request argument",
            edit(
                r#"{"op": "status"}"#,
                r#"{"op": "status", "verbose": true}"#,
            ),
            "not a request",
        ),
        (
            "an optional argument never shown",
            edit(r#", "timeout_ms": 10000}"#, "}"),
            "argument \"timeout_ms\" not shown",
        ),
        (
            "an undocumented op",
            edit(
                "```json request\n{\"op\": \"patch_list\"}",
                "```json\n{\"op\": \"patch_list\"}",
            ),
            "op \"patch_list\" has no ```json request example",
        ),
        (
            "an empty array",
            edit(
                r#"[{"addr": "0x0", "type": "A", "name": "fixed_percpu_data", "module": null},
 {"addr": "0xffffffff9a000000", "type": "T", "name": "_text", "module": null},
 {"addr": "0xffffffffc0a45010", "type": "t", "name": "isofs_mount", "module": "isofs"}]"#,
                "[]",
            ),
            "empty array",
        ),
    ];
    for (what, doc, want) in cases {
        let errs = check(&doc);
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{what}: expected an error containing {want:?}, got {errs:?}"
        );
    }
}
