//! Human-readable rendering of API results for the CLI (`--json` prints them raw). Each
//! formatter reads the result as its type from `api::types` (the one the server builds); a
//! result that does not fit (a much older or newer server) is printed as JSON.

use std::fmt::Write as _;

use introspect::slide::CheckOutcome;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::api::types::{
    FrameLine, ModuleResult, Patch, PatchState, PatchStatus, StackView, Stacks, Status, SymbolLine,
    SymbolMatch, TaskResult, Unloaded, Vcpu,
};

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Renders `v` read as `T` with `f`, or as JSON when it is not a `T`.
fn typed<T: DeserializeOwned>(v: &Value, f: impl FnOnce(&T) -> String) -> String {
    match T::deserialize(v) {
        Ok(t) => f(&t),
        Err(e) => {
            tracing::debug!("result not in the expected shape ({e}); printing it as JSON");
            pretty(v)
        }
    }
}

/// `vm status|pause|resume`.
pub fn status(v: &Value) -> String {
    typed(v, |st: &Status| {
        let mut s = String::new();
        let _ = writeln!(s, "host:    {}", st.host);
        let _ = writeln!(s, "vcpus:   {}", st.vcpus);
        let state = if st.paused { "paused" } else { "running" };
        let _ = writeln!(s, "state:   {state}");
        if let Some(a) = &st.patch_arena {
            let _ = writeln!(s, "arena:   {:#x} + {:#x} (e820 reserved)", a.start, a.len);
        }
        let _ = writeln!(s, "patches: {}", st.patches);
        s
    })
}

/// `inspect kernel`: release, KASLR, paging, where kallsyms is, and the slide cross-checks.
pub fn kernel(v: &Value) -> String {
    typed(v, |k: &introspect::KernelInfo| {
        let mut s = String::new();
        let _ = writeln!(s, "release:        {}", k.release.as_deref().unwrap_or("?"));
        let _ = writeln!(
            s,
            "_text:          {:#x} (physical {:#x})",
            k.text, k.text_pa
        );
        let _ = writeln!(s, "KASLR slide:    {:#x}", k.slide);
        let _ = writeln!(s, "phys_base:      {:#x}", k.phys_base);
        let _ = writeln!(
            s,
            "paging:         {}-level, kernel PGD at {:#x}, PTI {}",
            k.paging_levels,
            k.pgd_pa,
            if k.pti { "on" } else { "off" }
        );
        let _ = writeln!(
            s,
            "kallsyms:       {} symbols, {:?} table order, token table at physical {:#x}",
            k.num_syms, k.kallsyms.order, k.kallsyms.token_table_pa
        );
        for c in &k.slide_report.checks {
            let outcome = match &c.outcome {
                CheckOutcome::Passed => "passed".to_string(),
                CheckOutcome::Skipped(why) => format!("skipped ({why})"),
            };
            let _ = writeln!(
                s,
                "slide check:    {:<16} {outcome}",
                format!("{:?}", c.kind)
            );
        }
        s
    })
}

/// `inspect symbols`: /proc/kallsyms-style lines.
pub fn symbols(v: &Value) -> String {
    typed(v, |list: &Vec<SymbolLine>| {
        let mut s = String::new();
        for y in list {
            let _ = match &y.module {
                Some(m) => writeln!(s, "{:016x} {} {}\t[{m}]", y.addr, y.kind, y.name),
                None => writeln!(s, "{:016x} {} {}", y.addr, y.kind, y.name),
            };
        }
        s
    })
}

