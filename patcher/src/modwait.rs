//! Patches for kernel modules that are not loaded (klp's `klp_module_coming()` /
//! `klp_module_going()`, from outside the guest).
//!
//! A patch whose functions are all in modules, none of them loaded, is accepted and waits
//! ([`PatchState::Waiting`]). The host stops the guest with hardware breakpoints at
//! [`COMING_HOOK`] (`do_init_module`: the module is relocated, its state is COMING and none of
//! its code has run) and [`GOING_HOOK`] (`free_module`: the module is leaving, its memory is
//! still mapped), RDI being the `struct module *`. At the coming hook the waiting patches of that
//! module are applied immediately (no task can be inside code that never ran), through the same
//! plan, verify and write path as any load. At the going hook the patches applied that way are
//! unloaded (their sites restored, their pages freed once unreachable) and wait again.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, PatchError, Target};
use crate::guest::GuestControl;
use crate::info::{ArenaRange, FuncInfo, PatchInfo, PatchState};
use crate::patchobj::PatchObject;
use crate::plan::{guest_release, plan_at_module_load};
use crate::reach::Reachability;
use crate::txn::{apply, paused};

/// Where the guest is stopped when a module is about to run: `do_init_module(struct module *)`.
pub const COMING_HOOK: &str = "do_init_module";
/// Where the guest is stopped when a module is about to be freed: `free_module(struct module *)`.
pub const GOING_HOOK: &str = "free_module";

/// A patch waiting for its modules.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Waiting {
    pub(crate) name: String,
    pub(crate) file_name: String,
    pub(crate) kernel_release: Option<String>,
    /// The modules it patches.
    pub(crate) modules: Vec<String>,
    /// (module, function, sympos, flags) of each replaced function.
    pub(crate) funcs: Vec<(Option<String>, String, u64, u64)>,
    pub(crate) frame_pointers: bool,
    /// The object, to load when the modules come.
    pub(crate) object: Vec<u8>,
}

impl Waiting {
    fn new(obj: &PatchObject) -> Waiting {
        Waiting {
            name: obj.name.clone(),
            file_name: obj.file_name.clone(),
            kernel_release: obj.kernel_release.clone(),
            modules: obj.modules(),
            funcs: obj
                .funcs
                .iter()
                .map(|f| (f.object.clone(), f.old_name.clone(), f.sympos, f.flags))
                .collect(),
            frame_pointers: obj.frame_pointers,
            object: obj.bytes.clone(),
        }
    }

    /// As `patch info` shows it: no addresses yet.
    pub(crate) fn info(&self) -> PatchInfo {
        let empty = ArenaRange {
            va: 0,
            len: 0,
            pages: vec![],
        };
        PatchInfo {
            name: self.name.clone(),
            file_name: self.file_name.clone(),
            kernel_release: self.kernel_release.clone(),
            state: PatchState::Waiting,
            functions: self
                .funcs
                .iter()
                .map(|(o, n, pos, flags)| FuncInfo {
                    old_name: n.clone(),
                    object: o.clone(),
                    old_size: None,
                    sympos: *pos,
                    old_addr: 0,
                    site: 0,
                    new_addr: 0,
                    active: false,
                    flags: *flags,
                    new_size: 0,
                    stub: None,
                    method: Default::default(),
                    tramp: None,
                    moved: vec![],
                })
                .collect(),
            code: empty.clone(),
            data: empty,
            return_sites: 0,
            pause_us: 0,
            load_us: 0,
            immediate: true,
            frame_pointers: self.frame_pointers,
            held: None,
            last_transition: None,
            waiting_for: self.modules.clone(),
            module_hooked: false,
        }
    }
}

impl Engine {
    /// Whether the host must stop the guest at [`COMING_HOOK`] and [`GOING_HOOK`]: a patch
    /// waits for its modules, or one applied at a module's load is in the guest.
    pub fn wants_module_hooks(&self) -> bool {
        !self.waiting.is_empty()
            || self
                .patches
                .iter()
                .any(|p| p.rewait.is_some() && p.info.state != PatchState::Held)
    }

