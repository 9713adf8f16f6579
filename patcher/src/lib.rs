//! hvpatch-patcher: patch objects, linker, arena, entry rewrite and the consistency engine.
//! It reaches the guest only through [`guest::GuestControl`].

pub mod guest;

pub use guest::{GuestControl, GuestError, GuestEvent};
