//! Engine operations of the consistency model (see [`crate::transition`]): loading, enabling
//! and disabling a patch as a transition, advancing it check by check, reversing and forcing
//! it. Every step runs inside one pause of every vCPU and writes through one transaction
//! ([`crate::txn::apply`]): verified bytes, rolled back on failure.

use std::time::{Duration, Instant};

use introspect::{PhysMemory, VcpuRegs};
use serde::{Deserialize, Serialize};

use crate::engine::{us, Engine, PatchError, Target};
use crate::guest::GuestControl;
use crate::info::{PatchInfo, PatchState};
use crate::patchobj::PatchObject;
use crate::plan::{plan_parsed, ConsistentPlan};
use crate::site;
use crate::transition::{
    now_ms, Blocker, KlpVars, Mode, Switcher, TaskState, TransFunc, Transition, VarWrite, Why,
    BOUNDARIES, KLP_IDLE,
};
use crate::txn::{apply, paused, read, Write};
use crate::view::{TaskSnap, TaskView};

/// `HVPATCH_IMMEDIATE` (hvpatch.h): per function, or for the whole patch.
pub const HVPATCH_IMMEDIATE: u64 = 1;

/// Options of a load under the consistency model.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Switch every task at once (as if the patch had `HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE)`).
    pub immediate: bool,
    /// Reverse the transition when it has not completed after this long.
    pub timeout: Option<Duration>,
    /// How tasks switch at the kernel-exit and idle boundaries.
    pub switcher: Switcher,
}

/// Options of an enable or disable.
#[derive(Debug, Clone, Copy, Default)]
pub struct SwitchOptions {
    /// Reverse the transition when it has not completed after this long.
    pub timeout: Option<Duration>,
    /// How tasks switch at the kernel-exit and idle boundaries.
    pub switcher: Switcher,
}

/// The transition as `patch status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionStatus {
    /// The patch in transition.
    pub patch: String,
    /// 1 patching, 0 unpatching (like /sys/kernel/livepatch/P/transition + enabled).
    pub target: i32,
    /// "patching" or "unpatching".
    pub direction: String,
    /// Whether it was reversed.
    pub reversed: bool,
    /// How tasks switch.
    pub mode: Mode,
    /// How tasks switch at the kernel-exit and idle boundaries (per-task mode).
    pub switcher: Switcher,
    /// Boundary breakpoint hits so far, and the tasks they switched
    /// ([`Switcher::Breakpoints`]).
    pub boundary_hits: (u64, u64),
    /// Time since it started, ms.
    pub elapsed_ms: u64,
    /// Checks made.
    pub checks: u64,
    /// vCPU pause time spent on it so far, µs.
    pub pause_us: u64,
    /// The tasks that held it at the last check.
    pub blocking: Vec<Blocker>,
    /// Every task's state at the last check (1 patched, 0 unpatched).
    pub tasks: Vec<TaskState>,
    /// Set when the guest's livepatch variables changed under the transition.
    pub interference: Option<String>,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// No transition runs (it completed now or earlier).
    Complete,
    /// It still waits for the tasks in [`Engine::transition_status`].
    Pending,
}

/// One site change of a transition start: the bytes there now, during the transition and
/// after it.
struct SiteSwitch {
    site: u64,
    pa: u64,
    now: [u8; 5],
    during: [u8; 5],
    after: [u8; 5],
}

fn vcpu_regs(ctl: &mut dyn GuestControl) -> Result<Vec<VcpuRegs>, PatchError> {
    (0..ctl.vcpu_count())
        .map(|v| ctl.regs(v).map_err(PatchError::from))
        .collect()
}

/// A guest-variable write as a verified transaction write (its current bytes expected).
fn var_write(view: &dyn TaskView, mem: &dyn PhysMemory, w: VarWrite) -> Result<Write, PatchError> {
    let pa = view
        .translate(mem, w.va)
        .ok_or_else(|| PatchError::Memory(format!("{} at {:#x} is not mapped", w.what, w.va)))?;
    let cur = read(mem, pa, w.bytes.len())?;
    Ok(Write {
        pa,
        expect: Some(cur),
        old: vec![],
        new: w.bytes,
        what: w.what,
    })
}

fn read_var(view: &dyn TaskView, mem: &dyn PhysMemory, va: u64, len: usize) -> Option<Vec<u8>> {
    let pa = view.translate(mem, va)?;
    let mut b = vec![0u8; len];
    mem.read_phys(pa, &mut b).ok()?;
    Some(b)
}

fn i32_of(b: &[u8]) -> i32 {
    i32::from_le_bytes(b.get(..4).and_then(|x| x.try_into().ok()).unwrap_or([0; 4]))
}

fn u64_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.get(..8).and_then(|x| x.try_into().ok()).unwrap_or([0; 8]))
}

fn site_write(s: &SiteSwitch, new: [u8; 5]) -> Write {
    Write {
        pa: s.pa,
        expect: Some(s.now.to_vec()),
        old: vec![],
        new: new.to_vec(),
        what: format!("entry site {:#x}", s.site),
    }
}

fn blocking_summary(b: &[Blocker]) -> String {
    if b.is_empty() {
        return "nothing".into();
    }
    let mut s: Vec<String> = b
        .iter()
        .take(5)
        .map(|b| format!("pid {} ({}): {}", b.pid, b.comm, b.why))
        .collect();
    if b.len() > 5 {
        s.push(format!("and {} more", b.len() - 5));
    }
    s.join("; ")
}

impl Engine {
    /// The transition in progress, for `patch status`.
    pub fn transition_status(&self) -> Option<TransitionStatus> {
        self.transition.as_ref().map(|t| TransitionStatus {
            patch: t.patch.clone(),
            target: t.target,
            direction: if t.target == 1 {
                "patching"
            } else {
                "unpatching"
            }
            .into(),
            reversed: t.reversed,
            mode: t.mode,
            switcher: t.switcher,
            boundary_hits: t.boundary_hits,
            elapsed_ms: now_ms().saturating_sub(t.started_ms),
            checks: t.checks,
            pause_us: t.pause_us,
            blocking: t.blocking.clone(),
            tasks: t.tasks.clone(),
            interference: t.interference.clone(),
        })
    }

    /// Whether a transition runs.
    pub fn in_transition(&self) -> bool {
        self.transition.is_some()
    }

    /// The error for a transition that did not complete in time and was reversed; `blocking`
    /// held it when it was reversed.
    pub fn timeout_error(
        name: &str,
        waited: Duration,
        was_target: i32,
        blocking: &[Blocker],
    ) -> PatchError {
        PatchError::TransitionTimeout {
            name: name.to_string(),
            target: if was_target == 1 {
                "patched"
            } else {
                "unpatched"
            }
            .into(),
            waited_ms: waited.as_millis() as u64,
            blocking: blocking_summary(blocking),
        }
    }

    /// Code of loaded patches built with frame pointers (the unwinder goes through it), up to
    /// their prologue trampolines (placed last): those run the original functions' code.
    fn fp_text(&self) -> Vec<(u64, u64)> {
        self.patches
            .iter()
            .filter(|p| p.info.frame_pointers)
            .map(|p| {
                let end = p.info.code.va + p.info.code.len;
                let tramps = p.info.functions.iter().filter_map(|f| f.tramp);
                (
                    p.info.code.va,
                    tramps.filter(|&t| t >= p.info.code.va).fold(end, u64::min),
                )
            })
            .collect()
    }