/// `inspect modules`: like /proc/modules (name, size, state, core text address), then each
/// region.
pub fn modules(v: &Value) -> String {
    typed(v, |list: &Vec<ModuleResult>| {
        let mut s = String::new();
        for m in list {
            let _ = writeln!(
                s,
                "{} {} {} 0x{:016x}  (struct module at {:#x})",
                m.name,
                m.size,
                m.state.proc_name(),
                m.base().unwrap_or(0),
                m.addr
            );
            for r in &m.regions {
                let _ = writeln!(
                    s,
                    "    {:<14} {:#x}-{:#x} ({} bytes)",
                    serde_json::to_value(r.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    r.start,
                    r.end,
                    r.end - r.start
                );
            }
        }
        s
    })
}

/// `inspect symbol NAME`: /proc/kallsyms-style lines with each match's sympos and size.
pub fn symbol(v: &Value) -> String {
    typed(v, |list: &Vec<SymbolMatch>| {
        let mut s = String::new();
        for y in list {
            let _ = write!(
                s,
                "{:016x} {} {}  sympos={}",
                y.addr, y.kind, y.name, y.sympos
            );
            if let Some(z) = y.size {
                let _ = write!(s, " size={z:#x}");
            }
            if let Some(m) = &y.module {
                let _ = write!(s, " [{m}]");
            }
            s.push('\n');
        }
        s
    })
}

/// `inspect tasks`: a ps-like table.
pub fn tasks(v: &Value) -> String {
    typed(v, |list: &Vec<TaskResult>| {
        let mut s = format!(
            "{:>6} {:>6} {:<5} {:>4} {:<16} {}\n",
            "PID", "TGID", "STATE", "VCPU", "COMM", "TASK"
        );
        for t in list {
            let vcpu = t
                .running_on_vcpu
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:>6} {:>6} {:<5} {:>4} {:<16} {:016x}",
                t.pid, t.tgid, t.state_char, vcpu, t.comm, t.addr
            );
        }
        s
    })
}

fn frames(s: &mut String, frames: &[FrameLine]) {
    for f in frames {
        let _ = writeln!(s, "    {}", f.symbol);
    }
}

fn verdict(st: &StackView) -> String {
    let rel = if st.reliable {
        "reliable".to_string()
    } else {
        format!("UNRELIABLE ({})", st.reason.as_deref().unwrap_or("?"))
    };
    format!("{:?} {rel}", st.kind)
}

/// `inspect stacks`: per task and per vCPU.
pub fn stacks(v: &Value) -> String {
    typed(v, |st: &Stacks| {
        let mut s = String::new();
        for c in &st.vcpus {
            let _ = writeln!(s, "vcpu {}: {}", c.vcpu, verdict(&c.stack));
            frames(&mut s, &c.stack.frames);
        }
        for t in &st.tasks {
            let _ = writeln!(s, "{} {}: {}", t.pid, t.comm, verdict(&t.stack));
            frames(&mut s, &t.stack.frames);
        }
        s
    })
}

/// `inspect vcpus`.
pub fn vcpus(v: &Value) -> String {
    typed(v, |list: &Vec<Vcpu>| {
        let mut s = String::new();
        for c in list {
            let _ = writeln!(
                s,
                "vcpu {}: {} rip={:016x} rsp={:016x} cr3={:016x} current={} {}",
                c.vcpu,
                c.mode.map(|m| format!("{m:?}")).as_deref().unwrap_or("?"),
                c.rip,
                c.rsp,
                c.cr3,
                c.current_pid
                    .map(|p| p.to_string())
                    .as_deref()
                    .unwrap_or("null"),
                c.current_comm.as_deref().unwrap_or("?")
            );
            if let Some(sym) = &c.rip_symbol {
                let _ = writeln!(s, "    at {sym}");
            }
        }
        s
    })
}

