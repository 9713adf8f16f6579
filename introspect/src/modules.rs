//! Loaded kernel modules as the unwinder needs them: text ranges and ORC tables.
//!
//! The module list changes at runtime, so it is not cached in the [`Model`]: it is read when
//! an unwind first meets an ip outside vmlinux text ([`LazyModules`]) or on request
//! ([`read_modules`]). Module ORC lookups binary-search the module's tables in guest memory.

use std::cell::OnceCell;
use std::collections::HashSet;

use serde::Serialize;

use crate::btf::Btf;
use crate::model::{GuestAccess, Model};
use crate::orc::{OrcEntry, OrcFormat};
use crate::unwind::ModuleOrc;

/// Most modules we walk.
pub const MAX_MODULES: usize = 4096;
/// Most ORC entries we accept for one module.
pub const MAX_MODULE_ORCS: u32 = 1 << 22;

/// BTF offsets in `struct module` (6.1: `core_layout`/`init_layout`; 6.4+: `mem[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleLayout {
    /// Address of the `modules` list head.
    pub head: u64,
    /// `module.list`.
    pub list: u64,
    /// `module.state`.
    pub state: u64,
    /// `MODULE_STATE_UNFORMED`.
    pub unformed: Option<i64>,
    /// `module.name` and its size.
    pub name: (u64, u64),
    /// (offset of text base pointer, offset of the u32 text size) for core and init text.
    pub text: Vec<(u64, u64)>,
    /// `module.arch.orc_unwind_ip`, `.orc_unwind`, `.num_orcs`.
    pub orc: Option<(u64, u64, u64)>,
}

impl ModuleLayout {
    /// Reads the layout from BTF; `None` if the kernel has no module support we understand.
    pub fn from_btf(btf: &Btf, head: u64) -> Option<ModuleLayout> {
        let off = |p: &str| btf.member_offset("module", p).ok();
        let mut text = Vec::new();
        if let Some(mem) = off("mem") {
            // 6.4+: struct module_memory mem[MOD_MEM_NUM_TYPES].
            let sz = btf.struct_size("module_memory").ok()?;
            let base = btf.member_offset("module_memory", "base").ok()?;
            let size = btf.member_offset("module_memory", "size").ok()?;
            for e in ["MOD_TEXT", "MOD_INIT_TEXT"] {
                let i = u64::try_from(btf.enum_value(e)?).ok()?;
                let at = mem.checked_add(i.checked_mul(sz)?)?;
                text.push((at + base, at + size));
            }
        } else {
            let base = btf.member_offset("module_layout", "base").ok()?;
            let size = btf.member_offset("module_layout", "text_size").ok()?;
            for l in ["core_layout", "init_layout"] {
                let at = off(l)?;
                text.push((at + base, at + size));
            }
        }
        let name = btf.member("module", "name").ok()?;
        let orc = match (
            off("arch.orc_unwind_ip"),
            off("arch.orc_unwind"),
            off("arch.num_orcs"),
        ) {
            (Some(a), Some(b), Some(c)) => Some((a, b, c)),
            _ => None,
        };
        Some(ModuleLayout {
            head,
            list: off("list")?,
            state: off("state")?,
            unformed: btf.enum_value("MODULE_STATE_UNFORMED"),
            name: (name.offset, name.size.min(64)),
            text,
            orc,
        })
    }
}

/// One loaded module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleText {
    /// `struct module *`.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// Module name.
    pub name: String,
    /// Text ranges `[start, end)` (core text, init text if still present).
    #[serde(with = "crate::hex")]
    pub text: Vec<(u64, u64)>,
    /// `arch.orc_unwind_ip` (0 if none).
    #[serde(with = "crate::hex")]
    pub orc_ip: u64,
    /// `arch.orc_unwind` (0 if none).
    #[serde(with = "crate::hex")]
    pub orc: u64,
    /// `arch.num_orcs`.
    pub num_orcs: u32,
}