    /// Tells the unwinder about loaded patches' code: [`Engine::fp_text`], and the return
    /// addresses of calls moved into prologue trampolines, each standing for the return
    /// address in the original function (a task that called out of a trampoline is inside
    /// the old function). Only a direct `call rel32` is aliased (it keeps its 5 bytes when
    /// relocated); any other return address in a trampoline is not text: unreliable.
    fn set_unwind_text(&self, view: &dyn TaskView) {
        view.set_frame_pointer_text(&self.fp_text());
        let aliases: Vec<(u64, u64)> = self
            .patches
            .iter()
            .flat_map(|p| &p.info.functions)
            .filter(|f| f.tramp.is_some())
            .flat_map(|f| &f.moved)
            .filter(|m| m.bytes.len() == 5 && m.bytes[0] == 0xe8)
            .map(|m| (m.new_addr + 5, m.addr + 5))
            .collect();
        view.set_text_aliases(&aliases);
    }

    /// Loads a patch under the consistency model: the patch's functions switch task by task
    /// (see [`crate::transition`]), unless it is immediate (`HVPATCH_IMMEDIATE` or
    /// `opts.immediate`: then as [`Engine::load`]). Returns once the transition started — or
    /// completed, when no task was in the way at the first check; advance it with
    /// [`Engine::transition_step`].
    pub fn load_consistent(
        &mut self,
        ctl: &mut dyn GuestControl,
        t: &Target,
        view: &dyn TaskView,
        object: &[u8],
        file_name: &str,
        opts: LoadOptions,
    ) -> Result<PatchInfo, PatchError> {
        let obj = PatchObject::parse(object, file_name).map_err(Box::new)?;
        if let Some(waiting) = self.wait_for_modules(ctl, t, &obj)? {
            return Ok(waiting);
        }
        if opts.immediate || obj.flags & HVPATCH_IMMEDIATE != 0 {
            return self.load_viewed(ctl, t, Some(view), object, file_name);
        }
        if let Some(tr) = &self.transition {
            return Err(PatchError::InTransition(tr.patch.clone()));
        }
        let t0 = Instant::now();
        let mem = ctl.memory();
        let layout = view.task_state_layout(mem);
        let klp = KlpVars::find(view);
        let dummy_layout = view.klp_patch_layout(mem);
        let mode = match (layout, klp, dummy_layout) {
            (Some(_), Some(_), Some(_)) => Mode::PerTask,
            _ => Mode::WholeGuest,
        };
        let cp = match (mode, layout, dummy_layout) {
            (Mode::PerTask, Some(layout), Some((size, _, _))) => Some(ConsistentPlan {
                layout,
                dummy_size: size,
            }),
            _ => None,
        };
        let name = obj.name.clone();
        let mut plan = plan_parsed(self, ctl, t, obj, cp)?;
        let prepare = t0.elapsed();
        let mem = ctl.memory();
        let mut funcs = Vec::new();
        let mut switches = Vec::new();
        for (es, f) in plan.sites.iter().zip(&plan.functions) {
            // The original: after the ftrace site, or this load's trampoline (plan_parsed
            // refuses stacking on another patch's rewrite).
            let orig = f.original_entry().unwrap_or(es.site + 5);
            let (old_entry, prev) = self
                .sites
                .get(&es.site)
                .map_or((orig, None), |st| st.top(orig));
            let old_range = prev
                .or_else(|| f.old_size.map(|n| (f.old_addr, f.old_addr + n.max(1))))
                .or_else(|| view.function_range(f.old_addr))
                .unwrap_or((f.old_addr, f.old_addr + 1));
            let immediate = f.flags & HVPATCH_IMMEDIATE != 0;
            if mode == Mode::WholeGuest && !immediate && f.moved_inside().is_some() {
                // Its completion would write the jmp over the moved bytes unchecked.
                return Err(es.error(
                    "a prologue rewrite under the whole-guest model (no task_struct.patch_state) \
                     is not supported: load it with --immediate"
                        .into(),
                ));
            }
            let jmp = |to: u64| {
                site::jmp_bytes(es.site, to)
                    .ok_or_else(|| es.error(format!("{to:#x} is out of rel32 reach")))
            };
            let after = jmp(f.new_addr)?;
            let during = match (immediate, f.stub) {
                (false, Some(stub)) => jmp(stub)?,
                _ if mode == Mode::WholeGuest && !immediate => es.expect,
                _ => after,
            };
            switches.push(SiteSwitch {
                site: es.site,
                pa: es.site_pa,
                now: es.expect,
                during,
                after,
            });
            funcs.push(TransFunc {
                name: f.old_name.clone(),
                site: es.site,
                stub: f.stub.unwrap_or(0),
                old_range,
                new_range: (f.new_addr, f.new_addr + f.new_size.max(1)),
                old_entry,
                immediate,
            });
        }
        let mut tr = Transition {
            patch_id: 0,
            patch: name.clone(),
            target: 1,
            reversed: false,
            mode,
            funcs,
            klp: if mode == Mode::PerTask { klp } else { None },
            patch_state_off: layout.map_or(0, |l| l.patch_state),
            flags_off: view.flags_offset(mem),
            started_ms: now_ms(),
            timeout_ms: opts.timeout.map(|d| d.as_millis() as u64),
            checks: 0,
            blocking: vec![],
            pause_us: 0,
            dummy: plan.dummy_off.map(|o| plan.data_base + o),
            interference: None,
            tasks: vec![],
            switcher: opts.switcher,
            boundaries: boundaries(view, mode, opts.switcher, self.wants_module_hooks())?,
            boundary_hits: (0, 0),
            armed: false,
        };
        // The stand-in's guest-physical address, from the pages this load takes (their mapping
        // is written in the same pause).
        let dummy = match (dummy_layout, plan.dummy_off) {
            (Some(l), Some(off)) => {
                let page = plan.arena.pages[plan.data_run.0 + (off / crate::arena::PAGE) as usize];
                Some((l, plan.data_base + off, page + off % crate::arena::PAGE))
            }
            _ => None,
        };
        self.set_unwind_text(view);
        warm_stacks(view, ctl.memory());
        let paging = t.paging;
        let moved = moved_ranges(
            plan.prologues
                .iter()
                .map(|(n, p)| (n.as_str(), (p.site + 1, p.resume))),
        );
        let (done, pause) = paused(ctl, |ctl| {
            for &pa in &plan.low_mem_pages {
                plan.arena.verify_free(ctl.memory(), &paging, pa)?;
            }
            let pre = std::mem::take(&mut plan.writes);
            begin_paused(ctl, view, &mut tr, pre, &switches, dummy, &moved)
        })?;
        let info = self.commit(plan, t.paging, prepare, pause, t0, false);
        let p = self
            .patches
            .last()
            .ok_or_else(|| PatchError::Changed("lost the loaded patch".into()))?;
        tr.patch_id = p.id;
        let id = p.id;
        tr.pause_us = us(pause);
        tr.checks = 1;
        if !done {
            for s in &switches {
                if let Some(st) = self.sites.get_mut(&s.site) {
                    st.during = Some(s.during);
                }
            }
            tracing::info!(patch = %name, blocking = tr.blocking.len(), "transition started");
            self.transition = Some(tr);
        } else {
            self.summarize(&tr, false);
            tracing::info!(patch = %name, pause_us = us(pause), "patch loaded, every task switched at once");
        }
        let info = self
            .patches
            .iter()
            .find(|p| p.id == id)
            .map_or(info, |p| p.info.clone());
        Ok(self.with_active(&info))
    }

