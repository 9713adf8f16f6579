//! Shared helpers for the snapshot tests: load a dump from /tmp/hvpatch-dumps/<ver>/.
#![allow(dead_code)]

use std::path::PathBuf;

use introspect::VcpuRegs;

/// Directory of a snapshot.
pub fn dump_dir(ver: &str) -> PathBuf {
    PathBuf::from("/tmp/hvpatch-dumps").join(ver)
}

/// Reads a file of a snapshot, failing with how to make it.
pub fn read_dump(ver: &str, name: &str) -> Vec<u8> {
    let p = dump_dir(ver).join(name);
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!("missing snapshot file {}: {e}; run python3 /tmp/hvpatch-dumps/dump.py {ver}", p.display())
    })
}

/// Parses HMP `info registers -a` output into one VcpuRegs per CPU.
pub fn parse_regs(text: &str) -> Vec<VcpuRegs> {
    let mut out: Vec<VcpuRegs> = Vec::new();
    let names = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"];
    for line in text.lines() {
        if line.starts_with("CPU#") {
            out.push(VcpuRegs::default());
            continue;
        }
        let Some(r) = out.last_mut() else { continue };
        let toks: Vec<&str> = line.split_whitespace().collect();
        // Segment lines: "GS =0000 ff4318951f200000 ..."
        if let Some(seg) = line.get(0..4) {
            let sel = toks.get(1).map(|t| t.trim_start_matches('=')).unwrap_or("");
            let base = toks.get(2).and_then(|b| u64::from_str_radix(b, 16).ok());
            match seg {
                "CS =" => r.cs = u16::from_str_radix(line[4..8].trim(), 16).unwrap_or(0),
                "SS =" => r.ss = u16::from_str_radix(line[4..8].trim(), 16).unwrap_or(0),
                "GS =" => r.gs_base = u64::from_str_radix(line[9..25].trim(), 16).unwrap_or(0),
                "FS =" => r.fs_base = u64::from_str_radix(line[9..25].trim(), 16).unwrap_or(0),
                _ => {}
            }
            let _ = (sel, base);
        }
        for tok in line.split_whitespace().collect::<Vec<_>>().windows(1) {
            let t = tok[0];
            let Some((k, v)) = t.split_once('=') else { continue };
            let Ok(v) = u64::from_str_radix(v, 16) else { continue };
            if let Some(i) = names.iter().position(|n| *n == k) {
                r.gprs[i] = v;
            }
            match k {
                "RIP" => r.rip = v,
                "RFL" => r.rflags = v,
                "CR0" => r.cr0 = v,
                "CR2" => r.cr2 = v,
                "CR3" => r.cr3 = v,
                "CR4" => r.cr4 = v,
                "EFER" => r.efer = v,
                _ => {}
            }
        }
        // "R8 =..." has a space before '='.
        if let Some(rest) = line.strip_prefix("R8 =") {
            r.gprs[8] = u64::from_str_radix(&rest[..16], 16).unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("R9 =") {
            r.gprs[9] = u64::from_str_radix(&rest[..16], 16).unwrap_or(0);
        }
    }
    out
}

/// `ps -o pid,comm,stat` rows.
pub fn parse_ps(text: &str) -> Vec<(i32, String, String)> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("PID"))
        .skip(1)
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            Some((t.first()?.parse().ok()?, t.get(1)?.to_string(), t.get(2).unwrap_or(&"").to_string()))
        })
        .collect()
}

/// A `GuestAccess` over a snapshot using the guest's own /proc/kallsyms (test double used to
/// check the model independently of the kallsyms decoder).
pub struct KallsymsGuest {
    pub ram: &'static [u8],
    pub root: (u64, u8),
    /// (addr, name) sorted by address (stable: table order kept for aliases).
    pub syms: Vec<(u64, String)>,
    pub by_name: std::collections::HashMap<String, u64>,
}

impl KallsymsGuest {
    pub fn load(ver: &str, regs: &[VcpuRegs]) -> Self {
        let ram: &'static [u8] = Box::leak(read_dump(ver, "ram.bin").into_boxed_slice());
        let text = String::from_utf8(read_dump(ver, "kallsyms.txt")).unwrap();
        let mut syms = Vec::new();
        let mut by_name = std::collections::HashMap::new();
        for l in text.lines() {
            let t: Vec<&str> = l.split_whitespace().collect();
            if t.len() < 3 || t.len() > 3 {
                continue;
            }
            let a = u64::from_str_radix(t[0], 16).unwrap();
            by_name.entry(t[2].to_string()).or_insert(a);
            if t[1] != "A" && t[1] != "a" {
                syms.push((a, t[2].to_string()));
            }
        }
        syms.sort_by_key(|s| s.0);
        KallsymsGuest { ram, root: (regs[0].cr3 & 0x000f_ffff_ffff_e000, if regs[0].la57() { 5 } else { 4 }), syms, by_name }
    }
}

impl KallsymsGuest {
    /// Minimal 4/5-level page walk.
    fn translate(&self, va: u64) -> Option<u64> {
        let rd = |pa: u64| -> Option<u64> {
            let b = self.ram.get(pa as usize..pa as usize + 8)?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        };
        let mut table = self.root.0;
        for level in (1..=self.root.1).rev() {
            let idx = (va >> (12 + 9 * (level as u64 - 1))) & 0x1ff;
            let e = rd(table + idx * 8)?;
            if e & 1 == 0 {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if level == 1 {
                return Some(addr | (va & 0xfff));
            }
            if (level == 2 || level == 3) && e & 0x80 != 0 {
                let size = 1u64 << (12 + 9 * (level as u64 - 1));
                return Some((e & 0x000f_ffff_ffff_f000 & !(size - 1)) | (va & (size - 1)));
            }
            table = addr;
        }
        None
    }
}

impl introspect::model::GuestAccess for KallsymsGuest {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        for (i, b) in buf.iter_mut().enumerate() {
            let v = va.wrapping_add(i as u64);
            let pa = self.translate(v).ok_or_else(|| format!("{v:#x} unmapped"))?;
            *b = *self.ram.get(pa as usize).ok_or("outside ram")?;
        }
        Ok(())
    }
    fn symbol(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }
    fn symbolize(&self, addr: u64) -> Option<(String, u64, u64)> {
        let i = self.syms.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let a = self.syms[i].0;
        let mut j = i;
        while j > 0 && self.syms[j - 1].0 == a {
            j -= 1;
        }
        let next = self.syms[i + 1..].iter().find(|s| s.0 > a)?.0;
        Some((self.syms[j].1.clone(), addr - a, next - a))
    }
}
