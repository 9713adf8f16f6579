//! hvpatch-vmm: the KVM VMM, the QEMU attach backend, the API server and the CLI.

pub mod attach;
pub mod kvm;