    /// A load of `obj` whose modules are all missing: it waits (returned as
    /// [`PatchState::Waiting`]); `None` when every module it names is loaded (or it names
    /// none): a normal load. Refused when only some are missing, when it also replaces
    /// vmlinux functions, or while a breakpoints transition holds the debug registers.
    pub(crate) fn wait_for_modules(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        obj: &PatchObject,
    ) -> Result<Option<PatchInfo>, PatchError> {
        let modules = obj.modules();
        if modules.is_empty() {
            return Ok(None);
        }
        let mem = ctl.memory();
        let err = |m: &str, what: String| PatchError::Module {
            patch: obj.name.clone(),
            module: m.to_string(),
            what,
        };
        let (mut present, mut missing) = (Vec::new(), Vec::new());
        for m in &modules {
            match t.symbols.module(mem, m).map_err(|e| err(m, e))? {
                Some(_) => present.push(m.clone()),
                None => missing.push(m.clone()),
            }
        }
        let Some(first) = missing.first() else {
            return Ok(None);
        };
        if !present.is_empty() {
            return Err(err(
                first,
                format!(
                    "is not loaded while {} is: a patch waits for its modules only when none of \
                     them is loaded (split it, one patch per module)",
                    present.join(", ")
                ),
            ));
        }
        if obj.funcs.iter().any(|f| f.object.is_none()) {
            return Err(err(
                first,
                "is not loaded, and the patch also replaces vmlinux functions: put the module's \
                 functions in a patch of their own, which then waits for the module"
                    .into(),
            ));
        }
        for hook in [COMING_HOOK, GOING_HOOK] {
            if t.symbols.addresses(hook).len() != 1 {
                return Err(err(
                    first,
                    format!(
                        "is not loaded, and the guest's kallsyms has no unique {hook} to watch \
                         module loads with"
                    ),
                ));
            }
        }
        if self.wants_boundary_hits() {
            return Err(err(
                first,
                "is not loaded, and watching for it needs 2 debug registers while a \
                 breakpoints transition uses 3; retry when it has ended"
                    .into(),
            ));
        }
        let taken = self
            .patches
            .iter()
            .any(|p| p.info.name == obj.name && p.info.state != PatchState::Held)
            || self.waiting.iter().any(|w| w.name == obj.name);
        if taken {
            return Err(PatchError::AlreadyLoaded(obj.name.clone()));
        }
        if let Some(wanted) = &obj.kernel_release {
            let guest = guest_release(mem, t)?;
            if &guest != wanted {
                return Err(PatchError::KernelMismatch {
                    patch: obj.name.clone(),
                    wanted: wanted.clone(),
                    guest,
                });
            }
        }
        let w = Waiting::new(obj);
        let info = w.info();
        tracing::info!(patch = %w.name, modules = ?w.modules, "patch waits for its modules");
        self.waiting.push(w);
        Ok(Some(info))
    }

    /// Whether a patch named `name` is in the guest (enabled, disabled or held).
    pub fn is_loaded(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// For catching up after a missed hook stop, by `present` (whether a module is loaded):
    /// the modules whose waiting patches could apply now (all their modules present), and the
    /// modules of applied patches that are gone.
    pub fn module_hook_candidates(
        &self,
        present: &dyn Fn(&str) -> bool,
    ) -> (Vec<String>, Vec<String>) {
        let mut coming: Vec<String> = self
            .waiting
            .iter()
            .filter(|w| w.modules.iter().all(|m| present(m)))
            .filter_map(|w| w.modules.first().cloned())
            .collect();
        let mut going: Vec<String> = self
            .patches
            .iter()
            .filter(|p| p.info.state != PatchState::Held)
            .filter_map(|p| p.rewait.as_ref())
            .flat_map(|w| w.modules.iter().filter(|m| !present(m)).cloned())
            .collect();
        coming.dedup();
        going.sort();
        going.dedup();
        (coming, going)
    }

    /// Forgets the waiting patch `name` (its unload: nothing of it is in the guest).
    pub fn forget_waiting(&mut self, name: &str) -> Option<PatchInfo> {
        let i = self.waiting.iter().position(|w| w.name == name)?;
        Some(self.waiting.remove(i).info())
    }

    /// The guest is stopped at [`COMING_HOOK`] for module `module`: applies every waiting
    /// patch whose modules are all there now. Returns the patches applied; the first error
    /// (the patch keeps waiting) after trying them all.
    pub fn module_coming(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        module: &str,
    ) -> Result<Vec<String>, PatchError> {
        let mut applied = Vec::new();
        let mut first_err = None;
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &self.waiting[i];
            let ready = w.modules.iter().any(|m| m == module)
                && w.modules.iter().all(|m| {
                    matches!(t.symbols.module(ctl.memory(), m), Ok(Some(ms))
                        if matches!(ms.module.state,
                            introspect::ModuleState::Live | introspect::ModuleState::Coming))
                });
            if !ready {
                i += 1;
                continue;
            }
            let w = self.waiting.remove(i);
            match self.apply_at_module_load(ctl, t, &w) {
                Ok(()) => {
                    tracing::info!(patch = %w.name, %module, "applied at the module's load");
                    applied.push(w.name.clone());
                    if let Some(p) = self.patches.last_mut() {
                        p.info.module_hooked = true;
                        p.rewait = Some(w);
                    }
                }
                Err(e) => {
                    tracing::warn!(patch = %w.name, %module, "applying at the module's load: {e}");
                    first_err.get_or_insert(e);
                    self.waiting.insert(i, w);
                    i += 1;
                }
            }
        }
        match first_err {
            Some(e) if applied.is_empty() => Err(e),
            _ => Ok(applied),
        }
    }

