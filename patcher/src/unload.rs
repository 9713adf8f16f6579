//! Unloading without ever freeing what the guest still uses.
//!
//! An unload has two steps, each inside its own pause of every vCPU:
//! 1. **disable**: every entry this patch tops goes back to the previous patch's `jmp` or to the
//!    original bytes (the function runs the previous version from the next call on), and the
//!    patch leaves its functions' stacks;
//! 2. **free**: only when [`Reachability::references`] finds nothing in the guest — no register
//!    of a kernel-mode vCPU, no live slot of any stack of any CPU or task — that points into the
//!    patch's code or data pages are its PTEs cleared and its pages zeroed (and, for the last
//!    patch, the arena's PMD entry restored).
//!
//! Step 2 runs right after step 1, in the same pause, when it can. Otherwise the patch is
//! *held* ([`PatchState::Held`]): disabled, its pages mapped and intact. [`Engine::unload`]
//! re-checks with a short backoff until its timeout; [`Engine::reap`] re-checks later.

use std::time::{Duration, Instant};

use introspect::VcpuRegs;
use serde::{Deserialize, Serialize};

use crate::arena::PAGE;
use crate::engine::{us, Engine, PatchError, PatchState};
use crate::guest::GuestControl;
use crate::reach::{Hold, Reachability};
use crate::site;
use crate::txn::{apply, paused, Write};

/// First and longest delay between two checks of a held patch during [`Engine::unload`].
const FIRST_RECHECK: Duration = Duration::from_millis(1);
const MAX_RECHECK: Duration = Duration::from_millis(50);

/// What an unload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadReport {
    /// Patch name.
    pub name: String,
    /// Reachability checks made (1 = freed at once).
    pub checks: u32,
    /// Time from disabling to freeing, µs (0 when freed at once).
    pub waited_us: u64,
    /// What held the patch at the first check, if anything did.
    pub first_hold: Option<Hold>,
    /// Pause of the disable step (with the free step when it ran at once), µs.
    pub pause_us: u64,
    /// Every pause of this unload added up, µs.
    pub total_pause_us: u64,
    /// Whole unload, µs.
    pub unload_us: u64,
}

impl UnloadReport {
    /// The report of an unload that had nothing in the guest to undo (a waiting patch).
    pub fn nothing(name: &str) -> UnloadReport {
        UnloadReport {
            name: name.to_string(),
            checks: 0,
            waited_us: 0,
            first_hold: None,
            pause_us: 0,
            total_pause_us: 0,
            unload_us: 0,
        }
    }
}

/// The outcome of one check of a held patch.
pub(crate) enum Check {
    Freed,
    Held(Hold),
}

fn vcpu_regs(ctl: &mut dyn GuestControl) -> Result<Vec<VcpuRegs>, PatchError> {
    (0..ctl.vcpu_count())
        .map(|v| ctl.regs(v).map_err(PatchError::from))
        .collect()
}

/// An unload in progress: the patch is disabled and held, and its pages wait to be freed.
/// Made by [`Engine::unload_start`], advanced by [`Engine::unload_continue`]; a host that must
/// not block (the API controller) keeps it and re-checks from its event loop.
#[derive(Debug, Clone)]
pub struct UnloadProgress {
    id: u64,
    started: Instant,
    held_at: Instant,
    delay: Duration,
    total_pause: Duration,
    /// What held the patch at the last check; `None` once freed.
    pub hold: Option<Hold>,
    /// The report so far (complete once [`UnloadProgress::is_done`]).
    pub report: UnloadReport,
}

impl UnloadProgress {
    /// Whether the pages were freed.
    pub fn is_done(&self) -> bool {
        self.hold.is_none()
    }

    /// When the next check is due (the backoff: 1 ms doubling to 50 ms).
    pub fn next_check(&self) -> Instant {
        Instant::now() + self.delay
    }

    /// Time since the unload started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The error for an unload that gave up waiting (the patch stays held).
    pub fn timed_out(&self) -> PatchError {
        let h = self.hold.clone().unwrap_or(Hold {
            by: "nothing (freed)".into(),
            pid: None,
            comm: None,
            references: 0,
            stack: vec![],
            kinds: vec![],
        });
        PatchError::Held {
            name: self.report.name.clone(),
            waited_ms: self.started.elapsed().as_millis() as u64,
            by: h.by.clone(),
            hold: Box::new(h),
        }
    }

