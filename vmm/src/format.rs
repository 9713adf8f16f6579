//! Human-readable rendering of API results for the CLI (`--json` prints them raw).

use std::fmt::Write as _;

use serde_json::Value;

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// An address from the API: a hex string (`"0xffffffff81000000"`) or, from older servers, a
/// JSON number.
fn addr(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => introspect::hex::parse_hex(s).ok(),
        other => other.as_u64(),
    }
}

fn hex(v: &Value) -> String {
    addr(v)
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
            addr(&a["start"]).unwrap_or(0),
            a["len"].as_u64().unwrap_or(0)
        );
    }
    if let Some(p) = v["patches"].as_u64() {
        let _ = writeln!(s, "patches: {p}");
    }
    s
}

/// `inspect kernel`: release, KASLR, paging, where kallsyms is, and the slide cross-checks.
pub fn kernel(v: &Value) -> String {
    if !v.is_object() {
        return pretty(v);
    }
    let h = |k: &str| {
        addr(&v[k])
            .map(|n| format!("{n:#x}"))
            .unwrap_or_else(|| "?".into())
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "release:        {}",
        v["release"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "_text:          {} (physical {})",
        h("text"),
        h("text_pa")
    );
    let _ = writeln!(s, "KASLR slide:    {}", h("slide"));
    let _ = writeln!(s, "phys_base:      {}", h("phys_base"));
    let _ = writeln!(
        s,
        "paging:         {}-level, kernel PGD at {}, PTI {}",
        v["paging_levels"],
        h("pgd_pa"),
        if v["pti"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        }
    );
    let k = &v["kallsyms"];
    let _ = writeln!(
        s,
        "kallsyms:       {} symbols, {} table order, token table at physical {}",
        v["num_syms"],
        k["order"].as_str().unwrap_or("?"),
        addr(&k["token_table_pa"])
            .map(|n| format!("{n:#x}"))
            .unwrap_or_else(|| "?".into())
    );
    for c in v["slide_report"]["checks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let outcome = match &c["outcome"] {
            Value::String(o) => o.to_lowercase(),
            Value::Object(o) => o
                .iter()
                .map(|(k, why)| format!("{} ({})", k.to_lowercase(), why.as_str().unwrap_or("")))
                .collect(),
            other => other.to_string(),
        };
        let _ = writeln!(
            s,
            "slide check:    {:<16} {outcome}",
            c["kind"].as_str().unwrap_or("?")
        );
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
    let Some(name) = v["name"].as_str() else {
        return pretty(v);
    };
    let mut s = String::new();
    let state = v["state"].as_str().unwrap_or("?");
    let unloaded = state == "Unloaded";
    let _ = writeln!(s, "patch {name}: {state}");
    for f in v["functions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let pos = f["sympos"]
            .as_u64()
            .filter(|p| *p > 0)
            .map(|p| format!(",{p}"))
            .unwrap_or_default();
        let active = if unloaded || state == "Held" {
            "removed"
        } else if f["active"].as_bool() == Some(true) {
            "active"
        } else {
            "superseded"
        };
        let _ = writeln!(
            s,
            "    {}{pos} at {} -> {} ({active})",
            f["old_name"].as_str().unwrap_or("?"),
            hex(&f["old_addr"]),
            hex(&f["new_addr"])
        );
    }
    if let Some(h) = v["held"].as_object() {
        let _ = writeln!(
            s,
            "    disabled; code and data kept because {}",
            h.get("by").and_then(Value::as_str).unwrap_or("?")
        );
        for f in h
            .get("stack")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let _ = writeln!(s, "        {}", f.as_str().unwrap_or("?"));
        }
    }
    let u = &v["unload"];
    if let Some(checks) = u["checks"].as_u64().filter(|&c| c > 1) {
        let _ = writeln!(
            s,
            "    waited {} µs ({checks} checks) until nothing in the guest could reach it; first held by {}",
            u["waited_us"].as_u64().unwrap_or(0),
            u["first_hold"]["by"].as_str().unwrap_or("?")
        );
    }
    let (op, pause, total) = if unloaded {
        ("unload", "unload_pause_us", "unload_us")
    } else {
        ("load", "pause_us", "load_us")
    };
    if let (Some(p), Some(t)) = (v[pause].as_u64(), v[total].as_u64()) {
        let _ = writeln!(
            s,
            "    {op} took {t} µs, of which the guest was paused {p} µs"
        );
    }
    s
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn addresses_read_from_hex_strings_and_numbers_alike() {
        let hex = json!([{"addr": "0xffffffff81000000", "type": "T", "name": "_text"},
                         {"addr": "0x0", "type": "A", "name": "fixed_percpu_data"}]);
        let num = json!([{"addr": 0xffff_ffff_8100_0000u64, "type": "T", "name": "_text"},
                         {"addr": 0, "type": "A", "name": "fixed_percpu_data"}]);
        let want = "ffffffff81000000 T _text\n0000000000000000 A fixed_percpu_data\n";
        assert_eq!(super::symbols(&hex), want);
        assert_eq!(super::symbols(&num), want);
        let bad = json!([{"addr": "ffffffff81000000", "type": "T", "name": "x"}]);
        assert_eq!(super::symbols(&bad), format!("{} T x\n", "?".repeat(16)));

        let one = json!([{"addr": "0xffffffff81234560", "type": "t", "name": "f",
                          "sympos": 2, "size": 96}]);
        assert_eq!(
            super::symbols(&one),
            "ffffffff81234560 t f  sympos=2 size=0x60\n"
        );

        let st = json!({"host": "kvm", "vcpus": 2, "paused": false,
                        "patch_arena": {"start": "0x7fe00000", "len": 2097152}, "patches": 0});
        assert!(
            super::status(&st).contains("arena:   0x7fe00000 + 0x200000 (e820 reserved)"),
            "{}",
            super::status(&st)
        );
        let k = json!({"release": "6.12", "text": "0xffffffff9a000000", "text_pa": "0x2a00000",
                       "slide": "0x19000000", "phys_base": "0x0", "paging_levels": 5,
                       "pgd_pa": "0x2a0c000", "pti": false, "num_syms": 1,
                       "kallsyms": {"order": "New", "token_table_pa": "0x3e1a000"},
                       "slide_report": {"checks": []}});
        let text = super::kernel(&k);
        assert!(
            text.contains("_text:          0xffffffff9a000000 (physical 0x2a00000)")
                && text.contains("KASLR slide:    0x19000000")
                && text.contains("kernel PGD at 0x2a0c000")
                && text.contains("token table at physical 0x3e1a000"),
            "{text}"
        );
        let p = json!({"name": "p", "state": "Enabled", "functions": [{"old_name": "f",
                       "sympos": 0, "old_addr": "0xffffffff81234560",
                       "new_addr": "0xffffffffc0001000", "active": true}]});
        assert!(
            super::patch(&p).contains("f at ffffffff81234560 -> ffffffffc0001000 (active)"),
            "{}",
            super::patch(&p)
        );
    }
}