    /// One waiting patch, loaded immediately while the guest is stopped at the coming hook.
    fn apply_at_module_load(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        w: &Waiting,
    ) -> Result<(), PatchError> {
        let t0 = Instant::now();
        let obj = PatchObject::parse(&w.object, &w.file_name).map_err(Box::new)?;
        let mut plan = plan_at_module_load(self, ctl, t, obj)?;
        let prepare = t0.elapsed();
        plan.writes.append(&mut plan.site_writes);
        let paging = t.paging;
        let ((), pause) = paused(ctl, |ctl| {
            for &pa in &plan.low_mem_pages {
                plan.arena.verify_free(ctl.memory(), &paging, pa)?;
            }
            apply(ctl, &mut plan.writes)
        })?;
        self.commit(plan, t.paging, prepare, pause, t0, true);
        Ok(())
    }

    /// The guest is stopped at [`GOING_HOOK`] for module `module` (still mapped): the patches
    /// applied at its load are unloaded (sites restored; pages freed now or, while something
    /// still reaches them, by a later reap) and wait for the module again; a disabled one is
    /// dropped. Returns the patches that wait again.
    pub fn module_going(
        &mut self,
        ctl: &mut dyn GuestControl,
        reach: &dyn Reachability,
        module: &str,
    ) -> Result<Vec<String>, PatchError> {
        let ids: Vec<u64> = self
            .patches
            .iter()
            .filter(|p| p.info.state != PatchState::Held)
            .filter(|p| {
                p.rewait
                    .as_ref()
                    .is_some_and(|w| w.modules.iter().any(|m| m == module))
            })
            .map(|p| p.id)
            .collect();
        let mut again = Vec::new();
        for id in ids {
            let Some(idx) = self.patches.iter().position(|p| p.id == id) else {
                continue;
            };
            if self.transition.as_ref().is_some_and(|tr| tr.patch_id == id) {
                tracing::warn!(%module, "module going while a patch of it is in transition");
                continue;
            }
            let Some(w) = self.patches[idx].rewait.take() else {
                continue;
            };
            let enabled = self.patches[idx].info.state == PatchState::Enabled;
            if enabled {
                self.disable_paused(ctl, id)?;
            } else {
                // Disabled: its kept function stacks go with the module.
                let sites: Vec<u64> = self.patches[idx]
                    .info
                    .functions
                    .iter()
                    .map(|f| f.site)
                    .collect();
                self.sites
                    .retain(|s, st| !(sites.contains(s) && st.entries.is_empty()));
                self.patches[idx].info.state = PatchState::Held;
            }
            self.check_and_free_paused(ctl, id, reach)?;
            if enabled {
                tracing::info!(patch = %w.name, %module, "module going: the patch waits again");
                again.push(w.name.clone());
                self.waiting.push(w);
            }
        }
        Ok(again)
    }
}