    /// Enables a disabled patch (a transition to patched, or at once if it is immediate).
    pub fn enable(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
        name: &str,
        opts: SwitchOptions,
    ) -> Result<(), PatchError> {
        self.switch_or_reverse(ctl, view, name, 1, opts)
    }

    /// Disables an enabled patch: a transition to unpatched (at once if it is immediate). The
    /// patch stays loaded ([`PatchState::Disabled`]) until unloaded.
    pub fn disable(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
        name: &str,
        opts: SwitchOptions,
    ) -> Result<(), PatchError> {
        self.switch_or_reverse(ctl, view, name, 0, opts)
    }

    /// [`Engine::enable`] (`target` 1) / [`Engine::disable`] (0): asking a patch in transition
    /// for the other direction reverses it; for its own direction it is already under way.
    fn switch_or_reverse(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
        name: &str,
        target: i32,
        opts: SwitchOptions,
    ) -> Result<(), PatchError> {
        match &self.transition {
            Some(tr) if tr.patch == name && tr.target != target => self.reverse(ctl, view),
            Some(tr) if tr.patch == name => Ok(()),
            _ => self.switch(ctl, view, name, target, opts),
        }
    }

    /// Starts the transition of patch `name` to `target`.
    fn switch(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
        name: &str,
        target: i32,
        opts: SwitchOptions,
    ) -> Result<(), PatchError> {
        let timeout = opts.timeout;
        if let Some(tr) = &self.transition {
            return Err(PatchError::InTransition(tr.patch.clone()));
        }
        let idx = self
            .patches
            .iter()
            .position(|p| {
                p.info.name == name
                    && matches!(p.info.state, PatchState::Enabled | PatchState::Disabled)
            })
            .ok_or_else(|| PatchError::NotLoaded(name.to_string()))?;
        let want = if target == 1 {
            PatchState::Disabled
        } else {
            PatchState::Enabled
        };
        if self.patches[idx].info.state != want {
            return Err(PatchError::State(format!(
                "{name} is {:?}; {} needs it {want:?}",
                self.patches[idx].info.state,
                if target == 1 { "enable" } else { "disable" }
            )));
        }
        let info = self.patches[idx].info.clone();
        let id = self.patches[idx].id;
        let mem = ctl.memory();
        let layout = view.task_state_layout(mem);
        let klp = KlpVars::find(view);
        let has_stubs = info.functions.iter().all(|f| f.stub.is_some());
        let mode = if !info.immediate && has_stubs && layout.is_some() && klp.is_some() {
            Mode::PerTask
        } else {
            Mode::WholeGuest
        };
        if target == 1 {
            // Module functions: still the same module at the same place (a module unloaded
            // and loaded again has its text elsewhere, or other code at the old address).
            for f in info.functions.iter() {
                let Some(o) = &f.object else { continue };
                let kept_pa = self.sites.get(&f.site).map(|st| st.site_pa);
                let moved = kept_pa.is_some_and(|pa| view.translate(mem, f.site) != Some(pa));
                match view.module_function(mem, o, &f.old_name, f.sympos) {
                    Ok(a) if a == f.old_addr && !moved => {}
                    Ok(a) => {
                        return Err(PatchError::Module {
                            patch: name.to_string(),
                            module: o.clone(),
                            what: format!(
                                "was unloaded and loaded again since the patch was loaded ({} \
                                 is at {a:#x} now{}, was {:#x}): unload the patch and load it \
                                 again",
                                f.old_name,
                                if moved { " in other pages" } else { "" },
                                f.old_addr
                            ),
                        })
                    }
                    Err(e) => {
                        return Err(PatchError::Module {
                            patch: name.to_string(),
                            module: o.clone(),
                            what: format!("cannot be patched again: {e}"),
                        })
                    }
                }
            }
            // A function whose stack went empty meanwhile starts a new one (its site holds
            // the ftrace NOP again; `begin_paused` verifies the bytes).
            for f in &info.functions {
                if let std::collections::btree_map::Entry::Vacant(v) = self.sites.entry(f.site) {
                    let site_pa = view.translate(mem, f.site).ok_or_else(|| {
                        PatchError::Memory(format!("site {:#x} is not mapped", f.site))
                    })?;
                    v.insert(crate::func_stack::SiteStack {
                        func: f.old_name.clone(),
                        site_pa,
                        original: f.unpatched(),
                        entries: vec![],
                        during: None,
                    });
                }
            }
        }
        // What runs now and what will run, per function.
        let mut funcs = Vec::new();
        let mut switches = Vec::new();
        let mut stub_writes = Vec::new();
        let mut gone = Vec::new();
        for f in &info.functions {
            let st = self.sites.get(&f.site).ok_or_else(|| {
                PatchError::Changed(format!("no function stack for {}", f.old_name))
            })?;
            let top_is_us = st.entries.last().is_some_and(|e| e.patch == name);
            if target == 0 && f.object.is_some() && self.module_site_gone(mem, f.site, st) {
                // Its module was removed: nothing to restore there (the memory is not the
                // module's any more); only leave its stack at the end.
                tracing::warn!(func = %f.old_name, site = %format!("{:#x}", f.site),
                    "module text gone: entry site forgotten, not written");
                gone.push(f.site);
                continue;
            }
            if target == 0 && !top_is_us {
                // A newer patch runs this function: nothing changes for it; only leave its
                // stack at the end.
                gone.push(f.site);
                continue;
            }
            let now = st.current_bytes(f.site);
            let immediate = info.immediate || f.flags & HVPATCH_IMMEDIATE != 0;
            if mode == Mode::WholeGuest && !immediate && f.moved_inside().is_some() {
                return Err(PatchError::Changed(format!(
                    "{}: a prologue rewrite under the whole-guest model (no \
                     task_struct.patch_state) is not supported",
                    f.old_name
                )));
            }
            // The original: after the ftrace site, or this patch's trampoline.
            let orig = match f.original_entry() {
                Some(o) => o,
                None if immediate => f.site + 5,
                None => {
                    return Err(PatchError::Changed(format!(
                        "{}: its prologue was rewritten by another patch; no original to \
                         dispatch to",
                        f.old_name
                    )))
                }
            };
            let (old_entry, prev) = if target == 1 {
                st.top(orig)
            } else {
                st.below_top(orig)
            };
            let old_range = prev
                .or_else(|| f.old_size.map(|n| (f.old_addr, f.old_addr + n.max(1))))
                .or_else(|| view.function_range(f.old_addr))
                .unwrap_or((f.old_addr, f.old_addr + 1));
            let old_bytes = if target == 1 {
                now
            } else {
                st.below_bytes(f.site)
            };
            let new_bytes = site::jmp_bytes(f.site, f.new_addr)
                .ok_or_else(|| PatchError::Changed(format!("{} out of reach", f.old_name)))?;
            let after = if target == 1 { new_bytes } else { old_bytes };
            let during = match (mode, immediate, f.stub) {
                (_, true, _) => after,
                (Mode::PerTask, false, Some(stub)) => {
                    // The stub's old target is the version under this patch now.
                    if let Some(l) = layout {
                        let b = crate::dispatch::stub(l, stub, old_entry, f.new_addr)
                            .map_err(|e| PatchError::Changed(e.to_string()))?;
                        let pa = view.translate(mem, stub).ok_or_else(|| {
                            PatchError::Memory(format!("stub {stub:#x} is not mapped"))
                        })?;
                        let cur = read(mem, pa, b.len())?;
                        if cur != b {
                            stub_writes.push(Write {
                                pa,
                                expect: Some(cur),
                                old: vec![],
                                new: b,
                                what: format!("dispatcher stub of {}", f.old_name),
                            });
                        }
                    }
                    site::jmp_bytes(f.site, stub)
                        .ok_or_else(|| PatchError::Changed("stub out of reach".into()))?
                }
                _ => now,
            };
            switches.push(SiteSwitch {
                site: f.site,
                pa: st.site_pa,
                now,
                during,
                after,
            });
            funcs.push(TransFunc {
                name: f.old_name.clone(),
                site: f.site,
                stub: f.stub.unwrap_or(0),
                old_range,
                new_range: (f.new_addr, f.new_addr + f.new_size.max(1)),
                old_entry,
                immediate,
            });
        }
        let dummy_layout = view.klp_patch_layout(mem);
        let dummy_va = dummy_layout.and_then(|_| {
            // The room after the data, as planned at load.
            let used = info.data.len.checked_sub(dummy_layout.map_or(0, |d| d.0))?;
            Some(info.data.va + used)
        });
        let mut tr = Transition {
            patch_id: id,
            patch: name.to_string(),
            target,
            reversed: false,
            mode,
            funcs,
            klp: if mode == Mode::PerTask { klp } else { None },
            patch_state_off: layout.map_or(0, |l| l.patch_state),
            flags_off: view.flags_offset(mem),
            started_ms: now_ms(),
            timeout_ms: timeout.map(|d| d.as_millis() as u64),
            checks: 0,
            blocking: vec![],
            pause_us: 0,
            dummy: if mode == Mode::PerTask {
                dummy_va
            } else {
                None
            },
            interference: None,
            tasks: vec![],
            switcher: opts.switcher,
            boundaries: boundaries(view, mode, opts.switcher, self.wants_module_hooks())?,
            boundary_hits: (0, 0),
            armed: false,
        };
        let dummy = match (dummy_layout, tr.dummy) {
            (Some(l), Some(va)) => {
                let off = va - info.data.va;
                info.data
                    .pages
                    .get((off / crate::arena::PAGE) as usize)
                    .map(|p| (l, va, p + off % crate::arena::PAGE))
            }
            _ => None,
        };
        self.set_unwind_text(view);
        warm_stacks(view, ctl.memory());
        // Enabling puts the patch back on top of its functions' stacks first.
        if target == 1 {
            for f in &info.functions {
                if let Some(st) = self.sites.get_mut(&f.site) {
                    st.entries.push(crate::func_stack::StackEntry {
                        patch: name.to_string(),
                        new_addr: f.new_addr,
                        new_size: f.new_size,
                    });
                }
            }
        }
        // A jmp written over a prologue rewrite's original bytes: nothing may be inside them.
        let moved = moved_ranges(info.functions.iter().filter_map(|f| {
            let inside = f.moved_inside()?;
            let over = |s: &SiteSwitch| s.site == f.site && s.now == f.unpatched();
            (target == 1 && switches.iter().any(over)).then_some((f.old_name.as_str(), inside))
        }));
        let r = paused(ctl, |ctl| {
            begin_paused(ctl, view, &mut tr, stub_writes, &switches, dummy, &moved)
        });
        let (done, pause) = match r {
            Ok(v) => v,
            Err(e) => {
                if target == 1 {
                    self.pop_entries(name, &info);
                }
                return Err(e);
            }
        };
        tr.pause_us = us(pause);
        tr.checks = 1;
        self.last.pause = pause;
        for s in &gone {
            if let Some(st) = self.sites.get_mut(s) {
                st.entries.retain(|e| e.patch != name);
            }
        }
        if done {
            self.finish_bookkeeping(id, name, target, &info);
            self.summarize(&tr, false);
        } else {
            for s in &switches {
                if let Some(st) = self.sites.get_mut(&s.site) {
                    st.during = Some(s.during);
                }
            }
            if target == 1 {
                if let Some(p) = self.patches.iter_mut().find(|p| p.id == id) {
                    p.info.state = PatchState::Enabled;
                }
            }
            self.transition = Some(tr);
        }
        Ok(())
    }

