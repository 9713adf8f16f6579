//! The consistency model: per-task transitions like klp's (Documentation/livepatch, "Consistency
//! model"), driven from outside the guest.
//!
//! Enabling or disabling a patch starts a transition towards a target state (1 patched, 0
//! unpatched). The state of each task is the guest's own `task_struct.patch_state`, so its
//! /proc/PID/patch_state tells the truth and its `klp_copy_process()` gives a forked child its
//! parent's state. During the transition each changed entry site jumps to a stub
//! ([`crate::dispatch`]) that picks the version by the current task's state. A task switches:
//! - when its reliably unwound stack holds none of the functions the transition changes (the
//!   old versions when patching, the new ones when unpatching) — checked by hvpatch with every
//!   vCPU paused, for sleeping *and* running tasks (klp can only check tasks that are not
//!   running);
//! - when it returns to user space or passes the idle loop: hvpatch sets the guest's
//!   `klp_target_state` and each task's `TIF_PATCH_PENDING`, and the guest's own
//!   `klp_update_patch_state()` in `exit_to_user_mode` / `do_idle` switches it, with no VM exit.
//!
//! When every task has the target state the sites jump straight to the target version and the
//! guest's livepatch fields go back to idle (-1, no TIF bit, `klp_target_state` -1), as
//! `klp_complete_transition()` leaves them.
//!
//! On a kernel without `task_struct.patch_state` the transition is whole-guest (kpatch style):
//! every check looks at every task, and the sites switch at once when all are safe.

use serde::{Deserialize, Serialize};

use crate::view::{StackSnap, TaskSnap, TaskView, TIF_PATCH_PENDING};
use introspect::{PhysMemory, VcpuRegs};

/// `KLP_UNDEFINED` / `KLP_TRANSITION_IDLE`.
pub const KLP_IDLE: i32 = -1;

/// How tasks switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Per task, in `task_struct.patch_state` (klp's model).
    PerTask,
    /// The kernel has no `patch_state`: all tasks at once when all are safe (kpatch's model).
    WholeGuest,
}

/// How tasks switch at the kernel-exit and idle boundaries (per-task mode). Stack checks run
/// under both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Switcher {
    /// The guest's own klp hooks: hvpatch sets `klp_target_state` and each pending task's
    /// `TIF_PATCH_PENDING`, and the guest's `klp_update_patch_state()` in `exit_to_user_mode`
    /// and `do_idle` switches the task, with no VM exit.
    #[default]
    GuestHooks,
    /// Hardware breakpoints on every vCPU at the guest's exit-to-user and idle boundaries
    /// ([`BOUNDARIES`]): each crossing is a VM exit in which hvpatch switches the vCPU's
    /// current task. The guest's klp variables stay idle.
    Breakpoints,
}

impl std::str::FromStr for Switcher {
    type Err = String;
    fn from_str(s: &str) -> Result<Switcher, String> {
        match s {
            "guest-hooks" | "guest_hooks" | "hooks" => Ok(Switcher::GuestHooks),
            "breakpoints" | "bp" => Ok(Switcher::Breakpoints),
            _ => Err(format!(
                "unknown switch mechanism {s:?}: expected guest-hooks or breakpoints"
            )),
        }
    }
}

/// The functions at whose entry a task is at a switch boundary (KERNEL-FACTS §6), in both
/// 6.1 and 6.12: the syscall exit and the IRQ/exception exit to user space, and one pass of the
/// idle loop (`cpu_startup_entry` calls `do_idle` once per pass).
pub const BOUNDARIES: [&str; 3] = [
    "syscall_exit_to_user_mode",
    "irqentry_exit_to_user_mode",
    "do_idle",
];

