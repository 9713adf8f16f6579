//! The result of every API request, as one serde type each. The session builds these, the
//! CLI's human output (`format.rs`) reads them back, and `vmm/tests/api_doc.rs` checks
//! `docs/API.md` against them. Requests are [`Request`] (protocol.rs); errors are
//! [`ReqError`](super::error::ReqError) (error.rs).
//!
//! Conventions: every 64-bit address (or register, page-table value) is a hex string through
//! `#[serde(with = "introspect::hex")]`, never a JSON number; `Option` fields are always
//! written (`null` when absent), so a result's keys do not depend on its values. Types that
//! already travel in engine state or the kernel model (`patcher::FuncInfo`, `ArenaRange`,
//! `Hold`, `UnloadReport`, `introspect::KernelInfo`, `Task`) are reused as they are.
//!
//! Adding a request (e.g. `patch_status`):
//! 1. add its variant to [`Request`] in protocol.rs;
//! 2. add its result struct here (or reuse one) and its arm in [`Request::check_result`] — the
//!    match is exhaustive, so the compiler points there;
//! 3. answer it in `Session::handle` (session.rs) by building that struct; a new failure
//!    gets a variant (and its wire kind) in error.rs;
//! 4. document it in docs/API.md: a ```` ```json request ```` example followed by a
//!    ```` ```json result ```` example (the `api_doc` test fails until you do);
//! 5. give the CLI a formatter in format.rs that deserializes the same struct.

use introspect::stack::StackKind;
use patcher::engine::ArenaRange;
use patcher::{FuncInfo, Hold, PatchInfo, UnloadReport};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::protocol::{InspectWhat, Request};

/// `status`, `pause`, `resume`: the guest and the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The backend: `kvm` (`hvpatch run`) or `qemu-attach`.
    pub host: String,
    /// vCPU count.
    pub vcpus: usize,
    /// Whether the vCPUs are paused (by `pause`).
    pub paused: bool,
    /// The guest-physical range reserved for patches (the KVM VMM's e820 hole), if any.
    pub patch_arena: Option<PatchArena>,
    /// Loaded patches (enabled and held).
    pub patches: usize,
}

/// A guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchArena {
    /// First byte.
    #[serde(with = "introspect::hex")]
    pub start: u64,
    /// Length, bytes.
    pub len: u64,
}

/// `inspect kernel`.
pub type KernelResult = introspect::KernelInfo;

/// One line of `inspect symbols` (the whole table, vmlinux then modules, in /proc/kallsyms
/// order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolLine {
    /// Runtime address.
    #[serde(with = "introspect::hex")]
    pub addr: u64,
    /// `nm`-style type letter (for module symbols upper-case when exported, as
    /// /proc/kallsyms shows it).
    #[serde(rename = "type")]
    pub kind: char,
    /// Name.
    pub name: String,
    /// The module, `null` for vmlinux symbols.
    pub module: Option<String>,
}

/// `inspect modules`: one loaded module.
pub type ModuleResult = introspect::Module;

/// One match of `inspect symbol NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolMatch {
    /// Runtime address.
    #[serde(with = "introspect::hex")]
    pub addr: u64,
    /// `nm`-style type letter.
    #[serde(rename = "type")]
    pub kind: char,
    /// Name.
    pub name: String,
    /// 1-based position among the symbols of this name in the same object (vmlinux or the
    /// module), in table order (livepatch's sympos).
    pub sympos: usize,
    /// Distance to the next symbol, when the address starts a symbol.
    pub size: Option<u64>,
    /// The module, `null` for vmlinux.
    pub module: Option<String>,
}

/// `inspect tasks`: one task (thread).
pub type TaskResult = introspect::tasks::Task;

/// One stack frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameLine {
    /// The (return) address.
    #[serde(with = "introspect::hex")]
    pub addr: u64,
    /// `name+0xoff/0xsize`, or the bare address when no symbol covers it.
    pub symbol: String,
}