    fn finish(&mut self) {
        if self.report.checks > 1 {
            self.report.waited_us = us(self.held_at.elapsed());
        }
        self.report.total_pause_us = us(self.total_pause);
        self.report.unload_us = us(self.started.elapsed());
    }
}

impl Engine {
    /// Unloads the patch `name`: disables it at once, then frees its pages as soon as nothing
    /// in the guest can reach them, waiting up to `timeout` for that (re-checking with a short
    /// backoff). A held patch of that name (an earlier unload that timed out) is waited for in
    /// the same way.
    ///
    /// On timeout it returns [`PatchError::Held`]: the patch stays disabled and held, its pages
    /// intact, and [`Engine::reap`] frees it later. Every other error leaves the guest as it was.
    pub fn unload(
        &mut self,
        ctl: &mut dyn GuestControl,
        name: &str,
        reach: &dyn Reachability,
        timeout: Duration,
    ) -> Result<UnloadReport, PatchError> {
        let mut p = self.unload_start(ctl, name, reach)?;
        while !p.is_done() {
            let left = timeout.saturating_sub(p.elapsed());
            if left.is_zero() {
                self.last.total = p.elapsed();
                return Err(p.timed_out());
            }
            std::thread::sleep(p.delay.min(left));
            self.unload_continue(ctl, &mut p, reach)?;
        }
        Ok(p.report)
    }

    /// First step of an unload: disables the patch `name` (or takes a held one) and checks
    /// once, in one pause; frees the pages if nothing reaches them.
    pub fn unload_start(
        &mut self,
        ctl: &mut dyn GuestControl,
        name: &str,
        reach: &dyn Reachability,
    ) -> Result<UnloadProgress, PatchError> {
        let started = Instant::now();
        let idx = self
            .find(name)
            .ok_or_else(|| PatchError::NotLoaded(name.to_string()))?;
        let id = self.patches[idx].id;
        crate::plan::no_transition(self)?;
        if self.patches[idx].info.state == PatchState::Disabled {
            // Nothing runs it any more: it is held until its pages are unreachable.
            self.patches[idx].info.state = PatchState::Held;
        }
        let (first, pause) = if self.patches[idx].info.state == PatchState::Enabled {
            self.disable_and_check(ctl, id, reach)?
        } else {
            self.check_and_free(ctl, id, reach)?
        };
        let hold = match first {
            Check::Freed => None,
            Check::Held(h) => Some(h),
        };
        let mut p = UnloadProgress {
            id,
            started,
            held_at: Instant::now(),
            delay: FIRST_RECHECK,
            total_pause: pause,
            report: UnloadReport {
                name: name.to_string(),
                checks: 1,
                waited_us: 0,
                first_hold: hold.clone(),
                pause_us: us(pause),
                total_pause_us: 0,
                unload_us: 0,
            },
            hold,
        };
        self.last.pause = pause;
        if p.is_done() {
            self.freed(&mut p);
        }
        Ok(p)
    }

    /// One more check of an unload in progress; frees the pages if nothing reaches them any
    /// more (also when [`Engine::reap`] freed them meanwhile). Returns whether it is done.
    pub fn unload_continue(
        &mut self,
        ctl: &mut dyn GuestControl,
        p: &mut UnloadProgress,
        reach: &dyn Reachability,
    ) -> Result<bool, PatchError> {
        if p.is_done() {
            return Ok(true);
        }
        let still_held = self
            .patches
            .iter()
            .any(|x| x.id == p.id && x.info.state == PatchState::Held);
        if !still_held {
            p.hold = None; // freed by a reap in between
        } else {
            let (c, pause) = self.check_and_free(ctl, p.id, reach)?;
            p.total_pause += pause;
            p.report.checks += 1;
            p.delay = (p.delay * 2).min(MAX_RECHECK);
            p.hold = match c {
                Check::Freed => None,
                Check::Held(h) => Some(h),
            };
        }
        if p.is_done() {
            self.freed(p);
        }
        Ok(p.is_done())
    }

