//! Loaded kernel modules: the `modules` list walked from guest memory with `struct module`
//! offsets from BTF (6.1: `core_layout`/`init_layout`; 6.4+: `mem[MOD_MEM_NUM_TYPES]`).
//!
//! Two views: [`Module`] (name, state, size and the core/init text and data regions, what
//! `/proc/modules` and `/sys/module/NAME/sections` show; [`crate::Kernel::modules`]) and
//! [`ModuleText`] (text ranges and ORC tables, for the unwinder). Module symbols are in
//! [`crate::modsyms`].
//!
//! The module list changes at runtime, so it is not cached in the [`Model`]: it is read when
//! an unwind first meets an ip outside vmlinux text ([`LazyModules`]) or on request
//! ([`read_modules`], [`read_module_list`]). Module ORC lookups binary-search the module's
//! tables in guest memory. Every pointer and size is guest data: lists are bounded and
//! loop-checked, ranges checked, and failures are [`ModuleError`]s.

use std::cell::OnceCell;
use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    /// `MODULE_STATE_LIVE`, `_COMING`, `_GOING` (from BTF).
    pub states: [Option<i64>; 3],
    /// `module.name` and its size.
    pub name: (u64, u64),
    /// (offset of text base pointer, offset of the u32 text size) for core and init text.
    pub text: Vec<(u64, u64)>,
    /// Where the memory regions of a module are described.
    pub regions: RegionLayout,
    /// `module.arch.orc_unwind_ip`, `.orc_unwind`, `.num_orcs`.
    pub orc: Option<(u64, u64, u64)>,
    /// Where the module's symbols are (`None` without CONFIG_KALLSYMS or an unknown layout).
    pub kallsyms: Option<crate::modsyms::ModKallsymsLayout>,
}

/// What a module memory region holds (`enum mod_mem_type` on 6.4+; the parts of
/// `core_layout`/`init_layout` on 6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// Core text (`MOD_TEXT`).
    Text,
    /// Core writable data (`MOD_DATA`).
    Data,
    /// Core read-only data (`MOD_RODATA`).
    Rodata,
    /// Data read-only after init (`MOD_RO_AFTER_INIT`).
    RoAfterInit,
    /// Init text (`MOD_INIT_TEXT`), freed after the module's init ran.
    InitText,
    /// Init writable data (`MOD_INIT_DATA`).
    InitData,
    /// Init read-only data (`MOD_INIT_RODATA`).
    InitRodata,
}

impl RegionKind {
    /// Every kind, in `enum mod_mem_type` order.
    pub const ALL: [RegionKind; 7] = [
        RegionKind::Text,
        RegionKind::Data,
        RegionKind::Rodata,
        RegionKind::RoAfterInit,
        RegionKind::InitText,
        RegionKind::InitData,
        RegionKind::InitRodata,
    ];

    /// The `enum mod_mem_type` enumerator.
    pub fn enumerator(self) -> &'static str {
        match self {
            RegionKind::Text => "MOD_TEXT",
            RegionKind::Data => "MOD_DATA",
            RegionKind::Rodata => "MOD_RODATA",
            RegionKind::RoAfterInit => "MOD_RO_AFTER_INIT",
            RegionKind::InitText => "MOD_INIT_TEXT",
            RegionKind::InitData => "MOD_INIT_DATA",
            RegionKind::InitRodata => "MOD_INIT_RODATA",
        }
    }

    /// Whether the region is freed after init.
    pub fn is_init(self) -> bool {
        matches!(
            self,
            RegionKind::InitText | RegionKind::InitData | RegionKind::InitRodata
        )
    }

    /// Whether the region holds code.
    pub fn is_text(self) -> bool {
        matches!(self, RegionKind::Text | RegionKind::InitText)
    }
}

