//! The public description of loaded patches: [`PatchInfo`] with its [`FuncInfo`]s and
//! [`ArenaRange`]s, the [`PatchState`], and the [`OpTiming`] of the last operation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// State of a loaded patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchState {
    /// Loaded, immediate mode (every function switched at once).
    Enabled,
    /// Unloaded (disabled: no function runs it any more) but its code and data pages are kept
    /// because something in the guest may still execute, return into or read them; see
    /// [`PatchInfo::held`]. They are freed once a later check finds them unreachable.
    Held,
    /// Loaded but not running: every task runs the previous version of its functions (after
    /// `patch disable`, or a reversed enable). Its code and data stay in place; `patch enable`
    /// switches it on again and `patch unload` frees it.
    Disabled,
    /// Accepted but not in the guest yet: every kernel module it patches is not loaded. It is
    /// applied when its modules load, before any of their code runs, and waits again when they
    /// are removed ([`PatchInfo::waiting_for`]).
    Waiting,
}

/// One replaced function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncInfo {
    /// Replaced function.
    pub old_name: String,
    /// The kernel module holding it (`HVPATCH_FUNC_OBJ`); `None` for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Size of the replaced function (module functions: from the module's symbol table, for
    /// the stack checks; vmlinux functions take theirs from kallsyms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
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
    /// Size of the new function, bytes.
    #[serde(default)]
    pub new_size: u64,
    /// The dispatcher stub of the consistency model for this function (none for immediate
    /// patches).
    #[serde(default, with = "introspect::hex")]
    pub stub: Option<u64>,
    /// How the entry is redirected: the ftrace site, or a prologue rewrite (after ftrace's
    /// call when ftrace owns the site), see [`crate::prologue`].
    #[serde(default)]
    pub method: crate::prologue::Method,
    /// For a prologue rewrite: the trampoline running the moved instructions (the original
    /// code, for `HVPATCH_ORIG` and the unpatched path).
    #[serde(
        default,
        with = "introspect::hex",
        skip_serializing_if = "Option::is_none"
    )]
    pub tramp: Option<u64>,
    /// For a prologue rewrite: the instructions moved to the trampoline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<crate::prologue::MovedInsn>,
}

impl FuncInfo {
    /// Where the original function runs from for a task that must not see this patch (the
    /// dispatcher's old path, with no other patch below): the body after the ftrace site, or
    /// for a prologue rewrite of this patch its trampoline (the moved instructions, then a
    /// jump back after them). `None` for a patch stacked on another patch's rewrite (it has no
    /// trampoline of its own).
    pub fn original_entry(&self) -> Option<u64> {
        match (self.method, self.tramp) {
            (crate::prologue::Method::FtraceSite, _) => Some(self.site + 5),
            (_, Some(t)) => Some(t),
            _ => None,
        }
    }

    /// For a prologue rewrite, the addresses strictly inside the moved bytes,
    /// `(site + 1, site + moved length)`: no context may resume there when the `jmp` goes in.
    pub fn moved_inside(&self) -> Option<(u64, u64)> {
        let len: u64 = self.moved.iter().map(|m| m.bytes.len() as u64).sum();
        (self.method != crate::prologue::Method::FtraceSite && len > 0)
            .then_some((self.site + 1, self.site + len))
    }

    /// The 5 bytes at [`FuncInfo::site`] when no patch replaces the function: the ftrace NOP,
    /// or for a prologue rewrite the start of the moved instructions.
    pub fn unpatched(&self) -> [u8; 5] {
        let moved: Vec<u8> = self.moved.iter().flat_map(|m| m.bytes.clone()).collect();
        match moved.get(..5) {
            Some(b) if self.method != crate::prologue::Method::FtraceSite => {
                let mut a = [0u8; 5];
                a.copy_from_slice(b);
                a
            }
            _ => crate::site::NOP5,
        }
    }
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
    /// Immediate patch (`HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE)` or `load --immediate`): every
    /// task switches at once, without the consistency model.
    #[serde(default)]
    pub immediate: bool,
    /// Built with frame pointers (`hvpatch build`): stack checks unwind through its code.
    #[serde(default)]
    pub frame_pointers: bool,
    /// For a [`PatchState::Held`] patch: what held it at the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<crate::reach::Hold>,
    /// The last transition of this patch that ended (completed or forced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<crate::transition::TransitionSummary>,
    /// For a [`PatchState::Waiting`] patch: the modules not loaded yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// Applied when its modules loaded (it waits again when they go).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub module_hooked: bool,
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
