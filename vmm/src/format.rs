//! Human-readable rendering of API results for the CLI (`--json` prints them raw).

use std::fmt::Write as _;

use serde_json::Value;

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

fn hex(v: &Value) -> String {
    v.as_u64()
        .map(|n| format!("{n:016x}"))
        .unwrap_or_else(|| "?".repeat(16))
}

/// `vm status|pause|resume`.
pub fn status(v: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "host:    {}", v["host"].as_str().unwrap_or("?"));
    let _ = writeln!(s, "vcpus:   {}", v["vcpus"]);
    let state = if v["paused"].as_bool() == Some(true) {
        "paused"
    } else {
        "running"
    };
    let _ = writeln!(s, "state:   {state}");
    if let Some(a) = v["patch_arena"].as_object() {
        let _ = writeln!(
            s,
            "arena:   {:#x} + {:#x} (e820 reserved)",
            a["start"].as_u64().unwrap_or(0),
            a["len"].as_u64().unwrap_or(0)
        );
    }
    if let Some(p) = v["patches"].as_u64() {
        let _ = writeln!(s, "patches: {p}");
    }
    s
}

/// `inspect kernel`: one `key: value` line per field.
pub fn kernel(v: &Value) -> String {
    let Some(o) = v.as_object() else {
        return pretty(v);
    };
    let mut s = String::new();
    for (k, val) in o {
        let shown = match val {
            Value::Number(n) if n.as_u64().is_some_and(|x| x > 0xffff) => {
                format!("{:#x}", n.as_u64().unwrap_or(0))
            }
            Value::String(t) => t.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(s, "{k:<24} {shown}");
    }
    s
}

/// `inspect symbols` / `inspect symbol NAME`: /proc/kallsyms-style lines.
pub fn symbols(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return pretty(v);
    };
    let mut s = String::new();
    for sym in list {
        let _ = write!(
            s,
            "{} {} {}",
            hex(&sym["addr"]),
            sym["type"].as_str().unwrap_or("?"),
            sym["name"].as_str().unwrap_or("?")
        );
        if let Some(p) = sym["sympos"].as_u64() {
            let _ = write!(s, "  sympos={p}");
        }
        if let Some(z) = sym["size"].as_u64() {
            let _ = write!(s, " size={z:#x}");
        }
        s.push('\n');
    }
    s
}

/// `inspect tasks`: a ps-like table.
pub fn tasks(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return pretty(v);
    };
    let mut s = format!(
        "{:>6} {:>6} {:<5} {:>4} {:<16} {}\n",
        "PID", "TGID", "STATE", "VCPU", "COMM", "TASK"
    );
    for t in list {
        let vcpu = t["running_on_vcpu"]
            .as_u64()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:>6} {:>6} {:<5} {:>4} {:<16} {}",
            t["pid"],
            t["tgid"],
            t["state_letter"]
                .as_str()
                .or(t["state"].as_str())
                .unwrap_or("?"),
            vcpu,
            t["comm"].as_str().unwrap_or("?"),
            hex(&t["addr"])
        );
    }
    s
}

fn frames(s: &mut String, frames: &Value) {
    for f in frames.as_array().map(Vec::as_slice).unwrap_or_default() {
        let sym = f["symbol"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| hex(&f["addr"]));
        let _ = writeln!(s, "    {sym}");
    }
}

fn verdict(st: &Value) -> String {
    let kind = st["kind"].as_str().unwrap_or("");
    let rel = if st["reliable"].as_bool() == Some(true) {
        "reliable".to_string()
    } else {
        format!("UNRELIABLE ({})", st["reason"].as_str().unwrap_or("?"))
    };
    format!("{kind} {rel}")
}

/// `inspect stacks`: per task and per vCPU.
pub fn stacks(v: &Value) -> String {
    let mut s = String::new();
    if let Some(cpus) = v["vcpus"].as_array() {
        for c in cpus {
            let _ = writeln!(s, "vcpu {}: {}", c["vcpu"], verdict(&c["stack"]));
            frames(&mut s, &c["stack"]["frames"]);
        }
    }
    if let Some(ts) = v["tasks"].as_array() {
        for t in ts {
            let _ = writeln!(
                s,
                "{} {}: {}",
                t["pid"],
                t["comm"].as_str().unwrap_or("?"),
                verdict(&t["stack"])
            );
            frames(&mut s, &t["stack"]["frames"]);
        }
    }
    if s.is_empty() {
        pretty(v)
    } else {
        s
    }
}

/// `inspect vcpus`.
pub fn vcpus(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return pretty(v);
    };
    let mut s = String::new();
    for c in list {
        let _ = writeln!(
            s,
            "vcpu {}: {} rip={} rsp={} cr3={} current={} {}",
            c["vcpu"],
            c["mode"].as_str().unwrap_or("?"),
            hex(&c["rip"]),
            hex(&c["rsp"]),
            hex(&c["cr3"]),
            c["current_pid"],
            c["current_comm"].as_str().unwrap_or("?")
        );
        if let Some(sym) = c["rip_symbol"].as_str() {
            let _ = writeln!(s, "    at {sym}");
        }
    }
    s
}

/// `patch load|unload|info`.
pub fn patch(v: &Value) -> String {
    let mut s = String::new();
    if let Some(name) = v["name"].as_str() {
        let _ = writeln!(s, "patch {name}: {}", v["state"].as_str().unwrap_or("?"));
        for f in v["functions"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let _ = writeln!(
                s,
                "    {} ({}) -> {} ({})",
                f["old_name"].as_str().unwrap_or("?"),
                hex(&f["old_addr"]),
                f["new_name"].as_str().unwrap_or("?"),
                hex(&f["new_addr"])
            );
        }
        if let Some(p) = v["pause_us"].as_u64() {
            let _ = writeln!(s, "    guest paused for {p} µs");
        }
        return s;
    }
    pretty(v)
}

/// `patch list`.
pub fn patch_list(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return pretty(v);
    };
    if list.is_empty() {
        return "no patches loaded\n".into();
    }
    list.iter().map(patch).collect()
}