/// A kernel stack with its reliability verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackView {
    /// Whose stack: `Sleeping`, `RunningKernel`, `User`, `Idle`.
    pub kind: StackKind,
    /// Whether livepatch's reliable stack walk would accept it.
    pub reliable: bool,
    /// Why it is not reliable (or how the walk ended abnormally).
    pub reason: Option<String>,
    /// Frames, innermost first.
    pub frames: Vec<FrameLine>,
    /// The lines the guest's `/proc/PID/stack` would show.
    pub proc: Vec<String>,
}

/// `inspect stacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stacks {
    /// Each vCPU's stack (its current task's, when in the kernel).
    pub vcpus: Vec<VcpuStack>,
    /// Every task not running on a vCPU.
    pub tasks: Vec<TaskStack>,
}

/// A vCPU's stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStack {
    /// vCPU index.
    pub vcpu: usize,
    /// The stack.
    pub stack: StackView,
}

/// A sleeping task's stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStack {
    /// Thread id.
    pub pid: i32,
    /// Name as /proc/PID/comm shows it.
    pub comm: String,
    /// `struct task_struct *`.
    #[serde(with = "introspect::hex")]
    pub addr: u64,
    /// The stack.
    pub stack: StackView,
}

/// `inspect vcpus`: one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vcpu {
    /// vCPU index.
    pub vcpu: usize,
    /// Linux CPU number, if identified.
    pub cpu: Option<u32>,
    /// What it runs (the kind of its stack), if the stack could be read.
    pub mode: Option<StackKind>,
    /// RIP.
    #[serde(with = "introspect::hex")]
    pub rip: u64,
    /// RSP.
    #[serde(with = "introspect::hex")]
    pub rsp: u64,
    /// CR3.
    #[serde(with = "introspect::hex")]
    pub cr3: u64,
    /// Current privilege level.
    pub cpl: u8,
    /// RIP symbolized, in kernel mode.
    pub rip_symbol: Option<String>,
    /// `current` (`struct task_struct *`), if identified.
    #[serde(with = "introspect::hex")]
    pub current: Option<u64>,
    /// Its pid.
    pub current_pid: Option<i32>,
    /// Its comm.
    pub current_comm: Option<String>,
    /// Its kernel stack.
    pub stack: Option<StackView>,
}

/// A patch's state as the API reports it: the engine's states, and `Unloaded` in the result
/// of a finished `patch_unload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchState {
    /// Loaded and enabled.
    Enabled,
    /// Loaded, not running (`patch disable`, or an enable that was reversed).
    Disabled,
    /// Disabled, its pages kept because something may still reach them.
    Held,
    /// Disabled and freed.
    Unloaded,
    /// Accepted, not in the guest yet: the kernel modules it patches are not loaded; applied
    /// when they load (`waiting_for` names them).
    Waiting,
}

impl From<patcher::PatchState> for PatchState {
    fn from(s: patcher::PatchState) -> Self {
        match s {
            patcher::PatchState::Enabled => PatchState::Enabled,
            patcher::PatchState::Disabled => PatchState::Disabled,
            patcher::PatchState::Held => PatchState::Held,
            patcher::PatchState::Waiting => PatchState::Waiting,
        }
    }
}

/// `patch_load`, `patch_info`, an element of `patch_list`: one patch ([`PatchInfo`] with the
/// API's [`PatchState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// Patch name.
    pub name: String,
    /// Object file name.
    pub file_name: String,
    /// The kernel release it was built for (`HVPATCH_KERNEL`), if it says.
    pub kernel_release: Option<String>,
    /// State.
    pub state: PatchState,
    /// Replaced functions.
    pub functions: Vec<FuncInfo>,
    /// Code (RX) in the arena.
    pub code: ArenaRange,
    /// Data (RW, NX) in the arena.
    pub data: ArenaRange,
    /// Return-thunk sites rewritten by the linker.
    pub return_sites: usize,
    /// Time the vCPUs were paused for the load, µs.
    pub pause_us: u64,
    /// Whole load time, µs.
    pub load_us: u64,
    /// Immediate: every task switches at once (no consistency model).
    #[serde(default)]
    pub immediate: bool,
    /// Built with frame pointers: stack checks unwind through its code.
    #[serde(default)]
    pub frame_pointers: bool,
    /// For a held patch: what held it at the last check.
    pub held: Option<Hold>,
    /// The last transition of this patch that ended: how long it took, its pause time, how
    /// tasks switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<patcher::transition::TransitionSummary>,
    /// A `Waiting` patch: the kernel modules it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// Applied when its modules loaded: it waits again when they are removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub module_hooked: bool,
}

