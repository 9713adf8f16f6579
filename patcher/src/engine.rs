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
//!
//! The parts: `plan.rs` computes a load before the pause, `txn.rs` is the write transaction
//! inside it, `func_stack.rs` the per-site patch stacks, `info.rs` the public descriptions;
//! this file holds the engine's state and the orchestration.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arena::{Arena, ArenaError, ArenaInfo};
use crate::func_stack::{SiteStack, StackEntry};
use crate::guest::{GuestControl, GuestError};
use crate::link::LinkError;
use crate::paging::{KernelPaging, PagingError};
use crate::patchobj::ObjectError;
use crate::plan::{plan_load, LoadPlan};
use crate::site;
use crate::symbols::SymbolSource;
use crate::txn::{apply, paused};
use crate::view::TaskView;

pub use crate::info::{ArenaRange, FuncInfo, OpTiming, PatchInfo, PatchState};
pub use crate::plan::guest_release;

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
    /// A kernel module the patch names cannot be patched now.
    #[error("{patch}: module {module} {what}")]
    Module {
        /// Patch name.
        patch: String,
        /// The module.
        module: String,
        /// Why (not loaded, being loaded or unloaded, unreadable).
        what: String,
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
    /// A transition is running (only one at a time, as in klp).
    #[error("patch {0} is in transition; wait for it, disable it (reverses) or force it first")]
    InTransition(String),
    /// The guest's own livepatch is busy or not idle, so a transition cannot start.
    #[error("the guest's livepatch is not idle: {0}")]
    GuestKlp(String),
    /// A transition did not complete in time and was reversed.
    #[error("{name}: the transition to {target} did not complete in {waited_ms} ms and was reversed; still blocking: {blocking}")]
    TransitionTimeout {
        /// Patch name.
        name: String,
        /// "patched" or "unpatched".
        target: String,
        /// How long it waited.
        waited_ms: u64,
        /// The tasks that held it.
        blocking: String,
    },
    /// The operation does not fit the patch's state.
    #[error("{0}")]
    State(String),
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
    /// For a patch applied when its modules loaded: how it waits again when they go.
    #[serde(default)]
    pub(crate) rewait: Option<crate::modwait::Waiting>,
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
    /// The transition in progress, if any (the consistency model, `consistency.rs`).
    #[serde(default)]
    pub(crate) transition: Option<crate::transition::Transition>,
    /// Patches waiting for their kernel modules to load ([`crate::modwait`]).
    #[serde(default)]
    pub(crate) waiting: Vec<crate::modwait::Waiting>,
    #[serde(skip)]
    pub(crate) last: OpTiming,
}