/// BTF offsets of one 6.1 `struct module_layout` inside `struct module`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutOffsets {
    /// `base` (pointer).
    pub base: u64,
    /// `size` (u32): the whole layout.
    pub size: u64,
    /// `text_size` (u32): text is `[base, base + text_size)`.
    pub text_size: u64,
    /// `ro_size` (u32): rodata ends at `base + ro_size`.
    pub ro_size: u64,
    /// `ro_after_init_size` (u32): ro-after-init data ends here; data follows up to `size`.
    pub ro_after_init_size: u64,
}

/// How a module's memory regions are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionLayout {
    /// 6.4+: `struct module_memory mem[MOD_MEM_NUM_TYPES]`: per kind, the offsets of `base`
    /// and of the u32 `size`.
    Mem(Vec<(RegionKind, u64, u64)>),
    /// 6.1: `core_layout` and `init_layout`, each cut into text, rodata, ro-after-init and
    /// data by its sizes.
    Layouts {
        /// `module.core_layout`.
        core: LayoutOffsets,
        /// `module.init_layout`.
        init: LayoutOffsets,
    },
}

impl ModuleLayout {
    /// Reads the layout from BTF; `None` if the kernel has no module support we understand.
    pub fn from_btf(btf: &Btf, head: u64) -> Option<ModuleLayout> {
        let off = |p: &str| btf.member_offset("module", p).ok();
        let mut text = Vec::new();
        let regions = if let Some(mem) = off("mem") {
            // 6.4+: struct module_memory mem[MOD_MEM_NUM_TYPES].
            let sz = btf.struct_size("module_memory").ok()?;
            let base = btf.member_offset("module_memory", "base").ok()?;
            let size = btf.member_offset("module_memory", "size").ok()?;
            let mut regions = Vec::new();
            for kind in RegionKind::ALL {
                let Some(i) = btf
                    .enum_value(kind.enumerator())
                    .and_then(|v| u64::try_from(v).ok())
                else {
                    continue;
                };
                let at = mem.checked_add(i.checked_mul(sz)?)?;
                regions.push((kind, at + base, at + size));
            }
            for e in [RegionKind::Text, RegionKind::InitText] {
                let &(_, b, s) = regions.iter().find(|r| r.0 == e)?;
                text.push((b, s));
            }
            RegionLayout::Mem(regions)
        } else {
            let lo = |l: &str| -> Option<LayoutOffsets> {
                let at = off(l)?;
                let m = |f: &str| btf.member_offset("module_layout", f).ok().map(|o| at + o);
                Some(LayoutOffsets {
                    base: m("base")?,
                    size: m("size")?,
                    text_size: m("text_size")?,
                    ro_size: m("ro_size")?,
                    ro_after_init_size: m("ro_after_init_size")?,
                })
            };
            let (core, init) = (lo("core_layout")?, lo("init_layout")?);
            for l in [core, init] {
                text.push((l.base, l.text_size));
            }
            RegionLayout::Layouts { core, init }
        };
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
            states: [
                btf.enum_value("MODULE_STATE_LIVE"),
                btf.enum_value("MODULE_STATE_COMING"),
                btf.enum_value("MODULE_STATE_GOING"),
            ],
            name: (name.offset, name.size.min(64)),
            text,
            regions,
            orc,
            kallsyms: crate::modsyms::ModKallsymsLayout::from_btf(btf),
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

/// Most bytes of a module name we read (`MODULE_NAME_LEN` is 56 on x86-64).
const NAME_MAX: u64 = 64;

/// Errors reading the module list, a module's regions or its symbols from guest memory.
/// Every guest pointer and length is checked; bad values end here, never in a panic.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModuleError {
    /// The kernel's BTF does not describe `struct module` the way we read it (or the kernel
    /// has no `modules` list).
    #[error("the layout of struct module is not known from this kernel's BTF")]
    NoLayout,
    /// The kernel's BTF does not describe `struct mod_kallsyms` / `struct kernel_symbol`.
    #[error(
        "the layout of module symbols (struct mod_kallsyms) is not known from this kernel's BTF"
    )]
    NoKallsymsLayout,
    /// Building the kernel model (BTF) failed.
    #[error("building the kernel model")]
    Model(#[from] crate::model::ModelError),
    /// The `modules` list is not a bounded, loop-free list of kernel addresses.
    #[error("corrupted module list: {0}")]
    List(String),
    /// Reading guest memory failed.
    #[error("module {module}: reading {what} at {addr:#x}: {err}")]
    Read {
        /// The module (its name, or its `struct module` address while the name is unknown).
        module: String,
        /// What was read.
        what: &'static str,
        /// Guest virtual address.
        addr: u64,
        /// The underlying error.
        err: String,
    },
    /// A value in the module is impossible (a range that wraps or leaves kernel space, sizes
    /// out of order, a pointer that is not a kernel address).
    #[error("module {module}: {what}")]
    Corrupt {
        /// The module.
        module: String,
        /// What is wrong.
        what: String,
    },
    /// A count is over our limit.
    #[error("module {module}: {what} is {count}, more than the {max} accepted")]
    TooMany {
        /// The module.
        module: String,
        /// What was counted.
        what: &'static str,
        /// The guest's value.
        count: u64,
        /// Our limit.
        max: u64,
    },
    /// No loaded module has this name.
    #[error("no module named {0:?} is loaded")]
    NoModule(String),
    /// A symbol lookup in a module failed (unknown, ambiguous, or no such sympos).
    #[error("module {module}")]
    Symbol {
        /// The module.
        module: String,
        /// Why.
        #[source]
        source: crate::SymbolError,
    },
}

