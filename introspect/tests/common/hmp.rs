//! Parser for QEMU HMP `info registers -a` output (test and bench helper).

use introspect::VcpuRegs;

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim(), 16).ok()
}

/// Parses every `CPU#n` block of HMP `info registers -a` text into [`VcpuRegs`], in order.
/// HMP does not print MSR_LSTAR or KERNEL_GS_BASE: `lstar` is `None`, `kernel_gs_base` 0.
pub fn parse_hmp_registers(text: &str) -> Vec<VcpuRegs> {
    let mut out: Vec<VcpuRegs> = Vec::new();
    for line in text.lines() {
        if let Some(pos) = line.find("CPU#") {
            if line[pos + 4..].trim().chars().all(|c| c.is_ascii_digit()) {
                out.push(VcpuRegs::default());
                continue;
            }
        }
        let Some(r) = out.last_mut() else { continue };
        let norm = line.replace(" =", "=").replace(" =", "=");
        let toks: Vec<&str> = norm.split_whitespace().collect();
        let mut i = 0;
        while i < toks.len() {
            let Some((key, val)) = toks[i].split_once('=') else {
                i += 1;
                continue;
            };
            let next = toks.get(i + 1).copied().unwrap_or("");
            let gpr = |name: &str| {
                [
                    "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10",
                    "R11", "R12", "R13", "R14", "R15",
                ]
                .iter()
                .position(|g| *g == name)
            };
            if let Some(g) = gpr(key) {
                r.gprs[g] = hex(val).unwrap_or(0);
            } else {
                match key {
                    "RIP" => r.rip = hex(val).unwrap_or(0),
                    "RFL" => r.rflags = hex(val).unwrap_or(0),
                    "CS" => r.cs = hex(val).unwrap_or(0) as u16,
                    "SS" => r.ss = hex(val).unwrap_or(0) as u16,
                    "FS" => r.fs_base = hex(next).unwrap_or(0),
                    "GS" => r.gs_base = hex(next).unwrap_or(0),
                    "IDT" => r.idtr_base = hex(if val.is_empty() { next } else { val }),
                    "CR0" => r.cr0 = hex(val).unwrap_or(0),
                    "CR2" => r.cr2 = hex(val).unwrap_or(0),
                    "CR3" => r.cr3 = hex(val).unwrap_or(0),
                    "CR4" => r.cr4 = hex(val).unwrap_or(0),
                    "EFER" => r.efer = hex(val).unwrap_or(0),
                    _ => {}
                }
            }
            i += 1;
        }
    }
    out
}