fn patch_text(p: &Patch, unload: Option<&Unloaded>) -> String {
    let mut s = String::new();
    if p.waiting_for.is_empty() {
        let _ = writeln!(s, "patch {}: {:?}", p.name, p.state);
    } else {
        let _ = writeln!(
            s,
            "patch {}: {:?} for module {} to load",
            p.name,
            p.state,
            p.waiting_for.join(", ")
        );
    }
    for f in &p.functions {
        let pos = if f.sympos > 0 {
            format!(",{}", f.sympos)
        } else {
            String::new()
        };
        let active = if p.state == PatchState::Waiting {
            "waiting for load"
        } else if p.state == PatchState::Disabled {
            "disabled"
        } else if p.state != PatchState::Enabled {
            "removed"
        } else if f.active {
            "active"
        } else {
            "superseded"
        };
        let obj = f
            .object
            .as_deref()
            .map_or(String::new(), |o| format!("{o}:"));
        let _ = writeln!(
            s,
            "    {obj}{}{pos} at {:016x} -> {:016x} ({active}), {}",
            f.old_name, f.old_addr, f.new_addr, f.method
        );
        if let Some(tramp) = f.tramp {
            let _ = writeln!(
                s,
                "        jmp at {:016x}; moved to the trampoline at {tramp:016x}:",
                f.site
            );
            for m in &f.moved {
                let _ = writeln!(s, "            {:016x}  {}", m.addr, m.text);
            }
        }
    }
    if let Some(h) = &p.held {
        let _ = writeln!(s, "    disabled; code and data kept because {}", h.by);
        for f in &h.stack {
            let _ = writeln!(s, "        {f}");
        }
    }
    match unload {
        Some(u) => {
            let r = &u.unload;
            if r.checks > 1 {
                let _ = writeln!(
                    s,
                    "    waited {} µs ({} checks) until nothing in the guest could reach it; first held by {}",
                    r.waited_us,
                    r.checks,
                    r.first_hold.as_ref().map_or("?", |h| h.by.as_str())
                );
            }
            let _ = writeln!(
                s,
                "    unload took {} µs, of which the guest was paused {} µs",
                u.unload_us, u.unload_pause_us
            );
        }
        None => {
            let _ = writeln!(
                s,
                "    load took {} µs, of which the guest was paused {} µs",
                p.load_us, p.pause_us
            );
        }
    }
    s
}

/// `patch load|info`.
pub fn patch(v: &Value) -> String {
    typed(v, |p: &Patch| patch_text(p, None))
}

/// A blocker's reason (`why` of `patch status`), in words.
pub fn why(v: &Value) -> String {
    match serde_json::from_value::<patcher::transition::Why>(v.clone()) {
        Ok(w) => w.to_string(),
        Err(_) => v.to_string(),
    }
}

/// `patch status`.
pub fn patch_status(v: &Value) -> String {
    typed(v, |st: &PatchStatus| {
        let mut s = String::new();
        match &st.transition {
            None => s.push_str("no transition in progress\n"),
            Some(t) => {
                let _ = writeln!(
                    s,
                    "transition: {} {}{} ({:?}), {} ms, {} checks, {} µs paused",
                    t.patch,
                    t.direction,
                    if t.reversed { " (reversed)" } else { "" },
                    t.mode,
                    t.elapsed_ms,
                    t.checks,
                    t.pause_us
                );
                let switched = t.tasks.iter().filter(|x| x.patch_state == t.target).count();
                let _ = writeln!(
                    s,
                    "tasks: {switched} of {} at the target state {}",
                    t.tasks.len(),
                    t.target
                );
                match t.switcher {
                    patcher::Switcher::GuestHooks => {
                        s.push_str("switching at kernel exit and idle: the guest's klp hooks\n")
                    }
                    patcher::Switcher::Breakpoints => {
                        let _ = writeln!(
                            s,
                            "switching at kernel exit and idle: boundary breakpoints ({} hits, {} tasks switched)",
                            t.boundary_hits.0, t.boundary_hits.1
                        );
                    }
                }
                if let Some(i) = &t.interference {
                    let _ = writeln!(s, "WARNING: {i}");
                }
                for b in &t.blocking {
                    let on = b
                        .vcpu
                        .map(|v| format!(", running on vCPU {v}"))
                        .unwrap_or_default();
                    let _ = writeln!(s, "blocking: pid {} ({}{on}): {}", b.pid, b.comm, b.why);
                    for f in &b.stack {
                        let _ = writeln!(s, "    {f}");
                    }
                }
            }
        }
        for p in &st.patches {
            s.push_str(&patch_text(p, None));
        }
        s
    })
}

