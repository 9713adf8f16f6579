//! What the consistency model asks of the guest kernel: its tasks with their livepatch state,
//! their reliably unwound stacks, and a few symbols ([`TaskView`], implemented for
//! `introspect::Kernel` in [`crate::kernel`]). Valid for one pause of every vCPU.

use introspect::{PhysMemory, VcpuRegs};
use serde::{Deserialize, Serialize};

use crate::dispatch::TaskStateLayout;

/// `TIF_PATCH_PENDING` (x86-64, 6.1 and 6.12: bit 13 of `thread_info.flags`).
pub const TIF_PATCH_PENDING: u64 = 1 << 13;

/// One task as the transition sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSnap {
    /// `struct task_struct *`.
    #[serde(with = "introspect::hex")]
    pub addr: u64,
    /// Thread id.
    pub pid: i32,
    /// Process id.
    pub tgid: i32,
    /// Name as /proc/PID/comm shows it.
    pub comm: String,
    /// `task_struct.patch_state` (-1 none, 0 unpatched, 1 patched).
    pub patch_state: i32,
    /// `thread_info.flags`.
    #[serde(with = "introspect::hex")]
    pub flags: u64,
    /// The vCPU this task is `current` on.
    pub vcpu: Option<usize>,
    /// Running on a vCPU in user mode (no kernel frames).
    pub user_mode: bool,
    /// A CPU's idle task.
    pub is_idle: bool,
    /// The task as the view read it, so that [`TaskView::stack`] need not read it again in the
    /// same pause (views that keep nothing leave it `None`).
    #[serde(skip)]
    pub raw: Option<Box<introspect::tasks::Task>>,
}

/// A task's kernel stack.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StackSnap {
    /// Return addresses, innermost first.
    #[serde(with = "introspect::hex")]
    pub frames: Vec<u64>,
    /// Whether the first frame is an exact ip (a running task's), not a return address.
    pub first_exact: bool,
    /// The frames symbolized (`name+0xoff/0xsize`, bare addresses for patch code).
    pub rendered: Vec<String>,
    /// Whether livepatch's `arch_stack_walk_reliable()` rules accept it.
    pub reliable: bool,
    /// Why not.
    pub reason: Option<String>,
}

/// The guest kernel's tasks and stacks, for transitions.
pub trait TaskView {
    /// Where the dispatcher finds `current->patch_state`; `None` on a kernel without
    /// `task_struct.patch_state` (no CONFIG_LIVEPATCH).
    fn task_state_layout(&self, mem: &dyn PhysMemory) -> Option<TaskStateLayout>;
    /// `struct klp_patch`: (size, offset of `list`, offset of `obj_list`), from BTF.
    fn klp_patch_layout(&self, mem: &dyn PhysMemory) -> Option<(u64, u64, u64)>;
    /// Offset of `thread_info.flags` in `task_struct`.
    fn flags_offset(&self, mem: &dyn PhysMemory) -> u64;
    /// Every task: all threads and every CPU's idle task. Called with all vCPUs paused.
    fn tasks(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs]) -> Result<Vec<TaskSnap>, String>;
    /// The task that is `current` on vCPU `vcpu` (read on its own: cheaper than
    /// [`TaskView::tasks`]). Called with all vCPUs paused.
    fn current(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        vcpu: usize,
    ) -> Result<TaskSnap, String>;
    /// The reliably unwound stack of `task` (from its vCPU's registers when it is running).
    fn stack(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs], task: &TaskSnap) -> StackSnap;
    /// [`TaskView::stack`] without the symbolized frames (`rendered` may be empty): what a
    /// stack check needs for the many tasks that pass it.
    fn stack_frames(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs], task: &TaskSnap) -> StackSnap {
        self.stack(mem, vcpus, task)
    }
    /// Declares the patch code that keeps frame pointers (see
    /// `introspect::Kernel::set_frame_pointer_text`).
    fn set_frame_pointer_text(&self, ranges: &[(u64, u64)]);
    /// Declares return addresses in prologue trampolines that stand for return addresses in
    /// the original functions (see `introspect::Kernel::set_text_aliases`): a task that
    /// called out of a trampoline is inside the old function. Views without an unwinder of
    /// their own ignore it.
    fn set_text_aliases(&self, _aliases: &[(u64, u64)]) {}
    /// `[start, end)` of the kernel function containing `addr` (kallsyms).
    fn function_range(&self, addr: u64) -> Option<(u64, u64)>;
    /// Address of a unique symbol.
    fn symbol(&self, name: &str) -> Option<u64>;
    /// Guest-physical address of kernel virtual address `va`.
    fn translate(&self, mem: &dyn PhysMemory, va: u64) -> Option<u64>;
    /// Every register and live stack slot holding an address in one of `ranges` (as
    /// [`crate::Reachability::references`]); `None` when this view cannot tell. Called with all
    /// vCPUs paused.
    fn live_references(
        &self,
        _mem: &dyn PhysMemory,
        _vcpus: &[VcpuRegs],
        _ranges: &[(u64, u64)],
    ) -> Option<Result<Vec<introspect::live::Reference>, String>> {
        None
    }
    /// Address of function `name` (klp sympos, counted within the module) in the live kernel
    /// module `module`, read now; `Err` says why not (not loaded, being loaded or unloaded,
    /// unknown there, or this view knows no modules).
    fn module_function(
        &self,
        _mem: &dyn PhysMemory,
        module: &str,
        _name: &str,
        _sympos: u64,
    ) -> Result<u64, String> {
        Err(format!(
            "module {module}: this view has no module information"
        ))
    }
}
