//! hvpatch-patcher: patch objects, linker, arena, entry rewrite and the consistency engine.
//! It reaches the guest only through [`guest::GuestControl`].

pub mod arena;
pub mod build;
pub mod consistency;
pub mod dispatch;
pub mod engine;
pub mod ftrace_recs;
mod func_stack;
/// The guest-control trait, from its own crate (`hvpatch-guest-control`).
pub use guest_control as guest;
pub mod info;
pub mod journal;
pub mod kernel;
pub mod link;
pub mod modwait;
pub mod paging;
pub mod patchobj;
pub mod plan;
pub mod prologue;
pub mod prologue_plan;
pub mod reach;
pub mod site;
pub mod symbols;
pub mod transition;
mod txn;
pub mod unload;
pub mod view;

pub use consistency::{LoadOptions, StepOutcome, SwitchOptions, TransitionStatus};
pub use engine::{Engine, FuncInfo, PatchError, PatchInfo, PatchState, Target};
pub use guest::{GuestControl, GuestError, GuestEvent};
pub use paging::KernelPaging;
pub use reach::{Hold, Reachability};
pub use symbols::{SymbolMap, SymbolSource};
pub use transition::Switcher;
pub use unload::{UnloadProgress, UnloadReport};