/// One line of progress of the transition in `v` (a `patch status` result), or "".
pub fn progress(v: &Value) -> String {
    let Ok(st) = PatchStatus::deserialize(v) else {
        return String::new();
    };
    let Some(t) = st.transition else {
        return String::new();
    };
    let switched = t.tasks.iter().filter(|x| x.patch_state == t.target).count();
    let who: Vec<String> = t
        .blocking
        .iter()
        .take(3)
        .map(|b| format!("pid {} ({}): {}", b.pid, b.comm, b.why))
        .collect();
    format!(
        "{} {}: {switched}/{} tasks switched; waiting for {}",
        t.patch,
        t.direction,
        t.tasks.len(),
        if who.is_empty() {
            "the next check".to_string()
        } else {
            who.join("; ")
        }
    )
}

/// `patch unload`.
pub fn unloaded(v: &Value) -> String {
    typed(v, |u: &Unloaded| patch_text(&u.patch, Some(u)))
}

/// `patch list`.
pub fn patch_list(v: &Value) -> String {
    typed(v, |list: &Vec<Patch>| {
        if list.is_empty() {
            return "no patches loaded\n".into();
        }
        list.iter().map(|p| patch_text(p, None)).collect()
    })
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
        // Not a result of this shape: printed as JSON.
        let bad = json!([{"addr": "ffffffff81000000", "type": "T", "name": "x"}]);
        assert_eq!(super::symbols(&bad), super::pretty(&bad));

        let one = json!([{"addr": "0xffffffff81234560", "type": "t", "name": "f",
                          "sympos": 2, "size": 96}]);
        assert_eq!(
            super::symbol(&one),
            "ffffffff81234560 t f  sympos=2 size=0x60\n"
        );

        // Module symbols: /proc/kallsyms's `\t[module]`.
        let m = json!([{"addr": "0xffffffffc0a45010", "type": "t", "name": "isofs_mount",
                        "module": "isofs"},
                       {"addr": "0xffffffff81000000", "type": "T", "name": "_text", "module": null}]);
        assert_eq!(
            super::symbols(&m),
            "ffffffffc0a45010 t isofs_mount\t[isofs]\nffffffff81000000 T _text\n"
        );
        let one = json!([{"addr": "0xffffffffc0a45010", "type": "t", "name": "isofs_mount",
                          "sympos": 1, "size": 32, "module": "isofs"}]);
        assert_eq!(
            super::symbol(&one),
            "ffffffffc0a45010 t isofs_mount  sympos=1 size=0x20 [isofs]\n"
        );
        let mods = json!([{"addr": "0xffffffffc0a4e000", "name": "isofs", "state": "coming",
                           "size": 57344,
                           "regions": [{"kind": "text", "start": "0xffffffffc0a45000",
                                        "end": "0xffffffffc0a4c000"},
                                       {"kind": "init_text", "start": "0xffffffffc0a60000",
                                        "end": "0xffffffffc0a61000"}]}]);
        assert_eq!(
            super::modules(&mods),
            "isofs 57344 Loading 0xffffffffc0a45000  (struct module at 0xffffffffc0a4e000)\n\
             \x20   text           0xffffffffc0a45000-0xffffffffc0a4c000 (28672 bytes)\n\
             \x20   init_text      0xffffffffc0a60000-0xffffffffc0a61000 (4096 bytes)\n"
        );

        let st = json!({"host": "kvm", "vcpus": 2, "paused": false,
                        "patch_arena": {"start": "0x7fe00000", "len": 2097152}, "patches": 0});
        assert!(
            super::status(&st).contains("arena:   0x7fe00000 + 0x200000 (e820 reserved)"),
            "{}",
            super::status(&st)
        );
        let k = json!({"release": "6.12", "banner": "Linux version 6.12", "text": "0xffffffff9a000000",
                       "text_pa": "0x2a00000", "slide": "0x19000000", "phys_base": "0x0",
                       "paging_levels": 5, "pgd_pa": "0x2a0c000", "pti": false, "num_syms": 1,
                       "kallsyms": {"order": "New", "encoding": "Relative", "num_syms": 1,
                                    "num_syms_pa": "0x3e00000", "names_pa": "0x3e00008",
                                    "markers_pa": "0x3e10000", "seqs_of_names_pa": null,
                                    "token_table_pa": "0x3e1a000", "token_index_pa": "0x3e1b000",
                                    "offsets_pa": "0x3e1c000", "relative_base_pa": "0x3e2c000",
                                    "relative_base": "0xffffffff9a000000"},
                       "slide_report": {"text": "0xffffffff9a000000", "slide": "0x19000000",
                                        "text_pa": "0x2a00000", "phys_base": "0x0",
                                        "checks": [{"kind": "Lstar", "outcome": "Passed"},
                                                   {"kind": "PhysLayout", "outcome": {"Skipped": "why"}}]}});
        let text = super::kernel(&k);
        assert!(
            text.contains("_text:          0xffffffff9a000000 (physical 0x2a00000)")
                && text.contains("KASLR slide:    0x19000000")
                && text.contains("kernel PGD at 0x2a0c000")
                && text.contains("New table order, token table at physical 0x3e1a000")
                && text.contains("Lstar            passed")
                && text.contains("PhysLayout       skipped (why)"),
            "{text}"
        );
        let range = json!({"va": "0xffffffffc0001000", "len": 64, "pages": ["0x1fe00000"]});
        let p = json!({"name": "p", "file_name": "p.o", "kernel_release": null, "state": "Enabled",
                       "functions": [{"old_name": "f", "sympos": 0, "old_addr": "0xffffffff81234560",
                                      "site": "0xffffffff81234564", "new_addr": "0xffffffffc0001000",
                                      "active": true, "flags": 1}],
                       "code": range, "data": range, "return_sites": 0, "pause_us": 12,
                       "load_us": 340, "held": null});
        let text = super::patch(&p);
        assert!(
            text.contains("f at ffffffff81234560 -> ffffffffc0001000 (active)")
                && text.contains("load took 340 µs, of which the guest was paused 12 µs"),
            "{text}"
        );
        assert!(text.contains("(active), ftrace-site"), "{text}");
        let mut pr = p.clone();
        pr["functions"][0]["method"] = json!("prologue");
        pr["functions"][0]["site"] = json!("0xffffffff81234560");
        pr["functions"][0]["tramp"] = json!("0xffffffffc0001400");
        pr["functions"][0]["moved"] = json!([{"addr": "0xffffffff81234560", "bytes": [85],
            "text": "push %rbp", "new_addr": "0xffffffffc0001400"}]);
        let text = super::patch(&pr);
        assert!(
            text.contains("(active), prologue")
                && text.contains(
                    "jmp at ffffffff81234560; moved to the trampoline at ffffffffc0001400:"
                )
                && text.contains("            ffffffff81234560  push %rbp"),
            "{text}"
        );
        let mut u = p.clone();
        u["state"] = json!("Unloaded");
        u["functions"][0]["active"] = json!(false);
        u["unload_pause_us"] = json!(7);
        u["unload_us"] = json!(900);
        u["unload"] = json!({"name": "p", "checks": 3, "waited_us": 800, "first_hold": null,
                             "pause_us": 7, "total_pause_us": 20, "unload_us": 900});
        let text = super::unloaded(&u);
        assert!(
            text.contains("patch p: Unloaded")
                && text.contains("(removed)")
                && text.contains("waited 800 µs (3 checks)")
                && text.contains("unload took 900 µs, of which the guest was paused 7 µs"),
            "{text}"
        );
        // Not an unload result: printed as JSON.
        assert_eq!(super::unloaded(&p), super::pretty(&p));
    }
}