    /// Records how the transition `tr`, now ended, went.
    fn summarize(&mut self, tr: &Transition, forced: bool) {
        if let Some(p) = self.patches.iter_mut().find(|p| p.id == tr.patch_id) {
            p.info.last_transition = Some(tr.summary(forced));
        }
    }

    fn pop_entries(&mut self, name: &str, info: &PatchInfo) {
        for f in &info.functions {
            if let Some(st) = self.sites.get_mut(&f.site) {
                if st.entries.last().is_some_and(|e| e.patch == name) {
                    st.entries.pop();
                }
            }
        }
    }

    /// The engine's records once a patch reached `target` everywhere.
    fn finish_bookkeeping(&mut self, id: u64, name: &str, target: i32, info: &PatchInfo) {
        for f in &info.functions {
            if let Some(st) = self.sites.get_mut(&f.site) {
                st.during = None;
                if target == 0 {
                    st.entries.retain(|e| e.patch != name);
                }
            }
        }
        if let Some(p) = self.patches.iter_mut().find(|p| p.id == id) {
            p.info.state = if target == 1 {
                PatchState::Enabled
            } else {
                PatchState::Disabled
            };
        }
        // A disabled patch keeps its functions' stacks (with their original bytes) for a
        // later enable.
        let keep: std::collections::HashSet<u64> = self
            .patches
            .iter()
            .filter(|p| p.info.state == PatchState::Disabled)
            .flat_map(|p| p.info.functions.iter().map(|f| f.site))
            .collect();
        self.sites.retain(|site, st| {
            !st.entries.is_empty() || st.during.is_some() || keep.contains(site)
        });
    }

    /// One check of the transition in progress, in one pause: tasks that may switch now do; when
    /// none is left the transition completes. Reverses it first when its timeout passed.
    pub fn transition_step(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
    ) -> Result<StepOutcome, PatchError> {
        let Some(mut tr) = self.transition.take() else {
            return Ok(StepOutcome::Complete);
        };
        self.set_unwind_text(view);
        let sites = self.sites.clone();
        let r = paused(ctl, |ctl| step_paused(ctl, view, &mut tr, &sites));
        match r {
            Ok((done, pause)) => {
                tr.pause_us += us(pause);
                tr.checks += 1;
                if done {
                    // The whole transition's pause time, for `last_timing`.
                    self.last.pause = Duration::from_micros(tr.pause_us);
                    let info = self
                        .patches
                        .iter()
                        .find(|p| p.id == tr.patch_id)
                        .map(|p| p.info.clone());
                    if let Some(info) = info {
                        self.finish_bookkeeping(tr.patch_id, &tr.patch, tr.target, &info);
                    }
                    self.summarize(&tr, false);
                    tracing::info!(patch = %tr.patch, target = tr.target, checks = tr.checks, "transition complete");
                    Ok(StepOutcome::Complete)
                } else {
                    self.transition = Some(tr);
                    Ok(StepOutcome::Pending)
                }
            }
            Err(e) => {
                self.transition = Some(tr);
                Err(e)
            }
        }
    }