/// A module's `state` (`enum module_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleState {
    /// `MODULE_STATE_LIVE`: initialized.
    Live,
    /// `MODULE_STATE_COMING`: relocated, its init is running (or about to).
    Coming,
    /// `MODULE_STATE_GOING`: being removed (or its init failed).
    Going,
    /// A value BTF does not name.
    Unknown,
}

impl ModuleState {
    /// The word `/proc/modules` prints (`Live`, `Loading`, `Unloading`; the kernel prints
    /// `Live` for every other value).
    pub fn proc_name(self) -> &'static str {
        match self {
            ModuleState::Coming => "Loading",
            ModuleState::Going => "Unloading",
            ModuleState::Live | ModuleState::Unknown => "Live",
        }
    }
}

/// One memory region of a module, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRegion {
    /// What it holds.
    pub kind: RegionKind,
    /// First byte.
    #[serde(with = "crate::hex")]
    pub start: u64,
    /// One past the last byte.
    #[serde(with = "crate::hex")]
    pub end: u64,
}

/// A loaded (formed) module: name, state and memory regions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    /// `struct module *`.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// `module.name`.
    pub name: String,
    /// `module.state`.
    pub state: ModuleState,
    /// Total size in bytes, as `/proc/modules` shows it (every region, init included).
    pub size: u64,
    /// The non-empty regions, core first.
    pub regions: Vec<ModuleRegion>,
}

impl Module {
    /// The region of one kind.
    pub fn region(&self, kind: RegionKind) -> Option<(u64, u64)> {
        self.regions
            .iter()
            .find(|r| r.kind == kind)
            .map(|r| (r.start, r.end))
    }

    /// Core text `[start, end)`.
    pub fn core_text(&self) -> Option<(u64, u64)> {
        self.region(RegionKind::Text)
    }

    /// Init text `[start, end)`, while it is still there.
    pub fn init_text(&self) -> Option<(u64, u64)> {
        self.region(RegionKind::InitText)
    }

    /// The address `/proc/modules` prints: the base of core text.
    pub fn base(&self) -> Option<u64> {
        self.core_text().map(|r| r.0)
    }

    /// The region holding `addr`.
    pub fn region_of(&self, addr: u64) -> Option<&ModuleRegion> {
        self.regions
            .iter()
            .find(|r| addr >= r.start && addr < r.end)
    }
}

