//! Shared helpers for the snapshot tests: load a guest snapshot (located by
//! `common/snapshot_dir.rs`).
#![allow(dead_code)]

#[path = "../common/snapshot_dir.rs"]
mod snapshot_dir;

use introspect::VcpuRegs;

/// Reads a file of a snapshot, failing with how to make it.
pub fn read_dump(ver: &str, name: &str) -> Vec<u8> {
    snapshot_dir::read_snapshot(ver, name)
}

/// Parses HMP `info registers -a` output into one VcpuRegs per CPU.
pub fn parse_regs(text: &str) -> Vec<VcpuRegs> {
    let mut out: Vec<VcpuRegs> = Vec::new();
    let names = [
        "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12",
        "R13", "R14", "R15",
    ];
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
            let Some((k, v)) = t.split_once('=') else {
                continue;
            };
            let Ok(v) = u64::from_str_radix(v, 16) else {
                continue;
            };
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

/// A loaded snapshot: RAM, registers and the opened kernel.
pub struct Snapshot {
    pub ver: &'static str,
    pub mem: introspect::SliceMemory<'static>,
    pub regs: Vec<VcpuRegs>,
    pub kernel: introspect::Kernel,
}

/// Loads snapshot `ver` and opens the kernel from memory + registers alone.
pub fn load(ver: &'static str) -> Snapshot {
    let regs = parse_regs(&String::from_utf8(read_dump(ver, "regs.txt")).unwrap());
    assert_eq!(regs.len(), 2, "regs.txt should describe 2 vCPUs");
    let ram: &'static [u8] = Box::leak(read_dump(ver, "ram.bin").into_boxed_slice());
    let mem = introspect::SliceMemory::flat(ram);
    let kernel = introspect::Kernel::open(&mem, &regs).expect("Kernel::open on snapshot");
    Snapshot {
        ver,
        mem,
        regs,
        kernel,
    }
}

/// A snapshot text file.
pub fn text(ver: &str, name: &str) -> String {
    String::from_utf8(read_dump(ver, name)).unwrap()
}

/// A guest view with some bytes overwritten (to simulate a hostile guest without touching RAM).
pub struct Overlay<'a> {
    pub inner: introspect::model::KernelGuest<'a>,
    pub bytes: std::collections::BTreeMap<u64, u8>,
    /// What [`introspect::model::GuestAccess::text_aliases`] answers.
    pub aliases: Vec<(u64, u64)>,
}

impl<'a> Overlay<'a> {
    pub fn new(s: &'a Snapshot) -> Self {
        Overlay {
            inner: introspect::model::KernelGuest {
                kernel: &s.kernel,
                mem: &s.mem,
            },
            bytes: Default::default(),
            aliases: vec![],
        }
    }
    pub fn put_u64(&mut self, va: u64, v: u64) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.bytes.insert(va + i as u64, b);
        }
    }
    pub fn put(&mut self, va: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.bytes.insert(va + i as u64, b);
        }
    }
}

impl introspect::model::GuestAccess for Overlay<'_> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = va.checked_add(buf.len() as u64).ok_or("wrap")?;
        if let Err(e) = self.inner.read_virt(va, buf) {
            // Unmapped in the guest: fine if the overlay provides every byte.
            if self.bytes.range(va..end).count() != buf.len() {
                return Err(e);
            }
        }
        for (&a, &b) in self.bytes.range(va..end) {
            buf[(a - va) as usize] = b;
        }
        Ok(())
    }
    fn symbol(&self, name: &str) -> Option<u64> {
        self.inner.symbol(name)
    }
    fn translate(&self, va: u64) -> Option<u64> {
        self.inner.translate(va)
    }
    fn symbolize(&self, addr: u64) -> Option<(String, u64, u64)> {
        self.inner.symbolize(addr)
    }
    fn text_aliases(&self) -> Vec<(u64, u64)> {
        self.aliases.clone()
    }
}

/// xorshift64 for reproducible mutations.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