/// One function of the transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransFunc {
    /// Replaced function.
    pub name: String,
    /// Its entry site.
    #[serde(with = "introspect::hex")]
    pub site: u64,
    /// The dispatcher stub.
    #[serde(with = "introspect::hex")]
    pub stub: u64,
    /// The version below this patch: `[start, end)` of the original function or of the
    /// previous patch's new function.
    #[serde(with = "introspect::hex")]
    pub old_range: (u64, u64),
    /// This patch's new function `[start, end)`.
    #[serde(with = "introspect::hex")]
    pub new_range: (u64, u64),
    /// Where the old version starts for the stub (site + 5, or the previous patch's function).
    #[serde(with = "introspect::hex")]
    pub old_entry: u64,
    /// `HVPATCH_IMMEDIATE` on this function: switched at once, never checked.
    pub immediate: bool,
}

/// The guest's livepatch variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KlpVars {
    /// `klp_target_state`.
    #[serde(with = "introspect::hex")]
    pub target_state: u64,
    /// `klp_transition_patch`.
    #[serde(with = "introspect::hex")]
    pub transition_patch: u64,
    /// `klp_mutex` (its `owner` word is at offset 0).
    #[serde(with = "introspect::hex")]
    pub mutex: Option<u64>,
    /// `klp_update_patch_state` `[start, end)`.
    #[serde(with = "introspect::hex")]
    pub update: Option<(u64, u64)>,
}

impl KlpVars {
    /// Finds them in the guest's kallsyms; `None` without CONFIG_LIVEPATCH.
    pub fn find(view: &dyn TaskView) -> Option<KlpVars> {
        Some(KlpVars {
            target_state: view.symbol("klp_target_state")?,
            transition_patch: view.symbol("klp_transition_patch")?,
            mutex: view.symbol("klp_mutex"),
            update: view
                .symbol("klp_update_patch_state")
                .and_then(|a| view.function_range(a)),
        })
    }
}

/// Why a task has not switched yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Why {
    /// A function the transition changes is on its stack.
    OnStack {
        /// The function (`name+0xoff/0xsize` of the frame).
        frame: String,
    },
    /// Its stack cannot be unwound reliably.
    Unreliable {
        /// Why.
        reason: String,
    },
    /// It is executing the guest's `klp_update_patch_state()`, which may still store the state
    /// it read (the transition completes at a later check).
    InKlpUpdate,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::OnStack { frame } => write!(f, "{frame} is on its stack"),
            Why::Unreliable { reason } => write!(f, "unreliable stack: {reason}"),
            Why::InKlpUpdate => write!(f, "inside klp_update_patch_state"),
        }
    }
}

/// A task that holds the transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocker {
    /// Thread id.
    pub pid: i32,
    /// Name.
    pub comm: String,
    /// Running on this vCPU, if running.
    pub vcpu: Option<usize>,
    /// Why.
    pub why: Why,
    /// Its stack, symbolized, innermost first.
    pub stack: Vec<String>,
}

/// A task's state as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    /// Thread id.
    pub pid: i32,
    /// Name.
    pub comm: String,
    /// Like /proc/PID/patch_state: 1 patched, 0 unpatched, -1 no transition.
    pub patch_state: i32,
}