/// Reads one guest value, mapping the failure to [`ModuleError::Read`].
fn rd<T>(
    module: &str,
    what: &'static str,
    addr: u64,
    r: Result<T, String>,
) -> Result<T, ModuleError> {
    r.map_err(|err| ModuleError::Read {
        module: module.to_string(),
        what,
        addr,
        err,
    })
}

/// `[base, base + size)` checked: no wrap, in the kernel half when not empty.
fn region(
    module: &str,
    kind: RegionKind,
    base: u64,
    size: u64,
) -> Result<Option<ModuleRegion>, ModuleError> {
    if size == 0 || base == 0 {
        return Ok(None);
    }
    let end = base
        .checked_add(size)
        .filter(|_| base >> 63 == 1)
        .ok_or_else(|| ModuleError::Corrupt {
            module: module.to_string(),
            what: format!("{kind:?} region {base:#x}+{size:#x} is not in kernel space"),
        })?;
    Ok(Some(ModuleRegion {
        kind,
        start: base,
        end,
    }))
}

/// Reads `module.name` of `struct module *m` (NUL-terminated within the array).
pub fn read_module_name(
    g: &dyn GuestAccess,
    l: &ModuleLayout,
    m: u64,
) -> Result<String, ModuleError> {
    let at = format!("{m:#x}");
    let na = m.wrapping_add(l.name.0);
    let mut name = vec![0u8; l.name.1.min(NAME_MAX) as usize];
    rd(&at, "name", na, g.read_virt(na, &mut name))?;
    let end = name
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ModuleError::Corrupt {
            module: at,
            what: "name is not NUL-terminated".into(),
        })?;
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Reads one module's name, state and regions at `struct module *m`.
fn read_module(g: &dyn GuestAccess, l: &ModuleLayout, m: u64) -> Result<Module, ModuleError> {
    let name = read_module_name(g, l, m)?;
    let sa = m.wrapping_add(l.state);
    let raw = rd(&name, "state", sa, g.read_u32(sa))? as i32 as i64;
    let state = match l.states.iter().position(|&s| s == Some(raw)) {
        Some(0) => ModuleState::Live,
        Some(1) => ModuleState::Coming,
        Some(2) => ModuleState::Going,
        _ => ModuleState::Unknown,
    };
    let mut regions = Vec::new();
    let mut size = 0u64;
    match &l.regions {
        RegionLayout::Mem(list) => {
            for &(kind, b, s) in list {
                let base = rd(
                    &name,
                    "module_memory.base",
                    m.wrapping_add(b),
                    g.read_u64(m.wrapping_add(b)),
                )?;
                let sz = rd(
                    &name,
                    "module_memory.size",
                    m.wrapping_add(s),
                    g.read_u32(m.wrapping_add(s)),
                )? as u64;
                size += sz;
                regions.extend(region(&name, kind, base, sz)?);
            }
            // Core first, in mod_mem_type order otherwise.
            regions.sort_by_key(|r| {
                (
                    r.kind.is_init(),
                    RegionKind::ALL.iter().position(|&k| k == r.kind),
                )
            });
        }
        RegionLayout::Layouts { core, init } => {
            let kinds = [
                [
                    RegionKind::Text,
                    RegionKind::Rodata,
                    RegionKind::RoAfterInit,
                    RegionKind::Data,
                ],
                [
                    RegionKind::InitText,
                    RegionKind::InitRodata,
                    RegionKind::InitRodata,
                    RegionKind::InitData,
                ],
            ];
            for (lo, kinds) in [core, init].into_iter().zip(kinds) {
                let u = |off: u64, what: &'static str| -> Result<u64, ModuleError> {
                    let a = m.wrapping_add(off);
                    Ok(rd(&name, what, a, g.read_u32(a))? as u64)
                };
                let ba = m.wrapping_add(lo.base);
                let base = rd(&name, "module_layout.base", ba, g.read_u64(ba))?;
                let total = u(lo.size, "module_layout.size")?;
                let cuts = [
                    0,
                    u(lo.text_size, "module_layout.text_size")?,
                    u(lo.ro_size, "module_layout.ro_size")?,
                    u(lo.ro_after_init_size, "module_layout.ro_after_init_size")?,
                    total,
                ];
                if cuts.windows(2).any(|w| w[0] > w[1]) {
                    return Err(ModuleError::Corrupt {
                        module: name,
                        what: format!("module_layout sizes out of order: {cuts:x?}"),
                    });
                }
                size += total;
                for (i, kind) in kinds.into_iter().enumerate() {
                    let start = base.wrapping_add(cuts[i]);
                    if let Some(r) = region(&name, kind, start, cuts[i + 1] - cuts[i])? {
                        // Init has no ro-after-init part: merge it into init rodata.
                        match regions.last_mut() {
                            Some(last) if last.kind == kind && last.end == r.start => {
                                last.end = r.end
                            }
                            _ => regions.push(r),
                        }
                    }
                }
            }
        }
    }
    Ok(Module {
        addr: m,
        name,
        state,
        size,
        regions,
    })
}