    /// Reverses the transition in progress: every task converges back to the state it started
    /// from (klp_reverse_transition). Tasks that never switched are already there.
    pub fn reverse(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
    ) -> Result<(), PatchError> {
        let Some(mut tr) = self.transition.take() else {
            return Err(PatchError::State("no transition is in progress".into()));
        };
        let sites = self.sites.clone();
        let r = paused(ctl, |ctl| reverse_paused(ctl, view, &mut tr, &sites));
        match r {
            Ok((during, pause)) => {
                tr.pause_us += us(pause);
                for (site, b) in during {
                    if let Some(st) = self.sites.get_mut(&site) {
                        st.during = Some(b);
                    }
                }
                tracing::info!(patch = %tr.patch, target = tr.target, "transition reversed");
                self.transition = Some(tr);
                Ok(())
            }
            Err(e) => {
                self.transition = Some(tr);
                Err(e)
            }
        }
    }

    /// Completes the transition in progress at once, switching every task without checks
    /// (`patch force`, like klp's `force`). Returns the tasks it overrode.
    pub fn force(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
    ) -> Result<Vec<Blocker>, PatchError> {
        let Some(tr) = self.transition.take() else {
            return Err(PatchError::State("no transition is in progress".into()));
        };
        let sites = self.sites.clone();
        let r = paused(ctl, |ctl| {
            let regs = vcpu_regs(ctl)?;
            let mem = ctl.memory();
            let tasks = view.tasks(mem, &regs).map_err(PatchError::Memory)?;
            let (_, blocking) = tr.classify(view, mem, &regs, &tasks);
            complete_paused(ctl, view, &tr, &tasks, &sites)?;
            Ok(blocking)
        });
        match r {
            Ok((overridden, _)) => {
                let info = self
                    .patches
                    .iter()
                    .find(|p| p.id == tr.patch_id)
                    .map(|p| p.info.clone());
                if let Some(info) = info {
                    self.finish_bookkeeping(tr.patch_id, &tr.patch, tr.target, &info);
                }
                self.summarize(&tr, true);
                tracing::warn!(patch = %tr.patch, overridden = overridden.len(), "transition forced");
                Ok(overridden)
            }
            Err(e) => {
                self.transition = Some(tr);
                Err(e)
            }
        }
    }

    /// Whether the transition in progress switches tasks at boundary breakpoints, so the host
    /// must hand its breakpoint hits to [`Engine::boundary_hit`].
    pub fn wants_boundary_hits(&self) -> bool {
        self.transition
            .as_ref()
            .is_some_and(|t| t.uses_breakpoints())
    }

    /// The boundary breakpoints armed for the transition in progress (empty unless it uses
    /// [`Switcher::Breakpoints`]).
    pub fn boundaries(&self) -> Vec<u64> {
        self.transition
            .as_ref()
            .filter(|t| t.uses_breakpoints())
            .map(|t| t.boundaries.clone())
            .unwrap_or_default()
    }

    /// Counts vCPU pause time that the host spent on the transition outside the engine (a
    /// boundary breakpoint hit, from the VM exit to the resume).
    pub fn add_transition_pause(&mut self, d: Duration) {
        if let Some(t) = &mut self.transition {
            t.pause_us += us(d);
        }
    }

    /// A vCPU of the paused guest stopped at a boundary breakpoint ([`Switcher::Breakpoints`]):
    /// its current task is at the syscall/IRQ exit to user space or in the idle loop, and
    /// switches to the target state unless its stack still holds a function the transition
    /// changes (the boundary functions themselves may be patched). Returns whether the task
    /// switched, and whether the transition should be checked now (no task that held it at the
    /// last check is left). The caller resumes the guest.
    pub fn boundary_hit(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
        vcpu: usize,
    ) -> Result<(bool, bool), PatchError> {
        if self.transition.is_some() {
            self.set_unwind_text(view);
        }
        let Some(tr) = self.transition.as_mut() else {
            return Ok((false, false));
        };
        if !tr.uses_breakpoints() || !ctl.is_paused() {
            return Ok((false, false));
        }
        tr.boundary_hits.0 += 1;
        let regs = vcpu_regs(ctl)?;
        let mem = ctl.memory();
        let t = view.current(mem, &regs, vcpu).map_err(PatchError::Memory)?;
        if t.patch_state == tr.target || t.patch_state == KLP_IDLE {
            // Switched already, or a task that has no state in this transition (created by
            // nobody we know of): the checks handle it.
            return Ok((false, false));
        }
        if tr.judge(&view.stack_frames(mem, &regs, &t)).is_err() {
            return Ok((false, false));
        }
        let mut writes = Vec::new();
        for w in tr.task_writes(&t, tr.target, false) {
            writes.push(var_write(view, mem, w)?);
        }
        apply(ctl, &mut writes)?;
        tr.boundary_hits.1 += 1;
        if t.pid == 0 {
            // Idle tasks all have pid 0: the next check shows which one switched.
            return Ok((true, false));
        }
        for s in tr.tasks.iter_mut().filter(|s| s.pid == t.pid) {
            s.patch_state = tr.target;
        }
        tr.blocking.retain(|b| b.pid != t.pid);
        Ok((true, tr.blocking.is_empty()))
    }