impl From<PatchInfo> for Patch {
    fn from(p: PatchInfo) -> Self {
        Patch {
            name: p.name,
            file_name: p.file_name,
            kernel_release: p.kernel_release,
            state: p.state.into(),
            functions: p.functions,
            code: p.code,
            data: p.data,
            return_sites: p.return_sites,
            pause_us: p.pause_us,
            load_us: p.load_us,
            immediate: p.immediate,
            frame_pointers: p.frame_pointers,
            held: p.held,
            last_transition: p.last_transition,
            waiting_for: p.waiting_for,
            module_hooked: p.module_hooked,
        }
    }
}

/// `patch_unload`: the patch as it was, now `Unloaded` (every function inactive, not held),
/// with what the unload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unloaded {
    /// The patch.
    #[serde(flatten)]
    pub patch: Patch,
    /// The unload's disable pause (= `unload.pause_us`), µs.
    pub unload_pause_us: u64,
    /// The whole unload (= `unload.unload_us`), µs.
    pub unload_us: u64,
    /// What the unload did.
    pub unload: UnloadReport,
}

impl Unloaded {
    /// The result for `info`, unloaded as `report` says.
    pub fn new(info: PatchInfo, report: UnloadReport) -> Self {
        let mut patch = Patch::from(info);
        patch.state = PatchState::Unloaded;
        patch.held = None;
        // None of its functions is live any more.
        for f in &mut patch.functions {
            f.active = false;
        }
        Unloaded {
            patch,
            unload_pause_us: report.pause_us,
            unload_us: report.unload_us,
            unload: report,
        }
    }
}

/// `patch_status`: the transition in progress and the loaded patches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchStatus {
    /// The transition in progress, if any.
    pub transition: Option<patcher::TransitionStatus>,
    /// The loaded patches.
    pub patches: Vec<Patch>,
}

/// `patch_force`: the patch after its forced completion and the tasks that were overridden.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forced {
    /// The patch.
    pub patch: Patch,
    /// The tasks switched although they still blocked.
    pub overridden: Vec<patcher::transition::Blocker>,
}

/// `value` read as `T` and written again: what the typed API keeps of it.
fn round_trip<T: Serialize + DeserializeOwned>(value: Value) -> Result<Value, serde_json::Error> {
    serde_json::to_value(serde_json::from_value::<T>(value)?)
}

impl Request {
    /// Reads `result` as the type that answers this request and writes it again (fails when it
    /// does not fit the type). The one place that says which result answers which request.
    pub fn check_result(&self, result: Value) -> Result<Value, serde_json::Error> {
        match self {
            Request::Status {} | Request::Pause {} | Request::Resume {} => {
                round_trip::<Status>(result)
            }
            Request::Inspect { what, .. } => match what {
                InspectWhat::Kernel => round_trip::<KernelResult>(result),
                InspectWhat::Symbols => round_trip::<Vec<SymbolLine>>(result),
                InspectWhat::Symbol => round_trip::<Vec<SymbolMatch>>(result),
                InspectWhat::Tasks => round_trip::<Vec<TaskResult>>(result),
                InspectWhat::Stacks => round_trip::<Stacks>(result),
                InspectWhat::Vcpus => round_trip::<Vec<Vcpu>>(result),
                InspectWhat::Modules => round_trip::<Vec<ModuleResult>>(result),
            },
            Request::PatchLoad { .. }
            | Request::PatchInfo { .. }
            | Request::PatchEnable { .. }
            | Request::PatchDisable { .. } => round_trip::<Patch>(result),
            Request::PatchForce { .. } => round_trip::<Forced>(result),
            Request::PatchStatus { .. } => round_trip::<PatchStatus>(result),
            Request::PatchList {} => round_trip::<Vec<Patch>>(result),
            Request::PatchUnload { .. } => round_trip::<Unloaded>(result),
        }
    }
}
