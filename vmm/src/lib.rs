//! hvpatch-vmm: the KVM VMM, the QEMU attach backend, the API server and the CLI.

pub mod api;
pub mod attach;
pub mod cli;
pub mod commands;
pub mod format;
pub mod journal_key;
pub mod kvm;
