//! hvpatch-patcher: patch objects, linker, arena, entry rewrite and the consistency engine.
//! It reaches the guest only through [`guest::GuestControl`].

pub mod build;
pub mod guest;
pub mod link;
pub mod patchobj;

pub use guest::{GuestControl, GuestError, GuestEvent};