/// A transition in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The patch (engine id).
    pub patch_id: u64,
    /// Its name.
    pub patch: String,
    /// 1 patching, 0 unpatching.
    pub target: i32,
    /// Whether it was reversed.
    pub reversed: bool,
    /// How tasks switch.
    pub mode: Mode,
    /// The changed functions.
    pub funcs: Vec<TransFunc>,
    /// The guest's livepatch variables (per-task mode only).
    pub klp: Option<KlpVars>,
    /// Offset of `patch_state` in `task_struct` (per-task mode).
    pub patch_state_off: u64,
    /// Offset of `thread_info.flags`.
    pub flags_off: u64,
    /// Unix time (ms) the transition started.
    pub started_ms: u64,
    /// Reverse when not complete after this many ms since it started (or since the reversal).
    pub timeout_ms: Option<u64>,
    /// Checks made.
    pub checks: u64,
    /// Tasks that held it at the last check.
    pub blocking: Vec<Blocker>,
    /// Total time the vCPUs were paused for it, µs.
    pub pause_us: u64,
    /// The stand-in `struct klp_patch` that `klp_transition_patch` points to while ours runs,
    /// so that the guest's livepatch refuses to start a transition of its own (-EBUSY).
    #[serde(default, with = "introspect::hex")]
    pub dummy: Option<u64>,
    /// Set when the guest's livepatch variables changed under us.
    #[serde(default)]
    pub interference: Option<String>,
    /// Every task's state at the last check.
    #[serde(default)]
    pub tasks: Vec<TaskState>,
    /// How tasks switch at the kernel-exit and idle boundaries.
    #[serde(default)]
    pub switcher: Switcher,
    /// The boundary breakpoints ([`Switcher::Breakpoints`]).
    #[serde(default, with = "introspect::hex")]
    pub boundaries: Vec<u64>,
    /// Boundary breakpoint hits so far, and the tasks they switched.
    #[serde(default)]
    pub boundary_hits: (u64, u64),
    /// Whether this process armed the boundary breakpoints (a restarted one arms them again).
    #[serde(skip)]
    pub armed: bool,
}

/// How a transition went, once it ended (`patch info`'s `last_transition`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionSummary {
    /// 1 patched, 0 unpatched: the state every task reached.
    pub target: i32,
    /// Whether it was reversed on the way (then `target` is where it came back to).
    pub reversed: bool,
    /// Completed by `patch force`.
    pub forced: bool,
    /// How tasks switched at the boundaries.
    pub switcher: Switcher,
    /// From its start (or its last reversal) to its end, ms.
    pub elapsed_ms: u64,
    /// Total vCPU pause time it took, µs (checks, boundary hits, the start and the end).
    pub pause_us: u64,
    /// Checks made.
    pub checks: u64,
    /// Boundary breakpoint hits, and the tasks they switched.
    pub boundary_hits: (u64, u64),
}