/// A patch id never used before in this process (ids survive engine resets, so a waiting
/// operation can never mistake a new patch for the one it waits for).
pub(crate) fn fresh_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `d` in whole microseconds.
pub(crate) fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Engine {
    /// An engine with nothing loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loaded patches, in load order, then the patches waiting for their modules.
    pub fn list(&self) -> Vec<PatchInfo> {
        self.patches
            .iter()
            .map(|p| self.with_active(&p.info))
            .chain(self.waiting.iter().map(crate::modwait::Waiting::info))
            .collect()
    }

    /// One loaded (or waiting) patch.
    pub fn info(&self, name: &str) -> Option<PatchInfo> {
        self.find(name)
            .map(|i| self.with_active(&self.patches[i].info))
            .or_else(|| {
                self.waiting
                    .iter()
                    .find(|w| w.name == name)
                    .map(crate::modwait::Waiting::info)
            })
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

    /// What the journal in guest memory keeps ([`crate::journal`]): [`Engine::state`] without
    /// what changes at every check of a transition (the per-task states and blockers, which the
    /// guest itself holds or the next check recomputes, and the counters, which restart from
    /// zero), so that the journal is rewritten only when the patches, the function stacks, the
    /// arena or a transition's course change. `None` when nothing is loaded and no transition
    /// runs: the journal is then cleared.
    pub fn journal_state(&self) -> Option<String> {
        if self.patches.is_empty() && self.transition.is_none() {
            return None;
        }
        let mut e = self.clone();
        if let Some(t) = e.transition.as_mut() {
            t.tasks.clear();
            t.blocking.clear();
            t.checks = 0;
            t.pause_us = 0;
            t.boundary_hits = (0, 0);
        }
        Some(serde_json::to_string(&e).unwrap_or_default())
    }

    /// The journal's slots in the arena (guest-physical starts), taken on first use
    /// ([`Arena::journal_slots`]); empty while there is no arena.
    pub fn journal_slots(
        &mut self,
        mem: &dyn introspect::PhysMemory,
    ) -> Result<Vec<u64>, ArenaError> {
        match (self.arena.as_mut(), self.paging.as_ref()) {
            (Some(a), Some(p)) => a.journal_slots(mem, p),
            _ => Ok(Vec::new()),
        }
    }

    /// The journal's slots already taken (guest-physical starts).
    pub fn journal_starts(&self) -> Vec<u64> {
        self.arena
            .as_ref()
            .map(Arena::journal_starts)
            .unwrap_or_default()
    }

    /// An engine continuing from [`Engine::state`]. Each later operation re-verifies the
    /// guest bytes it overwrites, so a stale state fails cleanly instead of corrupting.
    pub fn from_state(json: &str) -> Result<Engine, PatchError> {
        let mut e: Engine = serde_json::from_str(json)
            .map_err(|e| PatchError::Changed(format!("bad engine state: {e}")))?;
        // Ids are unique within this process only: renumber (older states have none).
        let in_transition = e
            .transition
            .as_ref()
            .and_then(|t| e.patches.iter().position(|p| p.id == t.patch_id));
        for p in &mut e.patches {
            p.id = fresh_id();
        }
        if let (Some(t), Some(i)) = (e.transition.as_mut(), in_transition) {
            t.patch_id = e.patches[i].id;
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

    pub(crate) fn with_active(&self, info: &PatchInfo) -> PatchInfo {
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

    /// Loads a patch object (`file_name` names it unless it has `HVPATCH_NAME`): plans it while
    /// the guest runs ([`plan_load`]), then, with every vCPU paused, re-verifies that the arena
    /// pages are still free and every byte to overwrite is as planned, and writes
    /// ([`apply`]); then records it.
    ///
    /// A function without an ftrace site needs a prologue rewrite, which this refuses (with a
    /// hint): it must check that no vCPU or task is inside the moved bytes
    /// ([`Engine::load_viewed`]).
    pub fn load(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        object: &[u8],
        file_name: &str,
    ) -> Result<PatchInfo, PatchError> {
        self.load_viewed(ctl, t, None, object, file_name)
    }

    /// [`Engine::load`]; with `view`, functions without an ftrace site are patched by a
    /// prologue rewrite ([`crate::prologue`]), after checking in the pause that no register or
    /// live stack slot ([`TaskView::live_references`]) points strictly inside the moved bytes
    /// (a context resuming there would land inside the `jmp`).
    pub fn load_viewed(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        view: Option<&dyn TaskView>,
        object: &[u8],
        file_name: &str,
    ) -> Result<PatchInfo, PatchError> {
        let t0 = Instant::now();
        let mut plan = plan_load(self, ctl, t, object, file_name, None, view.is_some())?;
        let prepare = t0.elapsed();
        plan.writes.append(&mut plan.site_writes);
        let inside: Vec<(u64, u64)> = plan
            .prologues
            .iter()
            .map(|(_, p)| (p.site + 1, p.resume))
            .collect();
        // Pause window: re-verify and write.
        let paging = t.paging;
        let ((), pause) = paused(ctl, |ctl| {
            for &pa in &plan.low_mem_pages {
                plan.arena.verify_free(ctl.memory(), &paging, pa)?;
            }
            if let (Some(view), false) = (view, inside.is_empty()) {
                let vcpus = (0..ctl.vcpu_count())
                    .map(|i| ctl.regs(i))
                    .collect::<Result<Vec<_>, _>>()?;
                let refs = view
                    .live_references(ctl.memory(), &vcpus, &inside)
                    .unwrap_or_else(|| Err("the kernel view cannot list live contexts".into()))
                    .map_err(|e| PatchError::Busy(format!("checking the moved bytes: {e}")))?;
                if let Some(r) = refs.first() {
                    return Err(PatchError::Busy(format!(
                        "{r} points inside the bytes a prologue rewrite moves ({}); retry",
                        plan.prologues
                            .iter()
                            .map(|(n, p)| format!("{n} {:#x}..{:#x}", p.site, p.resume))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
            apply(ctl, &mut plan.writes)
        })?;

        let info = self.commit(plan, t.paging, prepare, pause, t0, true);
        tracing::info!(patch = %info.name, pause_us = info.pause_us, "patch loaded");
        Ok(self.with_active(&info))
    }

    /// Records a load written into the guest: its function stacks, arena, patch and timing.
    pub(crate) fn commit(
        &mut self,
        plan: LoadPlan,
        paging: KernelPaging,
        prepare: Duration,
        pause: Duration,
        t0: Instant,
        immediate: bool,
    ) -> PatchInfo {
        let LoadPlan {
            obj,
            arena,
            code_run,
            data_run,
            code_base,
            data_base,
            return_sites,
            functions,
            sites,
            pte_writes,
            code_len,
            data_len,
            ..
        } = plan;
        for (s, f) in sites.iter().zip(&functions) {
            let st = self.sites.entry(s.site).or_insert_with(|| SiteStack {
                func: f.old_name.clone(),
                site_pa: s.site_pa,
                original: s.original,
                entries: Vec::new(),
                during: None,
            });
            st.entries.push(StackEntry {
                patch: obj.name.clone(),
                new_addr: f.new_addr,
                new_size: f.new_size,
            });
        }
        let pages = |(s, n): (usize, usize)| (s..s + n).map(|i| arena.pages[i]).collect();
        let total = t0.elapsed();
        let info = PatchInfo {
            name: obj.name.clone(),
            file_name: obj.file_name.clone(),
            kernel_release: obj.kernel_release.clone(),
            state: PatchState::Enabled,
            functions,
            code: ArenaRange {
                va: code_base,
                len: code_len,
                pages: pages(code_run),
            },
            data: ArenaRange {
                va: data_base,
                len: data_len,
                pages: pages(data_run),
            },
            return_sites,
            pause_us: us(pause),
            load_us: us(total),
            immediate,
            frame_pointers: obj.frame_pointers,
            held: None,
            last_transition: None,
            waiting_for: vec![],
            module_hooked: false,
        };
        self.arena = Some(arena);
        self.paging = Some(paging);
        self.patches.push(Loaded {
            id: fresh_id(),
            info: info.clone(),
            code_run,
            data_run,
            ptes: pte_writes,
            rewait: None,
        });
        self.last = OpTiming {
            prepare,
            pause,
            total,
        };
        info
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use crate::arena::{Mapping, PageKind};
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
                object: None,
                old_size: None,
                sympos: 0,
                old_addr: OLD,
                site: OLD + 4,
                new_addr: NEW,
                active: true,
                flags: 1,
                new_size: 64,
                stub: None,
                method: Default::default(),
                tramp: None,
                moved: vec![],
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
            immediate: true,
            frame_pointers: true,
            held: None,
            last_transition: None,
            waiting_for: vec![],
            module_hooked: false,
        };
        Engine {
            arena: Some(arena),
            patches: vec![Loaded {
                id: 1,
                info,
                code_run: (1, 1),
                data_run: (2, 0),
                ptes: vec![(1, 0x8000_0000_7fe0_1063)],
                rewait: None,
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
                        new_size: 64,
                    }],
                    during: None,
                },
            )]),
            paging: Some(KernelPaging {
                pgd_pa: 0x2a0_c000,
                la57: false,
                nx: true,
            }),
            transition: None,
            waiting: vec![],
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