    fn freed(&mut self, p: &mut UnloadProgress) {
        p.finish();
        self.last.total = p.started.elapsed();
        tracing::info!(
            patch = %p.report.name,
            checks = p.report.checks,
            waited_us = p.report.waited_us,
            "patch unloaded"
        );
    }

    /// Checks every held patch once, in one pause, and frees those nothing can reach any more.
    /// Returns the names of the patches freed.
    pub fn reap(
        &mut self,
        ctl: &mut dyn GuestControl,
        reach: &dyn Reachability,
    ) -> Result<Vec<String>, PatchError> {
        let held: Vec<(u64, String)> = self
            .patches
            .iter()
            .filter(|p| p.info.state == PatchState::Held)
            .map(|p| (p.id, p.info.name.clone()))
            .collect();
        if held.is_empty() {
            return Ok(vec![]);
        }
        let (freed, _) = paused(ctl, |ctl| {
            let mut freed = Vec::new();
            for (id, name) in held {
                if let Check::Freed = self.check_and_free_paused(ctl, id, reach)? {
                    tracing::info!(patch = %name, "held patch freed");
                    freed.push(name);
                }
            }
            Ok(freed)
        })?;
        Ok(freed)
    }

    /// Step 1 (and step 2 when it can) in one pause.
    fn disable_and_check(
        &mut self,
        ctl: &mut dyn GuestControl,
        id: u64,
        reach: &dyn Reachability,
    ) -> Result<(Check, Duration), PatchError> {
        paused(ctl, |ctl| {
            self.disable_paused(ctl, id)?;
            self.check_and_free_paused(ctl, id, reach)
        })
    }

    fn check_and_free(
        &mut self,
        ctl: &mut dyn GuestControl,
        id: u64,
        reach: &dyn Reachability,
    ) -> Result<(Check, Duration), PatchError> {
        paused(ctl, |ctl| self.check_and_free_paused(ctl, id, reach))
    }