    /// Advances the transition until it completes; after `timeout` reverses it and waits for
    /// the reversal (as long again), then fails with [`PatchError::TransitionTimeout`].
    pub fn transition_wait(
        &mut self,
        ctl: &mut dyn GuestControl,
        view: &dyn TaskView,
        timeout: Duration,
    ) -> Result<(), PatchError> {
        if self.wants_boundary_hits() {
            // Nothing here takes the breakpoint hits, and a hit keeps the guest stopped.
            return Err(PatchError::State(
                "transition_wait cannot serve boundary breakpoints; use the guest-hooks switcher or a host that serves the hits".into(),
            ));
        }
        let t0 = Instant::now();
        let mut delay = Duration::from_millis(1);
        let mut reversed_from: Option<(String, i32, Vec<Blocker>)> = None;
        loop {
            let s0 = Instant::now();
            if self.transition_step(ctl, view)? == StepOutcome::Complete {
                return match reversed_from {
                    None => Ok(()),
                    Some((name, target, b)) => {
                        Err(Self::timeout_error(&name, t0.elapsed(), target, &b))
                    }
                };
            }
            if t0.elapsed() >= timeout && reversed_from.is_none() {
                if let Some(tr) = &self.transition {
                    reversed_from = Some((tr.patch.clone(), tr.target, tr.blocking.clone()));
                }
                self.reverse(ctl, view)?;
            } else if t0.elapsed() >= timeout * 2 {
                let (name, target, b) = reversed_from.unwrap_or_default();
                return Err(Self::timeout_error(&name, t0.elapsed(), target, &b));
            }
            // The guest runs at least ten times as long as the check took.
            std::thread::sleep(delay.max(s0.elapsed() * 10));
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }
}

/// The boundary breakpoint addresses of a transition (none unless per-task with
/// [`Switcher::Breakpoints`]).
fn boundaries(
    view: &dyn TaskView,
    mode: Mode,
    switcher: Switcher,
    module_hooks: bool,
) -> Result<Vec<u64>, PatchError> {
    if mode != Mode::PerTask || switcher != Switcher::Breakpoints {
        return Ok(vec![]);
    }
    if module_hooks {
        return Err(PatchError::State(
            "the breakpoints switcher needs 3 of the 4 debug registers, and 2 watch module loads \
             and removals for patches of modules (waiting for load, or applied at a load); use \
             the guest-hooks switcher, or unload those patches first"
                .into(),
        ));
    }
    BOUNDARIES
        .iter()
        .map(|name| {
            view.symbol(name).ok_or_else(|| {
                PatchError::State(format!(
                    "boundary breakpoints need the guest's {name}, which its kallsyms lacks; use the guest-hooks mechanism"
                ))
            })
        })
        .collect()
}

/// Unwinds every switched-out task once while the guest still runs, so that the first check,
/// inside the pause, reuses the unwinds of the tasks that have not run since (the kernel view
/// keeps an unwind while the task's stack is unchanged): most of a guest sleeps.
fn warm_stacks(view: &dyn TaskView, mem: &dyn PhysMemory) {
    if let Ok(tasks) = view.tasks(mem, &[]) {
        for t in tasks.iter().filter(|t| !t.user_mode) {
            let _ = view.stack_frames(mem, &[], t);
        }
    }
}

/// Arms the boundary breakpoints of a transition that uses them, on every vCPU.
fn arm(ctl: &mut dyn GuestControl, tr: &mut Transition) -> Result<(), PatchError> {
    if tr.uses_breakpoints() && !tr.armed {
        ctl.set_breakpoints(&tr.boundaries)?;
        tr.armed = true;
    }
    Ok(())
}

/// Removes them (at the end of the transition).
fn disarm(ctl: &mut dyn GuestControl, tr: &Transition) {
    if tr.uses_breakpoints() {
        if let Err(e) = ctl.set_breakpoints(&[]) {
            tracing::warn!("removing the boundary breakpoints: {e}");
        }
    }
}

/// Refuses to start while the guest's own livepatch is busy or not idle.
fn check_guest_klp(
    view: &dyn TaskView,
    mem: &dyn PhysMemory,
    klp: &KlpVars,
    tasks: &[TaskSnap],
) -> Result<(), PatchError> {
    let rd = |va: u64, n: usize, what: &str| {
        read_var(view, mem, va, n)
            .ok_or_else(|| PatchError::Memory(format!("cannot read the guest's {what}")))
    };
    let tp = u64_of(&rd(klp.transition_patch, 8, "klp_transition_patch")?);
    if tp != 0 {
        return Err(PatchError::GuestKlp(format!(
            "a livepatch transition is in progress in the guest (klp_transition_patch = {tp:#x})"
        )));
    }
    let ts = i32_of(&rd(klp.target_state, 4, "klp_target_state")?);
    if ts != KLP_IDLE {
        return Err(PatchError::GuestKlp(format!(
            "klp_target_state is {ts}, not -1"
        )));
    }
    if let Some(m) = klp.mutex {
        let owner = u64_of(&rd(m, 8, "klp_mutex")?);
        if owner != 0 {
            return Err(PatchError::GuestKlp(format!(
                "klp_mutex is held (owner {owner:#x}): the guest is enabling or disabling a livepatch; retry"
            )));
        }
    }
    if let Some(t) = tasks.iter().find(|t| t.patch_state != KLP_IDLE) {
        return Err(PatchError::GuestKlp(format!(
            "pid {} ({}) has patch_state {}, not -1",
            t.pid, t.comm, t.patch_state
        )));
    }
    Ok(())
}

/// The stand-in `struct klp_patch`: zeroed, its `list` and `obj_list` empty (self-linked).
fn dummy_bytes(layout: (u64, u64, u64), va: u64) -> Vec<u8> {
    let (size, list, obj_list) = layout;
    let mut b = vec![0u8; size as usize];
    for off in [list, obj_list] {
        let me = (va + off).to_le_bytes();
        let o = off as usize;
        if o + 16 <= b.len() {
            b[o..o + 8].copy_from_slice(&me);
            b[o + 8..o + 16].copy_from_slice(&me);
        }
    }
    b
}

/// The insides of the moved bytes of prologue rewrites a step writes a `jmp` over, with the
/// functions' names (see [`check_moved`]).
struct MovedRanges {
    ranges: Vec<(u64, u64)>,
    names: String,
}

fn moved_ranges<'a>(it: impl Iterator<Item = (&'a str, (u64, u64))>) -> MovedRanges {
    let (mut ranges, mut names) = (Vec::new(), Vec::new());
    for (n, r) in it {
        names.push(format!("{n} {:#x}..{:#x}", r.0 - 1, r.1));
        ranges.push(r);
    }
    MovedRanges {
        ranges,
        names: names.join(", "),
    }
}

/// With every vCPU paused: refuses ([`PatchError::Busy`]) when a register or live stack slot
/// points strictly inside bytes a prologue rewrite moves (a context resuming there would land
/// inside the `jmp`), as [`Engine::load_viewed`] does.
fn check_moved(
    view: &dyn TaskView,
    mem: &dyn introspect::PhysMemory,
    regs: &[introspect::VcpuRegs],
    moved: &MovedRanges,
) -> Result<(), PatchError> {
    if moved.ranges.is_empty() {
        return Ok(());
    }
    let refs = view
        .live_references(mem, regs, &moved.ranges)
        .unwrap_or_else(|| Err("the kernel view cannot list live contexts".into()))
        .map_err(|e| PatchError::Busy(format!("checking the moved bytes: {e}")))?;
    match refs.first() {
        Some(r) => Err(PatchError::Busy(format!(
            "{r} points inside the bytes a prologue rewrite moves ({}); retry",
            moved.names
        ))),
        None => Ok(()),
    }
}

