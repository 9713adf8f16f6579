//! The patch engine: loads, stacks and unloads patches in a running guest (immediate mode).
//!
//! A load prepares everything while the guest runs (parse, release check, arena pages,
//! link, site checks, every byte to write), then pauses all vCPUs, re-verifies every byte it
//! will overwrite (arena pages still free, PMD still empty, sites still as expected), writes,
//! and resumes. Any failure inside the pause window rolls back the writes already done, so
//! the guest is left byte-for-byte unchanged.
//!
//! Several patches may replace the same function: like klp's `func_stack`, the newest wins;
//! unloading it retargets the entry jmp to the previous patch, and when no patch is left the
//! original NOP comes back.
//!
//! Immediate mode has no consistency model: a task sleeping inside an old or a new function
//! during the switch keeps running that code. Unloading (see `unload.rs`) therefore first
//! disables the patch — its entries go back to the previous version at once — and frees its
//! pages only when nothing in the guest can reach them any more.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use introspect::PhysMemory;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arena::{pte, Arena, ArenaError, ArenaInfo, PageKind, PAGE};
use crate::guest::{GuestControl, GuestError};
use crate::link::{link, pick_sympos, LinkError, Resolver, RETURN_THUNK};
use crate::paging::{KernelPaging, PagingError};
use crate::patchobj::{ObjectError, PatchObject};
use crate::site::{self, SiteOwner, NOP5};
use crate::symbols::SymbolSource;

/// Errors of engine operations. The guest is unchanged after any of them.
#[derive(Debug, Error)]
pub enum PatchError {
    /// The object is not a valid patch.
    #[error(transparent)]
    Object(#[from] Box<ObjectError>),
    /// Linking failed.
    #[error("{patch}: {source}")]
    Link {
        /// Patch name.
        patch: String,
        /// The error.
        source: Box<LinkError>,
    },
    /// A patch of that name is loaded.
    #[error("a patch named {0} is already loaded")]
    AlreadyLoaded(String),
    /// No patch of that name.
    #[error("no patch named {0} is loaded")]
    NotLoaded(String),
    /// Built for another kernel.
    #[error("{patch} was built for kernel {wanted} but the guest runs {guest}")]
    KernelMismatch {
        /// Patch name.
        patch: String,
        /// HVPATCH_KERNEL.
        wanted: String,
        /// Guest release.
        guest: String,
    },
    /// The guest release could not be read.
    #[error("cannot read the guest's kernel release (linux_banner): {0}")]
    Release(String),
    /// A function's entry cannot be patched.
    #[error("cannot patch {func} at {addr:#x} (site {site:#x}): {what}")]
    Site {
        /// Function.
        func: String,
        /// Function address.
        addr: u64,
        /// Patch site.
        site: u64,
        /// Why.
        what: String,
    },
    /// Arena problem.
    #[error(transparent)]
    Arena(#[from] ArenaError),
    /// Page-table problem.
    #[error("paging: {0}")]
    Paging(#[from] PagingError),
    /// Guest control failed.
    #[error("guest control: {0}")]
    Guest(#[from] GuestError),
    /// Guest memory read failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Verification inside the pause window failed (the guest changed since preparation).
    #[error("verification failed, nothing written: {0}")]
    Changed(String),
    /// A vCPU is executing code that would go away.
    #[error("{0}")]
    Busy(String),
    /// Unload disabled the patch, but its pages are still reachable after the wait: they stay
    /// mapped and intact (the patch is held) and are freed by a later check.
    #[error("{name} is disabled (its functions run the previous version) but still held after {waited_ms} ms: {by}; its code and data stay in place and are freed once nothing can reach them")]
    Held {
        /// Patch name.
        name: String,
        /// How long the unload waited.
        waited_ms: u64,
        /// What holds it.
        by: String,
        /// The details.
        hold: Box<crate::reach::Hold>,
    },
}

/// State of a loaded patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchState {
    /// Loaded, immediate mode (every function switched at once).
    Enabled,
    /// Unloaded (disabled: no function runs it any more) but its code and data pages are kept
    /// because something in the guest may still execute, return into or read them; see
    /// [`PatchInfo::held`]. They are freed once a later check finds them unreachable.
    Held,
}

/// One replaced function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncInfo {
    /// Replaced function.
    pub old_name: String,
    /// Its sympos (0 = unique).
    pub sympos: u64,
    /// Its address.
    #[serde(with = "introspect::hex")]
    pub old_addr: u64,
    /// Patch site (fn+0 or fn+4 after ENDBR).
    #[serde(with = "introspect::hex")]
    pub site: u64,
    /// The new function's address (in the arena).
    #[serde(with = "introspect::hex")]
    pub new_addr: u64,
    /// Whether this patch's version is the one running (top of the function's stack).
    pub active: bool,
    /// `HVPATCH_*` flags of the record (`HVPATCH_IMMEDIATE` = 1; every load is immediate today).
    pub flags: u64,
}

/// A range of the arena used by a patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaRange {
    /// Kernel VA.
    #[serde(with = "introspect::hex")]
    pub va: u64,
    /// Bytes used.
    pub len: u64,
    /// Guest-physical pages backing it.
    #[serde(with = "introspect::hex")]
    pub pages: Vec<u64>,
}

/// Public description of a loaded patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchInfo {
    /// Patch name.
    pub name: String,
    /// Object file name.
    pub file_name: String,
    /// HVPATCH_KERNEL, if any.
    pub kernel_release: Option<String>,
    /// State.
    pub state: PatchState,
    /// Replaced functions.
    pub functions: Vec<FuncInfo>,
    /// Code (RX).
    pub code: ArenaRange,
    /// Data (RW, NX).
    pub data: ArenaRange,
    /// Return-thunk sites rewritten by the linker.
    pub return_sites: usize,
    /// Time the vCPUs were paused for the load, µs.
    pub pause_us: u64,
    /// Whole load time, µs.
    pub load_us: u64,
    /// For a [`PatchState::Held`] patch: what held it at the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<crate::reach::Hold>,
}