    fn index_of(&self, id: u64) -> Result<usize, PatchError> {
        self.patches
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| PatchError::NotLoaded(format!("(patch #{id})")))
    }

    /// Restores the entries the patch tops and takes it off every function stack.
    pub(crate) fn disable_paused(
        &mut self,
        ctl: &mut dyn GuestControl,
        id: u64,
    ) -> Result<(), PatchError> {
        let idx = self.index_of(id)?;
        let name = self.patches[idx].info.name.clone();
        let mut writes = Vec::new();
        for f in &self.patches[idx].info.functions {
            let Some(st) = self.sites.get(&f.site) else {
                continue;
            };
            if f.object.is_some() && self.module_site_gone(ctl.memory(), f.site, st) {
                // The module was removed (its text unmapped or mapped elsewhere): nothing of
                // ours is left there, and the memory is no longer the module's.
                tracing::warn!(func = %st.func, site = %format!("{:#x}", f.site),
                    "module text gone: entry site forgotten, not written");
                continue;
            }
            if st.entries.last().is_some_and(|e| e.patch == name) {
                let below = st
                    .entries
                    .len()
                    .checked_sub(2)
                    .and_then(|i| st.entries.get(i));
                let new = match below {
                    Some(e) => site::jmp_bytes(f.site, e.new_addr).unwrap_or(st.original),
                    None => st.original,
                };
                writes.push(Write {
                    pa: st.site_pa,
                    expect: Some(st.current_bytes(f.site).to_vec()),
                    old: vec![],
                    new: new.to_vec(),
                    what: format!("entry site of {} ({:#x})", st.func, f.site),
                });
            }
        }
        apply(ctl, &mut writes)?;
        let sites: Vec<u64> = self.patches[idx]
            .info
            .functions
            .iter()
            .map(|f| f.site)
            .collect();
        for site in sites {
            if let Some(st) = self.sites.get_mut(&site) {
                st.entries.retain(|e| e.patch != name);
                if st.entries.is_empty() {
                    self.sites.remove(&site);
                }
            }
        }
        let p = &mut self.patches[idx];
        p.info.state = PatchState::Held;
        p.info.held = None;
        Ok(())
    }

    /// Whether the entry site `site` of a module function (function stack `st`) is no longer
    /// ours: it does not map to the same guest-physical address in the kernel's page tables
    /// any more (the module was unloaded, maybe loaded again elsewhere), or it holds the
    /// unpatched bytes where our jmp should be (loaded again into the same pages).
    pub(crate) fn module_site_gone(
        &self,
        mem: &dyn introspect::PhysMemory,
        site: u64,
        st: &crate::func_stack::SiteStack,
    ) -> bool {
        let unmapped = self
            .paging
            .is_some_and(|p| p.translate(mem, site).ok() != Some(st.site_pa));
        let mut cur = [0u8; 5];
        let reloaded = mem.read_phys(st.site_pa, &mut cur).is_ok()
            && cur == st.original
            && cur != st.current_bytes(site);
        unmapped || reloaded
    }

    /// Step 2 for a disabled patch: frees its pages if nothing reaches them, else records why
    /// it is held.
    pub(crate) fn check_and_free_paused(
        &mut self,
        ctl: &mut dyn GuestControl,
        id: u64,
        reach: &dyn Reachability,
    ) -> Result<Check, PatchError> {
        let idx = self.index_of(id)?;
        if self.patches[idx].info.state != PatchState::Held {
            // Only a disabled patch may ever be freed.
            return Err(PatchError::Changed(format!(
                "{} is enabled; refusing to free its pages",
                self.patches[idx].info.name
            )));
        }
        let p = self.patches[idx].clone();
        let code = (p.info.code.va, p.info.code.va + p.code_run.1 as u64 * PAGE);
        let data = (p.info.data.va, p.info.data.va + p.data_run.1 as u64 * PAGE);
        let vcpus = vcpu_regs(ctl)?;
        let refs = match reach.references(ctl.memory(), &vcpus, &[code, data]) {
            Ok(r) => r,
            Err(e) => vec![introspect::live::Reference {
                owner: introspect::live::Owner::Vcpu {
                    vcpu: 0,
                    task: None,
                },
                place: introspect::live::Place::Unknown(format!(
                    "cannot list the guest's tasks: {e}"
                )),
                value: 0,
            }],
        };
        if let Some(h) = Hold::from_refs(&refs, code, |o| reach.stack_of(ctl.memory(), &vcpus, o)) {
            self.patches[idx].info.held = Some(h.clone());
            return Ok(Check::Held(h));
        }
        // Nothing can reach the pages: clear the PTEs, restore the PMD if this was the last
        // patch, zero what the patch used.
        let mut arena = self
            .arena
            .clone()
            .ok_or_else(|| PatchError::NotLoaded(p.info.name.clone()))?;
        let mapping = arena
            .mapping
            .ok_or_else(|| PatchError::NotLoaded(p.info.name.clone()))?;
        let mut writes = Vec::new();
        let table_pa = arena.pages[mapping.table];
        for &(i, v) in &p.ptes {
            writes.push(Write {
                pa: table_pa + i as u64 * 8,
                expect: Some(v.to_le_bytes().to_vec()),
                old: vec![],
                new: vec![0; 8],
                what: format!("PTE {i}"),
            });
        }
        arena.free(p.code_run.0, p.code_run.1);
        arena.free(p.data_run.0, p.data_run.1);
        let last = arena.only_table_left();
        if last {
            writes.push(Write {
                pa: mapping.pmd_pa,
                expect: Some(mapping.pmd_new.to_le_bytes().to_vec()),
                old: vec![],
                new: mapping.pmd_old.to_le_bytes().to_vec(),
                what: "PMD entry".into(),
            });
        }
        // Its PTEs are cleared above, so when the last patch goes the table page is all-zero
        // again too.
        for ((s, n), len) in [(p.code_run, p.info.code.len), (p.data_run, p.info.data.len)] {
            for (k, i) in (s..s + n).enumerate() {
                let used = len.saturating_sub(k as u64 * PAGE).min(PAGE) as usize;
                writes.push(Write {
                    pa: arena.pages[i],
                    expect: None,
                    old: vec![],
                    new: vec![0; used],
                    what: format!("arena page {i}"),
                });
            }
        }
        apply(ctl, &mut writes)?;
        if last {
            arena.set_unmapped();
        }
        self.arena = Some(arena);
        self.patches.remove(idx);
        Ok(Check::Freed)
    }
}