/// The first check of a transition, in the pause that starts it: when no task is in the way
/// every site switches at once (returns `true`); else the tasks that may switch do, the others
/// get the initial state and `TIF_PATCH_PENDING`, and the sites go to the dispatcher.
fn begin_paused(
    ctl: &mut dyn GuestControl,
    view: &dyn TaskView,
    tr: &mut Transition,
    pre: Vec<Write>,
    switches: &[SiteSwitch],
    dummy: Option<((u64, u64, u64), u64, u64)>,
    moved: &MovedRanges,
) -> Result<bool, PatchError> {
    let t0 = Instant::now();
    let regs = vcpu_regs(ctl)?;
    let t_regs = t0.elapsed();
    let mem = ctl.memory();
    check_moved(view, mem, &regs, moved)?;
    let tasks = view.tasks(mem, &regs).map_err(PatchError::Memory)?;
    let t_tasks = t0.elapsed();
    if let Some(k) = &tr.klp {
        check_guest_klp(view, mem, k, &tasks)?;
    }
    let (ok, blocking) = tr.classify(view, mem, &regs, &tasks);
    let t_check = t0.elapsed();
    let mut writes = pre;
    if blocking.is_empty() {
        writes.extend(switches.iter().map(|s| site_write(s, s.after)));
        apply(ctl, &mut writes)?;
        tracing::debug!(
            regs_us = us(t_regs),
            tasks_us = us(t_tasks - t_regs),
            checks_us = us(t_check - t_tasks),
            writes_us = us(t0.elapsed() - t_check),
            tasks = tasks.len(),
            "first check"
        );
        return Ok(true);
    }
    if tr.mode == Mode::PerTask {
        let safe: std::collections::HashSet<u64> = ok.iter().map(|t| t.addr).collect();
        let initial = 1 - tr.target;
        for t in &tasks {
            let s = safe.contains(&t.addr);
            for w in tr.task_writes(t, if s { tr.target } else { initial }, !s) {
                writes.push(var_write(view, mem, w)?);
            }
        }
        if let Some(w) = tr.target_write(tr.target) {
            writes.push(var_write(view, mem, w)?);
        }
        if let (Some(k), Some((layout, va, pa))) = (tr.klp, dummy) {
            writes.push(Write {
                pa,
                expect: None,
                old: vec![],
                new: dummy_bytes(layout, va),
                what: "klp_patch stand-in".into(),
            });
            writes.push(var_write(
                view,
                mem,
                VarWrite {
                    va: k.transition_patch,
                    bytes: va.to_le_bytes().to_vec(),
                    what: "klp_transition_patch".into(),
                },
            )?);
        }
        // The states as just written.
        tr.tasks = Transition::states(&tasks);
        for (s, t) in tr.tasks.iter_mut().zip(&tasks) {
            s.patch_state = if safe.contains(&t.addr) {
                tr.target
            } else {
                initial
            };
        }
    }
    writes.extend(switches.iter().map(|s| site_write(s, s.during)));
    arm(ctl, tr)?;
    if let Err(e) = apply(ctl, &mut writes) {
        disarm(ctl, tr);
        tr.armed = false;
        return Err(e);
    }
    tr.blocking = blocking;
    Ok(false)
}

/// A check of a running transition (see [`Engine::transition_step`]); `true` when it completed.
fn step_paused(
    ctl: &mut dyn GuestControl,
    view: &dyn TaskView,
    tr: &mut Transition,
    sites: &std::collections::BTreeMap<u64, crate::func_stack::SiteStack>,
) -> Result<bool, PatchError> {
    // A restarted hvpatch arms the boundary breakpoints again.
    arm(ctl, tr)?;
    let regs = vcpu_regs(ctl)?;
    let mem = ctl.memory();
    let tasks = view.tasks(mem, &regs).map_err(PatchError::Memory)?;
    if let (Some(k), Some(dummy)) = (tr.klp, tr.dummy) {
        let tp = read_var(view, mem, k.transition_patch, 8).map(|b| u64_of(&b));
        let ts = read_var(view, mem, k.target_state, 4).map(|b| i32_of(&b));
        if tp != Some(dummy) || ts != Some(tr.guest_target_state()) {
            let msg = format!(
                "the guest's livepatch changed its state during the transition: klp_transition_patch {tp:x?} (ours {dummy:#x}), klp_target_state {ts:?} (ours {})",
                tr.guest_target_state()
            );
            if tr.interference.is_none() {
                tracing::warn!("{msg}");
            }
            tr.interference = Some(msg);
        }
    }
    let (ok, mut blocking) = tr.classify(view, mem, &regs, &tasks);
    if blocking.is_empty() && tr.mode == Mode::PerTask {
        // klp_synchronize_transition's job: no vCPU may be inside klp_update_patch_state,
        // which could still store the target it read after the states are reset.
        for t in tasks.iter().filter(|t| t.vcpu.is_some() && !t.user_mode) {
            if !tr.in_klp_update(&view.stack_frames(mem, &regs, t)) {
                continue;
            }
            let st = view.stack(mem, &regs, t);
            if tr.in_klp_update(&st) {
                blocking.push(Blocker {
                    pid: t.pid,
                    comm: t.comm.clone(),
                    vcpu: t.vcpu,
                    why: Why::InKlpUpdate,
                    stack: st.rendered,
                });
            }
        }
    }
    if blocking.is_empty() {
        complete_paused(ctl, view, tr, &tasks, sites)?;
        tr.blocking.clear();
        return Ok(true);
    }
    let mut writes = Vec::new();
    if tr.mode == Mode::PerTask {
        for t in &ok {
            for w in tr.task_writes(t, tr.target, false) {
                writes.push(var_write(view, mem, w)?);
            }
        }
    }
    apply(ctl, &mut writes)?;
    let safe: std::collections::HashSet<u64> = ok.iter().map(|t| t.addr).collect();
    tr.tasks = tasks
        .iter()
        .map(|t| TaskState {
            pid: t.pid,
            comm: t.comm.clone(),
            patch_state: if safe.contains(&t.addr) && tr.mode == Mode::PerTask {
                tr.target
            } else {
                t.patch_state
            },
        })
        .collect();
    tr.blocking = blocking;
    Ok(false)
}

/// Whether the entry site at `site` lies in a module's text that is gone (unmapped, or mapped
/// elsewhere, or loaded again with the unpatched bytes where our jump was): a module removed
/// during the transition. Its site is then not written (the unload forgets it).
fn module_site_gone(
    view: &dyn TaskView,
    mem: &dyn PhysMemory,
    site: u64,
    st: &crate::func_stack::SiteStack,
) -> bool {
    if site < crate::arena::KERNEL_MAP_END {
        return false;
    }
    let mut cur = [0u8; 5];
    view.translate(mem, site) != Some(st.site_pa)
        || (mem.read_phys(st.site_pa, &mut cur).is_ok()
            && cur == st.original
            && cur != st.current_bytes(site))
}

/// Completes a transition: the sites jump straight to the target version, and the guest's
/// livepatch fields go back to idle (klp_complete_transition).
fn complete_paused(
    ctl: &mut dyn GuestControl,
    view: &dyn TaskView,
    tr: &Transition,
    tasks: &[TaskSnap],
    sites: &std::collections::BTreeMap<u64, crate::func_stack::SiteStack>,
) -> Result<(), PatchError> {
    let mem = ctl.memory();
    let mut writes = Vec::new();
    for f in &tr.funcs {
        let Some(st) = sites.get(&f.site) else {
            continue;
        };
        if module_site_gone(view, mem, f.site, st) {
            // Its module went during the transition: nothing to write in freed memory.
            continue;
        }
        let now = st.current_bytes(f.site);
        let after = if tr.target == 1 {
            site::jmp_bytes(f.site, f.new_range.0).unwrap_or(now)
        } else {
            st.below_bytes(f.site)
        };
        if after != now {
            writes.push(Write {
                pa: st.site_pa,
                expect: Some(now.to_vec()),
                old: vec![],
                new: after.to_vec(),
                what: format!("entry site of {} ({:#x})", f.name, f.site),
            });
        }
    }
    if tr.mode == Mode::PerTask {
        for t in tasks {
            for w in tr.task_writes(t, KLP_IDLE, false) {
                writes.push(var_write(view, mem, w)?);
            }
        }
        if let Some(w) = tr.target_write(KLP_IDLE) {
            writes.push(var_write(view, mem, w)?);
        }
        if let (Some(k), Some(dummy)) = (tr.klp, tr.dummy) {
            if read_var(view, mem, k.transition_patch, 8).map(|b| u64_of(&b)) == Some(dummy) {
                writes.push(var_write(
                    view,
                    mem,
                    VarWrite {
                        va: k.transition_patch,
                        bytes: 0u64.to_le_bytes().to_vec(),
                        what: "klp_transition_patch".into(),
                    },
                )?);
            }
        }
    }
    apply(ctl, &mut writes)?;
    disarm(ctl, tr);
    Ok(())
}