/// Timing of the last load/unload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpTiming {
    /// Preparation (before pausing).
    pub prepare: Duration,
    /// Pause window (pause → resume).
    pub pause: Duration,
    /// Total.
    pub total: Duration,
}

/// What the engine needs to know about the guest kernel.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// Symbols (kallsyms or an explicit map).
    pub symbols: &'a dyn SymbolSource,
    /// Kernel page tables.
    pub paging: KernelPaging,
}

impl std::fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").finish_non_exhaustive()
    }
}

impl<'a> Target<'a> {
    /// A target with the paging root of vCPU 0 (see [`KernelPaging::from_regs`]).
    pub fn from_vcpu0(
        symbols: &'a dyn SymbolSource,
        ctl: &mut dyn GuestControl,
    ) -> Result<Self, PatchError> {
        let regs = ctl.regs(0)?;
        Ok(Self {
            symbols,
            paging: KernelPaging::from_regs(&regs),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StackEntry {
    pub(crate) patch: String,
    #[serde(with = "introspect::hex")]
    pub(crate) new_addr: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SiteStack {
    pub(crate) func: String,
    #[serde(with = "introspect::hex")]
    pub(crate) site_pa: u64,
    pub(crate) original: [u8; 5],
    pub(crate) entries: Vec<StackEntry>,
}

impl SiteStack {
    pub(crate) fn current_bytes(&self, site: u64) -> [u8; 5] {
        match self.entries.last() {
            Some(e) => site::jmp_bytes(site, e.new_addr).unwrap_or(self.original),
            None => self.original,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Loaded {
    /// Unique for the engine's life (names repeat: a held patch and its reload).
    #[serde(default)]
    pub(crate) id: u64,
    pub(crate) info: PatchInfo,
    pub(crate) code_run: (usize, usize),
    pub(crate) data_run: (usize, usize),
    /// PTEs written at load: (page index, value).
    #[serde(with = "introspect::hex")]
    pub(crate) ptes: Vec<(usize, u64)>,
}

/// One planned write with the bytes expected there before it.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub(crate) pa: u64,
    pub(crate) expect: Option<Vec<u8>>,
    pub(crate) old: Vec<u8>,
    pub(crate) new: Vec<u8>,
    pub(crate) what: String,
}

/// The engine. Its whole state is serde-serializable ([`Engine::state`]), so a host process
/// can persist it and a later one continue ([`Engine::from_state`]).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Engine {
    pub(crate) arena: Option<Arena>,
    /// Enabled and held patches, in load order.
    pub(crate) patches: Vec<Loaded>,
    #[serde(with = "introspect::hex::keys")]
    pub(crate) sites: BTreeMap<u64, SiteStack>,
    /// Kernel paging of the last load.
    pub(crate) paging: Option<KernelPaging>,
    #[serde(skip)]
    pub(crate) last: OpTiming,
}

struct GuestResolver<'a> {
    t: &'a Target<'a>,
    mem: &'a dyn PhysMemory,
}

impl Resolver for GuestResolver<'_> {
    fn resolve(&self, name: &str, sympos: u64) -> Result<u64, LinkError> {
        pick_sympos(name, &self.t.symbols.addresses(name), sympos)
    }

    fn return_thunk(&self) -> Result<Option<u64>, LinkError> {
        let rt = self.t.symbols.addresses(RETURN_THUNK).first().copied();
        if let Some(var) = self.t.symbols.addresses("x86_return_thunk").first() {
            let v = self
                .t
                .paging
                .read_u64(self.mem, *var)
                .map_err(|e| LinkError::Guest(e.to_string()))?;
            if Some(v) == rt {
                return Ok(None);
            }
            if self.t.symbols.symbolize(v).is_none() {
                return Err(LinkError::Guest(format!(
                    "x86_return_thunk = {v:#x} is not kernel text"
                )));
            }
            return Ok(Some(v));
        }
        // Older kernels: no selectable thunk; `__x86_return_thunk` is either `ret` or the thunk.
        match rt {
            None => Ok(None),
            Some(rt) => {
                let mut b = [0u8; 1];
                self.t
                    .paging
                    .read_virt(self.mem, rt, &mut b)
                    .map_err(|e| LinkError::Guest(e.to_string()))?;
                Ok(if b[0] == 0xc3 { None } else { Some(rt) })
            }
        }
    }
}

/// A patch id never used before in this process (ids survive engine resets, so a waiting
/// operation can never mistake a new patch for the one it waits for).
pub(crate) fn fresh_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Reads the guest's `uname -r` from `linux_banner` ("Linux version <release> (...").
pub fn guest_release(mem: &dyn PhysMemory, t: &Target) -> Result<String, PatchError> {
    let va = *t
        .symbols
        .addresses("linux_banner")
        .first()
        .ok_or_else(|| PatchError::Release("no linux_banner symbol".into()))?;
    let mut b = [0u8; 160];
    t.paging
        .read_virt(mem, va, &mut b)
        .map_err(|e| PatchError::Release(e.to_string()))?;
    let s = String::from_utf8_lossy(&b);
    let rest = s
        .strip_prefix("Linux version ")
        .ok_or_else(|| PatchError::Release(format!("unexpected banner {s:?}")))?;
    let rel = rest.split(' ').next().unwrap_or("");
    if rel.is_empty() {
        return Err(PatchError::Release(format!("unexpected banner {s:?}")));
    }
    Ok(rel.to_string())
}

/// Names a dynamically allocated ftrace ops trampoline: ftrace copies `ftrace_caller` or
/// `ftrace_regs_caller` into module space (`create_trampoline()`), so its first bytes match.
fn ftrace_trampoline(mem: &dyn PhysMemory, t: &Target, addr: u64) -> Option<String> {
    let mut here = [0u8; 24];
    t.paging.read_virt(mem, addr, &mut here).ok()?;
    for name in ["ftrace_regs_caller", "ftrace_caller"] {
        let Some(&orig) = t.symbols.addresses(name).first() else {
            continue;
        };
        let mut b = [0u8; 24];
        if t.paging.read_virt(mem, orig, &mut b).is_ok() && b == here {
            return Some(format!(
                "{name} (a copy: ftrace ops trampoline at {addr:#x})"
            ));
        }
    }
    None
}

fn read(mem: &dyn PhysMemory, pa: u64, len: usize) -> Result<Vec<u8>, PatchError> {
    let mut b = vec![0u8; len];
    mem.read_phys(pa, &mut b)
        .map_err(|e| PatchError::Memory(e.to_string()))?;
    Ok(b)
}

pub(crate) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Runs `f` with all vCPUs paused (unless the caller had them paused already).
pub(crate) fn paused<T>(
    ctl: &mut dyn GuestControl,
    f: impl FnOnce(&mut dyn GuestControl) -> Result<T, PatchError>,
) -> Result<(T, Duration), PatchError> {
    let was = ctl.is_paused();
    let t = Instant::now();
    if !was {
        ctl.pause()?;
    }
    let r = f(ctl);
    let resumed = if was { Ok(()) } else { ctl.resume() };
    let d = t.elapsed();
    let v = r?;
    resumed?;
    Ok((v, d))
}

/// Verifies then applies `writes` in order; on failure restores what was written.
pub(crate) fn apply(ctl: &mut dyn GuestControl, writes: &mut [Write]) -> Result<(), PatchError> {
    for w in writes.iter_mut() {
        if let Some(exp) = &w.expect {
            let cur = read(ctl.memory(), w.pa, exp.len())?;
            if &cur != exp {
                return Err(PatchError::Changed(format!(
                    "{} at {:#x}: expected {}, found {}",
                    w.what,
                    w.pa,
                    site::hex(&exp[..exp.len().min(16)]),
                    site::hex(&cur[..cur.len().min(16)])
                )));
            }
        }
        w.old = read(ctl.memory(), w.pa, w.new.len())?;
    }
    let batch: Vec<(u64, &[u8])> = writes.iter().map(|w| (w.pa, w.new.as_slice())).collect();
    if let Err(e) = ctl.write_phys_batch(&batch) {
        // A prefix of the batch may have landed (the last write possibly in part): restore,
        // newest first, every write whose bytes are no longer the old ones.
        for w in writes.iter().rev() {
            if read(ctl.memory(), w.pa, w.old.len()).ok().as_ref() != Some(&w.old) {
                let _ = ctl.write_phys(w.pa, &w.old);
            }
        }
        return Err(e.into());
    }
    Ok(())
}

impl Engine {
    /// An engine with nothing loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loaded patches, in load order.
    pub fn list(&self) -> Vec<PatchInfo> {
        self.patches
            .iter()
            .map(|p| self.with_active(&p.info))
            .collect()
    }

    /// One loaded patch.
    pub fn info(&self, name: &str) -> Option<PatchInfo> {
        self.find(name)
            .map(|i| self.with_active(&self.patches[i].info))
    }

    /// Index of the patch named `name`: the enabled one, else the oldest held one.
    pub(crate) fn find(&self, name: &str) -> Option<usize> {
        let named = |p: &&Loaded| p.info.name == name;
        self.patches
            .iter()
            .position(|p| named(&p) && p.info.state == PatchState::Enabled)
            .or_else(|| self.patches.iter().position(|p| named(&p)))
    }

    /// Whether some patch is disabled but still held.
    pub fn has_held(&self) -> bool {
        self.patches
            .iter()
            .any(|p| p.info.state == PatchState::Held)
    }

    /// The arena, once one was set up.
    pub fn arena(&self) -> Option<ArenaInfo> {
        self.arena.as_ref().map(Arena::info)
    }

    /// The engine state as JSON (arena with what was verified, loaded patches, function
    /// stacks with the original bytes).
    pub fn state(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// An engine continuing from [`Engine::state`]. Each later operation re-verifies the
    /// guest bytes it overwrites, so a stale state fails cleanly instead of corrupting.
    pub fn from_state(json: &str) -> Result<Engine, PatchError> {
        let mut e: Engine = serde_json::from_str(json)
            .map_err(|e| PatchError::Changed(format!("bad engine state: {e}")))?;
        // Ids are unique within this process only: renumber (older states have none).
        for p in &mut e.patches {
            p.id = fresh_id();
        }
        Ok(e)
    }

    /// Checks that the guest still holds what the engine installed: every patched entry site
    /// has the expected `jmp`, and the arena's PMD entry is ours. Returns the problems found
    /// (empty = healthy). Reads only; racy while the guest runs (pause for a firm answer).
    pub fn check(&self, ctl: &dyn GuestControl) -> Vec<String> {
        let mem = ctl.memory();
        let mut problems = Vec::new();
        for (&site, st) in &self.sites {
            let want = st.current_bytes(site);
            let mut cur = [0u8; 5];
            match mem.read_phys(st.site_pa, &mut cur) {
                Ok(()) if cur == want => {}
                Ok(()) => problems.push(format!(
                    "{} (site {site:#x}): expected {}, found {}",
                    st.func,
                    site::hex(&want),
                    site::hex(&cur)
                )),
                Err(e) => problems.push(format!("{} (site {site:#x}): {e}", st.func)),
            }
        }
        if let Some(m) = self.arena.as_ref().and_then(|a| a.mapping) {
            match mem.read_u64(m.pmd_pa) {
                Ok(v) if v == m.pmd_new => {}
                Ok(v) => problems.push(format!(
                    "arena PMD entry at {:#x} for {:#x}: expected {:#x}, found {v:#x}",
                    m.pmd_pa, m.va, m.pmd_new
                )),
                Err(e) => problems.push(format!("arena PMD entry at {:#x}: {e}", m.pmd_pa)),
            }
        }
        problems
    }

    /// Timing of the last successful load or unload.
    pub fn last_timing(&self) -> OpTiming {
        self.last
    }

    fn with_active(&self, info: &PatchInfo) -> PatchInfo {
        let mut i = info.clone();
        for f in &mut i.functions {
            f.active = self
                .sites
                .get(&f.site)
                .and_then(|s| s.entries.last())
                .is_some_and(|e| e.patch == i.name);
        }
        i
    }

    /// Loads a patch object (`file_name` names it unless it has `HVPATCH_NAME`).
    pub fn load(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        object: &[u8],
        file_name: &str,
    ) -> Result<PatchInfo, PatchError> {
        let t0 = Instant::now();
        let obj = PatchObject::parse(object, file_name).map_err(Box::new)?;
        if self
            .patches
            .iter()
            .any(|p| p.info.name == obj.name && p.info.state == PatchState::Enabled)
        {
            return Err(PatchError::AlreadyLoaded(obj.name));
        }
        if let Some(wanted) = &obj.kernel_release {
            let guest = guest_release(ctl.memory(), t)?;
            if &guest != wanted {
                return Err(PatchError::KernelMismatch {
                    patch: obj.name,
                    wanted: wanted.clone(),
                    guest,
                });
            }
        }
        // Arena (discovered once, state kept on success only).
        let base = match &self.arena {
            Some(a) => a.clone(),
            None => match ctl.patch_arena() {
                Some((s, l)) => Arena::host(s, l),
                None => Arena::low_memory(ctl.memory(), &t.paging, t.symbols)?,
            },
        };
        let mem = ctl.memory();
        let ncode = obj.layout.code_size.div_ceil(PAGE) as usize;
        let ndata = obj.layout.data_size.div_ceil(PAGE) as usize;
        // Map (reusing the last slot with its old layout first; a fresh slot if the patch
        // does not fit that layout) and pick the code and data pages.
        let place = |reuse: bool| -> Result<_, PatchError> {
            let mut arena = base.clone();
            let new_mapping = match arena.mapping {
                Some(_) => None,
                None => {
                    let m = arena.plan_mapping(mem, &t.paging, t.symbols, reuse)?;
                    arena.set_mapped(m);
                    Some(m)
                }
            };
            let code_start = arena.find_run(ncode, PageKind::Code)?;
            arena.mark(code_start, ncode, PageKind::Code);
            let data_start = arena.find_run(ndata, PageKind::Data)?;
            arena.mark(data_start, ndata, PageKind::Data);
            Ok((arena, new_mapping, code_start, data_start))
        };
        let (arena, new_mapping, code_start, data_start) = match place(true) {
            Err(PatchError::Arena(ArenaError::Full { .. })) if base.mapping.is_none() => {
                place(false)?
            }
            r => r?,
        };
        let mapping = arena
            .mapping
            .ok_or_else(|| PatchError::Changed("no mapping".into()))?;
        let va_of = |i: usize| mapping.va + i as u64 * PAGE;
        let (code_base, data_base) = (va_of(code_start), va_of(data_start));

        let resolver = GuestResolver { t, mem };
        let linked =
            link(&obj, &resolver, code_base, data_base).map_err(|source| PatchError::Link {
                patch: obj.name.clone(),
                source: Box::new(source),
            })?;

        // Entry sites.
        struct SitePlan {
            site: u64,
            site_pa: u64,
            expect: [u8; 5],
            jmp: [u8; 5],
            original: Option<[u8; 5]>,
        }
        let mut plans = Vec::new();
        let mut functions = Vec::new();
        for f in &linked.funcs {
            let mut head = [0u8; 9];
            t.paging.read_virt(mem, f.old_addr, &mut head)?;
            let site = f.old_addr + site::site_offset(&head);
            let serr = |what: String| PatchError::Site {
                func: f.old_name.clone(),
                addr: f.old_addr,
                site,
                what,
            };
            let site_pa = t.paging.translate(mem, site)?;
            if t.paging.translate(mem, site + 4)? != site_pa + 4 {
                return Err(serr("the 5-byte site crosses a page boundary".into()));
            }
            if plans.iter().any(|p: &SitePlan| p.site == site) {
                return Err(serr("replaced twice by this patch".into()));
            }
            let mut cur = [0u8; 5];
            mem.read_phys(site_pa, &mut cur)
                .map_err(|e| PatchError::Memory(e.to_string()))?;
            let (expect, original) = match self.sites.get(&site) {
                Some(st) => (st.current_bytes(site), None),
                None => (NOP5, Some(NOP5)),
            };
            if cur != expect {
                let sym = |a: u64| {
                    t.symbols
                        .symbolize(a)
                        .map(|(n, o)| format!("{n}+{o:#x}"))
                        .or_else(|| ftrace_trampoline(mem, t, a))
                };
                let owner = site::classify(site, &cur, &sym);
                let what = match owner {
                    SiteOwner::Unexpected if self.sites.contains_key(&site) => {
                        format!("our jmp was overwritten: found {}", site::hex(&cur))
                    }
                    o => format!(
                        "{o}; found {} where {} was expected",
                        site::hex(&cur),
                        site::hex(&expect)
                    ),
                };
                return Err(serr(what));
            }
            let jmp = site::jmp_bytes(site, f.new_addr).ok_or_else(|| {
                serr(format!(
                    "new function {:#x} is out of rel32 reach",
                    f.new_addr
                ))
            })?;
            plans.push(SitePlan {
                site,
                site_pa,
                expect,
                jmp,
                original,
            });
            functions.push(FuncInfo {
                old_name: f.old_name.clone(),
                sympos: f.sympos,
                old_addr: f.old_addr,
                site,
                new_addr: f.new_addr,
                active: true,
                flags: f.flags,
            });
        }

        // Every byte to write, with what must be there now.
        let zero = vec![0u8; PAGE as usize];
        let mut writes = Vec::new();
        let mut pte_writes = Vec::new();
        // The pages are verified all-zero; only their non-zero prefix is written (fewer bytes
        // through slow backends such as the gdbstub).
        let page_chunks = |bytes: &[u8], start: usize, n: usize| -> Vec<(usize, Vec<u8>)> {
            (0..n)
                .map(|k| {
                    let lo = (k * PAGE as usize).min(bytes.len());
                    let hi = ((k + 1) * PAGE as usize).min(bytes.len());
                    let chunk = &bytes[lo..hi];
                    let used = chunk.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                    (start + k, chunk[..used].to_vec())
                })
                .collect()
        };
        let table_pa = arena.pages[mapping.table];
        for (kind, chunks) in [
            (PageKind::Code, page_chunks(&linked.code, code_start, ncode)),
            (PageKind::Data, page_chunks(&linked.data, data_start, ndata)),
        ] {
            for (i, content) in chunks {
                let pa = arena.pages[i];
                writes.push(Write {
                    pa,
                    expect: Some(zero.clone()),
                    old: vec![],
                    new: content,
                    what: format!("arena page {i}"),
                });
                pte_writes.push((i, pte(pa, kind, t.paging.nx)));
            }
        }
        let mut low_mem_pages: Vec<u64> = writes.iter().map(|w| w.pa).collect();
        if let Some(m) = new_mapping {
            let mut table = vec![0u8; PAGE as usize];
            for &(i, v) in &pte_writes {
                table[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            writes.push(Write {
                pa: table_pa,
                expect: Some(zero.clone()),
                old: vec![],
                new: table,
                what: "page table".into(),
            });
            writes.push(Write {
                pa: m.pmd_pa,
                expect: Some(m.pmd_old.to_le_bytes().to_vec()),
                old: vec![],
                new: m.pmd_new.to_le_bytes().to_vec(),
                what: format!("PMD entry for {:#x}", m.va),
            });
            low_mem_pages.push(table_pa);
        } else {
            for &(i, v) in &pte_writes {
                writes.push(Write {
                    pa: table_pa + i as u64 * 8,
                    expect: Some(vec![0; 8]),
                    old: vec![],
                    new: v.to_le_bytes().to_vec(),
                    what: format!("PTE {i}"),
                });
            }
            writes.push(Write {
                pa: mapping.pmd_pa,
                expect: Some(mapping.pmd_new.to_le_bytes().to_vec()),
                old: vec![],
                new: mapping.pmd_new.to_le_bytes().to_vec(),
                what: "our PMD entry".into(),
            });
        }
        for p in &plans {
            writes.push(Write {
                pa: p.site_pa,
                expect: Some(p.expect.to_vec()),
                old: vec![],
                new: p.jmp.to_vec(),
                what: format!("entry site {:#x}", p.site),
            });
        }
        let prepare = t0.elapsed();

        // Pause window: re-verify and write.
        let arena_ref = &arena;
        let paging = t.paging;
        let ((), pause) = paused(ctl, |ctl| {
            for &pa in &low_mem_pages {
                arena_ref.verify_free(ctl.memory(), &paging, pa)?;
            }
            apply(ctl, &mut writes)
        })?;

        // Commit.
        for (p, f) in plans.iter().zip(&functions) {
            let st = self.sites.entry(p.site).or_insert_with(|| SiteStack {
                func: f.old_name.clone(),
                site_pa: p.site_pa,
                original: p.original.unwrap_or(NOP5),
                entries: Vec::new(),
            });
            st.entries.push(StackEntry {
                patch: obj.name.clone(),
                new_addr: f.new_addr,
            });
        }
        let pages = |s: usize, n: usize| (s..s + n).map(|i| arena.pages[i]).collect::<Vec<_>>();
        let total = t0.elapsed();
        let info = PatchInfo {
            name: obj.name.clone(),
            file_name: obj.file_name.clone(),
            kernel_release: obj.kernel_release.clone(),
            state: PatchState::Enabled,
            functions,
            code: ArenaRange {
                va: code_base,
                len: obj.layout.code_size,
                pages: pages(code_start, ncode),
            },
            data: ArenaRange {
                va: data_base,
                len: obj.layout.data_size,
                pages: pages(data_start, ndata),
            },
            return_sites: linked.return_sites,
            pause_us: us(pause),
            load_us: us(total),
            held: None,
        };
        self.arena = Some(arena);
        self.paging = Some(t.paging);
        self.patches.push(Loaded {
            id: fresh_id(),
            info: info.clone(),
            code_run: (code_start, ncode),
            data_run: (data_start, ndata),
            ptes: pte_writes,
        });
        self.last = OpTiming {
            prepare,
            pause,
            total,
        };
        tracing::info!(patch = %info.name, pause_us = info.pause_us, "patch loaded");
        Ok(self.with_active(&info))
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use crate::arena::Mapping;
    use serde_json::Value;

    const OLD: u64 = 0xffff_ffff_8123_4560;
    const NEW: u64 = 0xffff_ffff_c000_1000;

    /// An engine with one loaded patch, one function stack and a mapped arena.
    fn sample() -> Engine {
        let mut arena = Arena::host(0x7fe0_0000, 2 << 20);
        arena.set_mapped(Mapping {
            va: 0xffff_ffff_c000_0000,
            pmd_pa: 0x2a0_cff8,
            pmd_old: 0,
            pmd_new: 0x7fe0_0063,
            table: 0,
        });
        arena.mark(1, 1, PageKind::Code);
        let info = PatchInfo {
            name: "p".into(),
            file_name: "p.o".into(),
            kernel_release: None,
            state: PatchState::Enabled,
            functions: vec![FuncInfo {
                old_name: "f".into(),
                sympos: 0,
                old_addr: OLD,
                site: OLD + 4,
                new_addr: NEW,
                active: true,
                flags: 1,
            }],
            code: ArenaRange {
                va: NEW,
                len: 64,
                pages: vec![0x7fe0_1000],
            },
            data: ArenaRange {
                va: NEW + 0x1000,
                len: 0,
                pages: vec![],
            },
            return_sites: 0,
            pause_us: 5,
            load_us: 9,
            held: None,
        };
        Engine {
            arena: Some(arena),
            patches: vec![Loaded {
                id: 1,
                info,
                code_run: (1, 1),
                data_run: (2, 0),
                ptes: vec![(1, 0x8000_0000_7fe0_1063)],
            }],
            sites: BTreeMap::from([(
                OLD + 4,
                SiteStack {
                    func: "f".into(),
                    site_pa: 0x123_4564,
                    original: [0x0f, 0x1f, 0x44, 0, 0],
                    entries: vec![StackEntry {
                        patch: "p".into(),
                        new_addr: NEW,
                    }],
                },
            )]),
            paging: Some(KernelPaging {
                pgd_pa: 0x2a0_c000,
                la57: false,
                nx: true,
            }),
            last: OpTiming::default(),
        }
    }

    /// Rewrites every `"0x…"` string (values and map keys) as the JSON number (decimal key)
    /// versions before hex addresses wrote.
    fn as_numbers(v: Value) -> Value {
        let num = |s: &str| introspect::hex::parse_hex(s).ok();
        match v {
            Value::String(s) => num(&s).map_or(Value::String(s), Value::from),
            Value::Array(a) => Value::Array(a.into_iter().map(as_numbers).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, v)| (num(&k).map_or(k, |n| n.to_string()), as_numbers(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    #[test]
    fn state_writes_addresses_as_hex_and_round_trips() {
        let e = sample();
        let state = e.state();
        let v: Value = serde_json::from_str(&state).unwrap();
        let p = &v["patches"][0]["info"];
        assert_eq!(p["functions"][0]["old_addr"], "0xffffffff81234560");
        assert_eq!(p["functions"][0]["site"], "0xffffffff81234564");
        assert_eq!(p["functions"][0]["new_addr"], "0xffffffffc0001000");
        assert_eq!(p["functions"][0]["sympos"], 0);
        assert_eq!(p["code"]["va"], "0xffffffffc0001000");
        assert_eq!(p["code"]["len"], 64);
        assert_eq!(p["code"]["pages"][0], "0x7fe01000");
        assert_eq!(v["patches"][0]["ptes"][0][1], "0x800000007fe01063");
        let site = &v["sites"]["0xffffffff81234564"];
        assert_eq!(site["site_pa"], "0x1234564", "{v}");
        assert_eq!(site["entries"][0]["new_addr"], "0xffffffffc0001000");
        assert_eq!(v["paging"]["pgd_pa"], "0x2a0c000");
        let arena = &v["arena"];
        assert_eq!(arena["source"]["Host"]["start"], "0x7fe00000");
        assert_eq!(arena["source"]["Host"]["len"], 2 << 20);
        assert_eq!(arena["pages"][1], "0x7fe01000");
        assert_eq!(arena["mapping"]["va"], "0xffffffffc0000000");
        assert_eq!(arena["mapping"]["pmd_new"], "0x7fe00063");

        let back = Engine::from_state(&state).unwrap();
        // Equal but for the ids, which a restored engine renumbers (unique per process).
        assert_eq!(without_ids(&back.state()), without_ids(&state));
        let again = Engine::from_state(&state).unwrap();
        assert_ne!(
            again.patches[0].id, back.patches[0].id,
            "ids are never reused"
        );
        assert_eq!(back.sites.keys().copied().collect::<Vec<_>>(), [OLD + 4]);
        assert_eq!(
            serde_json::to_value(back.arena().unwrap()).unwrap()["mapping"]["pmd_pa"],
            "0x2a0cff8"
        );
    }

    #[test]
    fn state_of_older_versions_with_numbers_still_loads() {
        let e = sample();
        let state = e.state();
        let old = as_numbers(serde_json::from_str(&state).unwrap());
        let old_text = old.to_string();
        assert!(
            old_text.contains("18446744071581156708") && !old_text.contains("\"0x"),
            "{old_text}"
        );
        let back = Engine::from_state(&old_text).unwrap();
        assert_eq!(without_ids(&back.state()), without_ids(&state));
    }

    /// A state's JSON with every patch id blanked.
    fn without_ids(j: &str) -> Value {
        let mut v: Value = serde_json::from_str(j).unwrap();
        for p in v["patches"].as_array_mut().unwrap() {
            p["id"] = Value::Null;
        }
        v
    }

    #[test]
    fn state_with_a_bad_address_is_refused() {
        let state = sample().state().replace("\"0x1234564\"", "\"0xnope\"");
        let e = Engine::from_state(&state).unwrap_err().to_string();
        assert!(
            e.contains("bad engine state") && e.contains("0xnope"),
            "{e}"
        );
    }
}