/// Walks the `modules` list (bounded, loop-checked). Unformed modules are skipped.
pub fn read_modules(g: &dyn GuestAccess, l: &ModuleLayout) -> Result<Vec<ModuleText>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut p = g.read_u64(l.head)?;
    while p != l.head {
        if out.len() >= MAX_MODULES || !seen.insert(p) || p >> 63 == 0 {
            return Err("corrupted module list".into());
        }
        let m = p.wrapping_sub(l.list);
        p = g.read_u64(p)?;
        let state = g.read_u32(m.wrapping_add(l.state))? as i32 as i64;
        if Some(state) == l.unformed {
            continue;
        }
        let mut name = vec![0u8; l.name.1 as usize];
        g.read_virt(m.wrapping_add(l.name.0), &mut name)?;
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let mut text = Vec::new();
        for &(b, s) in &l.text {
            let base = g.read_u64(m.wrapping_add(b))?;
            let size = g.read_u32(m.wrapping_add(s))? as u64;
            if base != 0 && size != 0 {
                if let Some(e) = base.checked_add(size) {
                    text.push((base, e));
                }
            }
        }
        let (orc_ip, orc, num_orcs) = match l.orc {
            Some((a, b, c)) => (
                g.read_u64(m.wrapping_add(a))?,
                g.read_u64(m.wrapping_add(b))?,
                g.read_u32(m.wrapping_add(c))?.min(MAX_MODULE_ORCS),
            ),
            None => (0, 0, 0),
        };
        out.push(ModuleText {
            addr: m,
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
            text,
            orc_ip,
            orc,
            num_orcs,
        });
    }
    Ok(out)
}

/// `__orc_find` over a module's tables in guest memory: rightmost `ip_i <= ip`.
fn module_orc_find(
    g: &dyn GuestAccess,
    m: &ModuleText,
    ip: u64,
    format: OrcFormat,
) -> Option<OrcEntry> {
    if m.orc_ip == 0 || m.orc == 0 || m.num_orcs == 0 {
        return None;
    }
    let ip_at = |i: u64| -> Option<u64> {
        let slot = m.orc_ip.checked_add(i.checked_mul(4)?)?;
        let rel = g.read_u32(slot).ok()? as i32 as i64 as u64;
        Some(slot.wrapping_add(rel))
    };
    let (mut lo, mut hi) = (0u64, m.num_orcs as u64);
    let mut found = 0u64;
    // At most 32 steps: the range halves each time.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if ip_at(mid)? <= ip {
            found = mid;
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut b = [0u8; 6];
    g.read_virt(m.orc.checked_add(found.checked_mul(6)?)?, &mut b)
        .ok()?;
    Some(OrcEntry::decode(b, format))
}

/// [`ModuleOrc`] that reads the module list on first use (once per unwind).
pub struct LazyModules<'a> {
    g: &'a dyn GuestAccess,
    m: &'a Model,
    list: OnceCell<Vec<ModuleText>>,
}

impl std::fmt::Debug for LazyModules<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyModules").finish_non_exhaustive()
    }
}

impl<'a> LazyModules<'a> {
    /// A lazy module view.
    pub fn new(g: &'a dyn GuestAccess, m: &'a Model) -> Self {
        LazyModules {
            g,
            m,
            list: OnceCell::new(),
        }
    }

    fn list(&self) -> &[ModuleText] {
        self.list.get_or_init(|| match &self.m.modules {
            Some(l) => read_modules(self.g, l).unwrap_or_default(),
            None => Vec::new(),
        })
    }

    fn containing(&self, ip: u64) -> Option<&ModuleText> {
        self.list()
            .iter()
            .find(|m| m.text.iter().any(|&(s, e)| ip >= s && ip < e))
    }
}

impl ModuleOrc for LazyModules<'_> {
    fn is_text(&self, ip: u64) -> bool {
        self.containing(ip).is_some()
    }

    fn find(&self, ip: u64) -> Option<OrcEntry> {
        module_orc_find(self.g, self.containing(ip)?, ip, self.m.orc.format())
    }
}

impl crate::Kernel {
    /// Loaded modules (name, text ranges, ORC tables), read now from the guest.
    pub fn modules(&self, mem: &dyn crate::PhysMemory) -> Result<Vec<ModuleText>, String> {
        let m = self.model(mem).map_err(|e| e.to_string())?;
        match &m.modules {
            Some(l) => read_modules(&crate::model::KernelGuest { kernel: self, mem }, l),
            None => Ok(Vec::new()),
        }
    }
}