/// Reverses a transition (see [`Engine::reverse`]); returns the sites' new bytes during it.
fn reverse_paused(
    ctl: &mut dyn GuestControl,
    view: &dyn TaskView,
    tr: &mut Transition,
    sites: &std::collections::BTreeMap<u64, crate::func_stack::SiteStack>,
) -> Result<Vec<(u64, [u8; 5])>, PatchError> {
    let regs = vcpu_regs(ctl)?;
    let mem = ctl.memory();
    let tasks = view.tasks(mem, &regs).map_err(PatchError::Memory)?;
    tr.target = 1 - tr.target;
    tr.reversed = !tr.reversed;
    tr.started_ms = now_ms();
    // What held the old direction says nothing about the new one: the next check tells.
    tr.blocking.clear();
    let mut writes = Vec::new();
    if tr.mode == Mode::PerTask {
        // TIF_PATCH_PENDING now means the new target: set where the state differs from it.
        for t in &tasks {
            let pending = t.patch_state != tr.target;
            for w in tr.task_writes(t, t.patch_state, pending) {
                writes.push(var_write(view, mem, w)?);
            }
        }
        if let Some(w) = tr.target_write(tr.target) {
            writes.push(var_write(view, mem, w)?);
        }
    }
    // Immediate functions switch back at once.
    let mut during = Vec::new();
    for f in tr.funcs.iter().filter(|f| f.immediate) {
        let Some(st) = sites.get(&f.site) else {
            continue;
        };
        if module_site_gone(view, mem, f.site, st) {
            continue;
        }
        let now = st.current_bytes(f.site);
        let want = if tr.target == 1 {
            site::jmp_bytes(f.site, f.new_range.0).unwrap_or(now)
        } else {
            st.below_bytes(f.site)
        };
        if want != now {
            writes.push(Write {
                pa: st.site_pa,
                expect: Some(now.to_vec()),
                old: vec![],
                new: want.to_vec(),
                what: format!("entry site of {}", f.name),
            });
        }
        during.push((f.site, want));
    }
    apply(ctl, &mut writes)?;
    Ok(during)
}

#[cfg(test)]
mod unwind_text_tests {
    use super::*;
    use crate::engine::Loaded;
    use crate::info::{ArenaRange, FuncInfo};
    use crate::prologue::{Method, MovedInsn};
    use std::cell::RefCell;

    /// A view that only records what the engine tells the unwinder.
    #[derive(Default)]
    struct Recorder {
        fp: RefCell<Vec<(u64, u64)>>,
        aliases: RefCell<Vec<(u64, u64)>>,
    }

    impl TaskView for Recorder {
        fn task_state_layout(
            &self,
            _: &dyn PhysMemory,
        ) -> Option<crate::dispatch::TaskStateLayout> {
            None
        }
        fn klp_patch_layout(&self, _: &dyn PhysMemory) -> Option<(u64, u64, u64)> {
            None
        }
        fn flags_offset(&self, _: &dyn PhysMemory) -> u64 {
            0
        }
        fn tasks(&self, _: &dyn PhysMemory, _: &[VcpuRegs]) -> Result<Vec<TaskSnap>, String> {
            Ok(vec![])
        }
        fn current(
            &self,
            _: &dyn PhysMemory,
            _: &[VcpuRegs],
            _: usize,
        ) -> Result<TaskSnap, String> {
            Err("none".into())
        }
        fn stack(
            &self,
            _: &dyn PhysMemory,
            _: &[VcpuRegs],
            _: &TaskSnap,
        ) -> crate::view::StackSnap {
            Default::default()
        }
        fn set_frame_pointer_text(&self, ranges: &[(u64, u64)]) {
            *self.fp.borrow_mut() = ranges.to_vec();
        }
        fn set_text_aliases(&self, aliases: &[(u64, u64)]) {
            *self.aliases.borrow_mut() = aliases.to_vec();
        }
        fn function_range(&self, _: u64) -> Option<(u64, u64)> {
            None
        }
        fn symbol(&self, _: &str) -> Option<u64> {
            None
        }
        fn translate(&self, _: &dyn PhysMemory, _: u64) -> Option<u64> {
            None
        }
    }

    const F: u64 = 0xffff_ffff_8100_1000;
    const CODE: u64 = 0xffff_ffff_c000_1000;

    fn func(site: u64, method: Method, tramp: Option<u64>, moved: Vec<MovedInsn>) -> FuncInfo {
        FuncInfo {
            old_name: format!("f{site:x}"),
            sympos: 0,
            old_addr: site,
            site,
            new_addr: CODE,
            active: true,
            flags: 0,
            new_size: 16,
            stub: None,
            method,
            tramp,
            moved,
            object: None,
            old_size: None,
        }
    }

    fn insn(addr: u64, bytes: &[u8], new_addr: u64) -> MovedInsn {
        MovedInsn {
            addr,
            bytes: bytes.to_vec(),
            text: String::new(),
            new_addr,
        }
    }

    fn patch(id: u64, code: u64, functions: Vec<FuncInfo>) -> Loaded {
        Loaded {
            id,
            info: PatchInfo {
                name: format!("p{id}"),
                file_name: String::new(),
                kernel_release: None,
                state: PatchState::Enabled,
                functions,
                code: ArenaRange {
                    va: code,
                    len: 0x200,
                    pages: vec![],
                },
                data: ArenaRange {
                    va: code + 0x1000,
                    len: 0,
                    pages: vec![],
                },
                return_sites: 0,
                pause_us: 0,
                load_us: 0,
                immediate: false,
                frame_pointers: true,
                held: None,
                last_transition: None,
                waiting_for: vec![],
                module_hooked: false,
            },
            code_run: (0, 1),
            data_run: (1, 0),
            ptes: vec![],
            rewait: None,
        }
    }

    /// Trampolines are no frame-pointer text; the return address of a `call rel32` moved into
    /// one stands for the same call's in the original; other moved instructions, calls that are
    /// not `rel32` and patches stacked on another's rewrite (no trampoline) add nothing.
    #[test]
    fn trampolines_are_left_out_of_fp_text_and_moved_calls_aliased() {
        let tramp = CODE + 0x100;
        let rewrite = func(
            F,
            Method::Prologue,
            Some(tramp),
            vec![
                insn(F, &[0xe8, 1, 2, 3, 4], tramp),
                insn(F + 5, &[0xff, 0xd0], tramp + 5),
                insn(F + 7, &[0x55], tramp + 7),
            ],
        );
        let plain = func(F + 0x100, Method::FtraceSite, None, vec![]);
        let stacked = func(F, Method::Prologue, None, rewrite.moved.clone());
        let mut e = Engine::new();
        e.patches.push(patch(1, CODE, vec![plain, rewrite]));
        e.patches.push(patch(2, CODE + 0x2000, vec![stacked]));
        let v = Recorder::default();
        e.set_unwind_text(&v);
        assert_eq!(
            *v.fp.borrow(),
            vec![(CODE, tramp), (CODE + 0x2000, CODE + 0x2200)]
        );
        assert_eq!(*v.aliases.borrow(), vec![(tramp + 5, F + 5)]);
    }
}