/// One write of a task field or guest variable (guest virtual address, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarWrite {
    /// Kernel virtual address.
    pub va: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// What it is, for errors.
    pub what: String,
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Transition {
    /// Ranges a task's stack must not hold to switch towards the target: the old versions
    /// when patching, the new ones when unpatching (klp_check_stack_func).
    pub fn avoid(&self) -> Vec<(u64, u64)> {
        self.funcs
            .iter()
            .filter(|f| !f.immediate)
            .map(|f| {
                if self.target == 1 {
                    f.old_range
                } else {
                    f.new_range
                }
            })
            .collect()
    }

    /// Whether `stack` lets a task switch; else why not.
    pub fn judge(&self, stack: &StackSnap) -> Result<(), Why> {
        let avoid = self.avoid();
        for (i, &a) in stack.frames.iter().enumerate() {
            // Return addresses point after the call: look at a - 1 (the first frame of a
            // running task is its exact ip, looked at as is).
            let probe = if i == 0 && stack.first_exact {
                a
            } else {
                a.wrapping_sub(1)
            };
            if avoid.iter().any(|&(s, e)| probe >= s && probe < e) {
                return Err(Why::OnStack {
                    frame: stack
                        .rendered
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("{a:#x}")),
                });
            }
        }
        if !stack.reliable {
            return Err(Why::Unreliable {
                reason: stack.reason.clone().unwrap_or_else(|| "unknown".into()),
            });
        }
        Ok(())
    }

    /// Whether the stack of a vCPU's task is inside `klp_update_patch_state`.
    pub fn in_klp_update(&self, stack: &StackSnap) -> bool {
        let Some((s, e)) = self.klp.and_then(|k| k.update) else {
            return false;
        };
        stack.frames.iter().enumerate().any(|(i, &a)| {
            let p = if i == 0 && stack.first_exact {
                a
            } else {
                a.wrapping_sub(1)
            };
            p >= s && p < e
        })
    }

    /// Classifies every task not yet at the target: those that may switch now, and those
    /// that hold the transition. User-mode tasks have no kernel frames and always may.
    pub fn classify<'t>(
        &self,
        view: &dyn TaskView,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        tasks: &'t [TaskSnap],
    ) -> (Vec<&'t TaskSnap>, Vec<Blocker>) {
        let mut ok = Vec::new();
        let mut blocking = Vec::new();
        for t in tasks {
            if self.mode == Mode::PerTask && t.patch_state == self.target {
                continue;
            }
            if t.user_mode {
                ok.push(t);
                continue;
            }
            if self.judge(&view.stack_frames(mem, vcpus, t)).is_ok() {
                ok.push(t);
                continue;
            }
            // A blocker: again with its frames symbolized, for `status` (a sleeping task's
            // unwind comes from the cache).
            let st = view.stack(mem, vcpus, t);
            match self.judge(&st) {
                Ok(()) => ok.push(t),
                Err(why) => blocking.push(Blocker {
                    pid: t.pid,
                    comm: t.comm.clone(),
                    vcpu: t.vcpu,
                    why,
                    stack: st.rendered,
                }),
            }
        }
        (ok, blocking)
    }

    /// The writes that give `task` the state `state`, with its TIF_PATCH_PENDING set or clear.
    pub fn task_writes(&self, t: &TaskSnap, state: i32, pending: bool) -> Vec<VarWrite> {
        let mut w = Vec::new();
        if t.patch_state != state {
            w.push(VarWrite {
                va: t.addr.wrapping_add(self.patch_state_off),
                bytes: state.to_le_bytes().to_vec(),
                what: format!("patch_state of pid {}", t.pid),
            });
        }
        let flags = if pending && self.uses_hooks() {
            t.flags | TIF_PATCH_PENDING
        } else {
            t.flags & !TIF_PATCH_PENDING
        };
        if flags != t.flags {
            w.push(VarWrite {
                va: t.addr.wrapping_add(self.flags_off),
                bytes: flags.to_le_bytes().to_vec(),
                what: format!("thread_info.flags of pid {}", t.pid),
            });
        }
        w
    }

    /// Whether the guest's klp hooks switch tasks at the boundaries (so `klp_target_state`
    /// and `TIF_PATCH_PENDING` are set).
    pub fn uses_hooks(&self) -> bool {
        self.mode == Mode::PerTask && self.switcher == Switcher::GuestHooks
    }

    /// Whether boundary breakpoints switch tasks.
    pub fn uses_breakpoints(&self) -> bool {
        self.mode == Mode::PerTask && self.switcher == Switcher::Breakpoints
    }

    /// The value `klp_target_state` has while this transition runs.
    pub fn guest_target_state(&self) -> i32 {
        if self.uses_hooks() {
            self.target
        } else {
            KLP_IDLE
        }
    }

    /// Writes of `klp_target_state` (only the guest-hook mechanism uses it; with breakpoints
    /// it stays -1).
    pub fn target_write(&self, value: i32) -> Option<VarWrite> {
        if !self.uses_hooks() {
            return None;
        }
        self.klp.map(|k| VarWrite {
            va: k.target_state,
            bytes: value.to_le_bytes().to_vec(),
            what: "klp_target_state".into(),
        })
    }

    /// The summary of this transition as it ends now.
    pub fn summary(&self, forced: bool) -> TransitionSummary {
        TransitionSummary {
            target: self.target,
            reversed: self.reversed,
            forced,
            switcher: self.switcher,
            elapsed_ms: now_ms().saturating_sub(self.started_ms),
            pause_us: self.pause_us,
            checks: self.checks,
            boundary_hits: self.boundary_hits,
        }
    }

    /// The per-task states for `status`.
    pub fn states(tasks: &[TaskSnap]) -> Vec<TaskState> {
        tasks
            .iter()
            .map(|t| TaskState {
                pid: t.pid,
                comm: t.comm.clone(),
                patch_state: t.patch_state,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(target: i32) -> Transition {
        Transition {
            patch_id: 1,
            patch: "p".into(),
            target,
            reversed: false,
            mode: Mode::PerTask,
            funcs: vec![
                TransFunc {
                    name: "pipe_read".into(),
                    site: 0x1000,
                    stub: 0x9000,
                    old_range: (0x1000, 0x1400),
                    new_range: (0x8000, 0x8100),
                    old_entry: 0x1005,
                    immediate: false,
                },
                TransFunc {
                    name: "imm".into(),
                    site: 0x2000,
                    stub: 0x9020,
                    old_range: (0x2000, 0x2100),
                    new_range: (0x8100, 0x8200),
                    old_entry: 0x2005,
                    immediate: true,
                },
            ],
            klp: None,
            patch_state_off: 0x145c,
            flags_off: 0,
            started_ms: 0,
            timeout_ms: None,
            checks: 0,
            blocking: vec![],
            pause_us: 0,
            dummy: None,
            interference: None,
            tasks: vec![],
            switcher: Switcher::GuestHooks,
            boundaries: vec![],
            boundary_hits: (0, 0),
            armed: false,
        }
    }

    fn stack(frames: &[u64], reliable: bool) -> StackSnap {
        StackSnap {
            frames: frames.to_vec(),
            rendered: frames.iter().map(|a| format!("{a:#x}")).collect(),
            first_exact: true,
            reliable,
            reason: (!reliable).then(|| "x".into()),
        }
    }

    #[test]
    fn stack_checks_follow_klp() {
        let p = tr(1);
        // Old function on the stack blocks patching; the new one does not.
        assert!(matches!(
            p.judge(&stack(&[0x500, 0x1234, 0x600], true)),
            Err(Why::OnStack { .. })
        ));
        assert_eq!(p.judge(&stack(&[0x500, 0x8050], true)), Ok(()));
        // A return address right after a call at the end of the old function still counts;
        // one just past it does not (return addresses are looked up at a - 1).
        assert!(p.judge(&stack(&[0x500, 0x1400], true)).is_err());
        assert_eq!(p.judge(&stack(&[0x500, 0x1401], true)), Ok(()));
        // Immediate functions never block.
        assert_eq!(p.judge(&stack(&[0x500, 0x2050], true)), Ok(()));
        // Unreliable never passes.
        assert!(matches!(
            p.judge(&stack(&[0x500], false)),
            Err(Why::Unreliable { .. })
        ));
        // Unpatching avoids the new version.
        let u = tr(0);
        assert!(u.judge(&stack(&[0x500, 0x8050], true)).is_err());
        assert_eq!(u.judge(&stack(&[0x500, 0x1234], true)), Ok(()));
    }

    #[test]
    fn task_writes_touch_only_what_changes() {
        let p = tr(1);
        let t = TaskSnap {
            addr: 0xffff_8880_0100_0000,
            pid: 7,
            tgid: 7,
            comm: "x".into(),
            patch_state: 0,
            flags: 0x4 | TIF_PATCH_PENDING,
            vcpu: None,
            user_mode: false,
            is_idle: false,
            raw: None,
        };
        let w = p.task_writes(&t, 1, false);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].va, t.addr + 0x145c);
        assert_eq!(w[0].bytes, 1i32.to_le_bytes());
        assert_eq!(w[1].bytes, 0x4u64.to_le_bytes());
        assert!(p.task_writes(&t, 0, true).is_empty());
        // With boundary breakpoints the guest's TIF bit is never set, only cleared.
        let mut b = tr(1);
        b.switcher = Switcher::Breakpoints;
        let w = b.task_writes(&t, 0, true);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].bytes, 0x4u64.to_le_bytes());
        assert!(b.target_write(1).is_none());
        assert_eq!(b.guest_target_state(), KLP_IDLE);
    }
}
