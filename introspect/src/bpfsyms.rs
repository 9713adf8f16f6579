//! JIT-compiled BPF symbols, the `[bpf]` lines of `/proc/kallsyms`.
//!
//! `bpf_get_kallsym` lists, after the module symbols, every `struct bpf_ksym` on the
//! `bpf_kallsyms` list (JITed programs, trampolines, dispatchers; newest first) as
//! `start t name [bpf]`, when `bpf_jit_kallsyms_enabled()`: `bpf_jit_harden` is 0 and
//! `bpf_jit_kallsyms` is 1. Debian's kernels default to that, and systemd loads BPF programs,
//! so a real guest usually has such lines. Everything read is guest data: the list is bounded
//! and loop-checked, names are cut at `KSYM_NAME_LEN - 1` bytes.

use std::collections::HashSet;

use crate::btf::Btf;
use crate::model::GuestAccess;
use crate::modsyms::{ModuleSymbol, KSYM_NAME_LEN};
use crate::modules::ModuleError;

/// Most BPF symbols we walk.
pub const MAX_BPF_SYMS: usize = 1 << 16;
/// The module name `/proc/kallsyms` prints for them.
pub const BPF_MODULE: &str = "bpf";

/// Where the BPF symbol list is (symbols and BTF offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfKsymLayout {
    /// Address of the `bpf_kallsyms` list head.
    pub head: u64,
    /// Address of `int bpf_jit_kallsyms`.
    pub jit_kallsyms: u64,
    /// Address of `int bpf_jit_harden`.
    pub jit_harden: u64,
    /// `bpf_ksym.start`.
    pub start: u64,
    /// `bpf_ksym.name` and its size.
    pub name: (u64, u64),
    /// `bpf_ksym.lnode`.
    pub lnode: u64,
}

impl BpfKsymLayout {
    /// From the guest's symbols and BTF; `None` if something is missing.
    pub fn find(g: &dyn GuestAccess, btf: &Btf) -> Option<BpfKsymLayout> {
        let name = btf.member("bpf_ksym", "name").ok()?;
        Some(BpfKsymLayout {
            head: g.symbol("bpf_kallsyms")?,
            jit_kallsyms: g.symbol("bpf_jit_kallsyms")?,
            jit_harden: g.symbol("bpf_jit_harden")?,
            start: btf.member_offset("bpf_ksym", "start").ok()?,
            name: (name.offset, name.size.min(KSYM_NAME_LEN as u64)),
            lnode: btf.member_offset("bpf_ksym", "lnode").ok()?,
        })
    }
}

fn read_err(what: &'static str, addr: u64) -> impl Fn(String) -> ModuleError {
    move |err| ModuleError::Read {
        module: BPF_MODULE.to_string(),
        what,
        addr,
        err,
    }
}

/// The `[bpf]` symbols `/proc/kallsyms` shows (none when `bpf_jit_kallsyms_enabled()` is
/// false).
pub fn read_bpf_symbols(
    g: &dyn GuestAccess,
    l: &BpfKsymLayout,
) -> Result<Vec<ModuleSymbol>, ModuleError> {
    let harden = g
        .read_u32(l.jit_harden)
        .map_err(read_err("bpf_jit_harden", l.jit_harden))?;
    let kallsyms = g
        .read_u32(l.jit_kallsyms)
        .map_err(read_err("bpf_jit_kallsyms", l.jit_kallsyms))?;
    let mut out = Vec::new();
    if harden != 0 || kallsyms != 1 {
        return Ok(out);
    }
    let mut seen = HashSet::new();
    let mut p = g
        .read_u64(l.head)
        .map_err(read_err("bpf_kallsyms", l.head))?;
    while p != l.head {
        if seen.len() >= MAX_BPF_SYMS {
            return Err(ModuleError::TooMany {
                module: BPF_MODULE.to_string(),
                what: "bpf_kallsyms entries",
                count: seen.len() as u64 + 1,
                max: MAX_BPF_SYMS as u64,
            });
        }
        if !seen.insert(p) || p >> 63 == 0 {
            return Err(ModuleError::List(format!(
                "bpf_kallsyms: bad or repeated link {p:#x}"
            )));
        }
        let k = p.wrapping_sub(l.lnode);
        let sa = k.wrapping_add(l.start);
        let start = g.read_u64(sa).map_err(read_err("bpf_ksym.start", sa))?;
        let na = k.wrapping_add(l.name.0);
        let mut name = vec![0u8; l.name.1 as usize];
        g.read_virt(na, &mut name)
            .map_err(read_err("bpf_ksym.name", na))?;
        let end = name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name.len())
            .min(KSYM_NAME_LEN - 1);
        let name = String::from_utf8_lossy(&name[..end]).into_owned();
        p = g.read_u64(p).map_err(read_err("bpf_ksym.lnode.next", p))?;
        if name.is_empty() {
            continue;
        }
        out.push(ModuleSymbol {
            addr: start,
            kind: 't',
            name,
            module: BPF_MODULE.to_string(),
            exported: false,
            defined: true,
        });
    }
    Ok(out)
}

impl crate::Kernel {
    /// The `[bpf]` lines of `/proc/kallsyms` (JITed BPF programs and images), read now;
    /// empty when the kernel has no BPF symbol list we know.
    pub fn bpf_symbols(
        &self,
        mem: &dyn crate::PhysMemory,
    ) -> Result<Vec<ModuleSymbol>, ModuleError> {
        let g = crate::model::KernelGuest { kernel: self, mem };
        let btf = self.btf(mem)?;
        match BpfKsymLayout::find(&g, btf) {
            Some(l) => read_bpf_symbols(&g, &l),
            None => Ok(Vec::new()),
        }
    }
}