/// The `struct module *` of every formed module, in list order (newest first, the order of
/// `/proc/modules` and `/proc/kallsyms`); bounded and loop-checked.
pub fn module_addrs(g: &dyn GuestAccess, l: &ModuleLayout) -> Result<Vec<u64>, ModuleError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let head = rd("modules", "list head", l.head, g.read_u64(l.head))?;
    let mut p = head;
    while p != l.head {
        if seen.len() >= MAX_MODULES {
            return Err(ModuleError::List(format!(
                "more than {MAX_MODULES} modules"
            )));
        }
        if !seen.insert(p) {
            return Err(ModuleError::List(format!("loop at {p:#x}")));
        }
        if p >> 63 == 0 {
            return Err(ModuleError::List(format!(
                "link {p:#x} is not a kernel address"
            )));
        }
        let m = p.wrapping_sub(l.list);
        p = rd(&format!("{m:#x}"), "list.next", p, g.read_u64(p))?;
        let sa = m.wrapping_add(l.state);
        let state = rd(&format!("{m:#x}"), "state", sa, g.read_u32(sa))? as i32 as i64;
        if Some(state) == l.unformed {
            continue;
        }
        out.push(m);
    }
    Ok(out)
}

/// Every formed module: name, state, regions (in `/proc/modules` order).
pub fn read_module_list(g: &dyn GuestAccess, l: &ModuleLayout) -> Result<Vec<Module>, ModuleError> {
    module_addrs(g, l)?
        .into_iter()
        .map(|m| read_module(g, l, m))
        .collect()
}

impl crate::Kernel {
    /// The module layout of this kernel's model.
    pub(crate) fn module_layout(
        &self,
        mem: &dyn crate::PhysMemory,
    ) -> Result<&ModuleLayout, ModuleError> {
        self.model(mem)?
            .modules
            .as_ref()
            .ok_or(ModuleError::NoLayout)
    }

    /// Loaded modules (name, state, core and init text/data regions), read now from the
    /// guest, in `/proc/modules` order.
    pub fn modules(&self, mem: &dyn crate::PhysMemory) -> Result<Vec<Module>, ModuleError> {
        let l = self.module_layout(mem)?;
        read_module_list(&crate::model::KernelGuest { kernel: self, mem }, l)
    }

    /// Loaded modules as the unwinder sees them (text ranges, ORC tables).
    pub fn module_texts(&self, mem: &dyn crate::PhysMemory) -> Result<Vec<ModuleText>, String> {
        let m = self.model(mem).map_err(|e| e.to_string())?;
        match &m.modules {
            Some(l) => read_modules(&crate::model::KernelGuest { kernel: self, mem }, l),
            None => Ok(Vec::new()),
        }
    }
}
