//! The module hooks of a session: while a patch waits for a kernel module (or one applied at a
//! module's load is in the guest), hardware breakpoints on every vCPU at the engine's
//! [`patcher::modwait::COMING_HOOK`] and [`patcher::modwait::GOING_HOOK`] stop the guest at
//! each module load (relocated, before any of its code runs) and removal (before its memory is
//! freed); the engine applies or withdraws the patches of that module, and the guest resumes.
//! Only 2 of the 4 debug registers: a breakpoints-switcher transition (3) is refused meanwhile.

use std::time::{Duration, Instant};

use patcher::kernel::KernelSymbols;
use patcher::modwait::{COMING_HOOK, GOING_HOOK};
use patcher::Target;

use super::Session;

/// Longest time one tick waits for a module hook hit before requests get their turn.
const HOOK_SLICE: Duration = Duration::from_millis(5);

impl Session {
    /// Arms the module hooks when the engine wants them and removes them when it no longer
    /// does.
    pub(super) fn sync_module_hooks(&mut self) {
        let wanted = self.engine.wants_module_hooks();
        match (wanted, self.module_hooks) {
            (true, None) => {
                if self.kernel.is_none() {
                    // Continued from a state file: find the kernel first.
                    if let Err(e) = self.paused(|s, regs| s.kernel(regs).map(|_| ())) {
                        tracing::warn!("module hooks: {e}");
                        return;
                    }
                }
                let Some(k) = self.kernel.as_ref() else {
                    return;
                };
                let (Ok(coming), Ok(going)) =
                    (k.lookup(COMING_HOOK, None), k.lookup(GOING_HOOK, None))
                else {
                    tracing::warn!("module hooks: no {COMING_HOOK}/{GOING_HOOK} in the guest");
                    return;
                };
                match self.control.set_breakpoints(&[coming, going]) {
                    Ok(()) => {
                        tracing::info!("module hooks armed");
                        self.module_hooks = Some([coming, going]);
                        // Modules that came or went while nobody watched (a restarted server).
                        if let Err(e) = self.catch_up_modules() {
                            tracing::warn!("catching up with module loads: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("arming the module hooks: {e}"),
                }
            }
            (false, Some(_)) => {
                if let Err(e) = self.control.set_breakpoints(&[]) {
                    tracing::warn!("removing the module hooks: {e}");
                }
                self.module_hooks = None;
                // A hit queued before they went is resumed by the boundary drain.
                self.drain_hits = true;
            }
            _ => {}
        }
    }

    /// Serves module hook hits for at most [`HOOK_SLICE`]. A guest found paused without the
    /// operator's pause is held by a hit and is served (or resumed).
    pub(super) fn serve_module_hooks(&mut self) {
        let Some([coming, going]) = self.module_hooks else {
            return;
        };
        if self.operator_paused {
            return;
        }
        let until = Instant::now() + HOOK_SLICE;
        loop {
            let Some((vcpu, rip)) = self.next_hit(until, "module hooks") else {
                return;
            };
            if !self.control.is_paused() {
                // A hit that one of our own pauses caught and its resume stepped over: the
                // module went on. Catch up (late, but before the module is used further).
                if rip == coming || rip == going {
                    tracing::warn!("module hook hit at {rip:#x} taken late; catching up");
                    if let Err(e) = self.catch_up_modules() {
                        tracing::warn!("catching up with module loads: {e}");
                    }
                }
                continue;
            }
            if rip == coming || rip == going {
                if let Err(e) = self.module_hook_hit(vcpu, rip == coming) {
                    tracing::warn!("module hook on vCPU {vcpu}: {e}");
                }
            }
            if let Err(e) = self.control.resume() {
                tracing::warn!("resuming after a module hook: {e}");
                return;
            }
        }
    }

    /// After a missed hook stop: in one pause, applies the waiting patches whose modules are
    /// all there now, and withdraws the applied ones whose modules are gone or going (the
    /// engine then forgets sites whose memory is not the module's any more).
    fn catch_up_modules(&mut self) -> Result<(), String> {
        self.paused(|s, regs| {
            s.kernel(regs)?;
            let Some(kernel) = s.kernel.as_ref() else {
                return Ok(());
            };
            let mem = s.control.memory();
            let mods = kernel
                .modules(mem)
                .map_err(|e| super::ReqError::Internal(format!("module list: {e}")))?;
            let live = |m: &str| {
                mods.iter().any(|x| {
                    x.name == m
                        && matches!(
                            x.state,
                            introspect::ModuleState::Live | introspect::ModuleState::Coming
                        )
                })
            };
            let (coming, going) = s.engine.module_hook_candidates(&live);
            let syms = KernelSymbols::new(kernel, mem);
            let target = Target {
                symbols: &syms,
                paging: syms.paging(regs.first().is_some_and(|r| r.nx_enabled())),
            };
            for m in coming {
                if let Err(e) = s.engine.module_coming(s.control.as_mut(), &target, &m) {
                    tracing::warn!(module = %m, "late apply: {e}");
                }
            }
            for m in going {
                if let Err(e) = s.engine.module_going(s.control.as_mut(), kernel, &m) {
                    tracing::warn!(module = %m, "late withdraw: {e}");
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())
    }

    /// The guest is stopped at a module hook on `vcpu` (`coming`: the load hook): RDI is the
    /// `struct module *`.
    fn module_hook_hit(&mut self, vcpu: usize, coming: bool) -> Result<(), String> {
        let regs = self.control.regs(vcpu).map_err(|e| e.to_string())?;
        let module_addr = regs.gprs[5];
        let Some(kernel) = self.kernel.as_ref() else {
            return Err("no kernel model".into());
        };
        let mem = self.control.memory();
        let name = kernel
            .modules(mem)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|m| m.addr == module_addr)
            .map(|m| m.name)
            .ok_or_else(|| format!("no module at {module_addr:#x} in the module list"))?;
        let t0 = Instant::now();
        if coming {
            let syms = KernelSymbols::new(kernel, mem);
            let target = Target {
                symbols: &syms,
                paging: syms.paging(regs.nx_enabled()),
            };
            let applied = self
                .engine
                .module_coming(self.control.as_mut(), &target, &name)
                .map_err(|e| format!("module {name} loading: {e}"))?;
            if !applied.is_empty() {
                tracing::info!(module = %name, ?applied, us = t0.elapsed().as_micros() as u64,
                    "module loading: patches applied");
            }
        } else {
            let again = self
                .engine
                .module_going(self.control.as_mut(), kernel, &name)
                .map_err(|e| format!("module {name} going: {e}"))?;
            if !again.is_empty() {
                tracing::info!(module = %name, ?again, us = t0.elapsed().as_micros() as u64,
                    "module going: patches wait again");
                self.next_reap = Instant::now();
            }
        }
        Ok(())
    }
}
