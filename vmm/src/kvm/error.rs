//! Errors of the KVM VMM.

use thiserror::Error;

/// Errors creating, booting or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm ({0}); hvpatch run needs KVM (load kvm_intel/kvm_amd, check permissions)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Loading the kernel or writing boot data failed.
    #[error(transparent)]
    Boot(#[from] super::boot::BootError),
    /// A device could not be created.
    #[error(transparent)]
    Device(#[from] super::devices::DeviceError),
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A host resource (eventfd, thread, signal handler) failed.
    #[error("host: {0}")]
    Host(String),
    /// KVM could not emulate a guest instruction (KVM_EXIT_INTERNAL_ERROR).
    #[error("vCPU {vcpu}: KVM internal error (suberror {suberror}{}) at rip {rip:#x}", if *.suberror == 1 { ": emulation failure" } else { "" })]
    InternalError {
        /// vCPU index.
        vcpu: usize,
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// Guest RIP when it happened.
        rip: u64,
    },
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    #[error("vCPU {vcpu}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// vCPU index.
        vcpu: usize,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// A vCPU exit the VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: usize,
        /// Exit kind.
        exit: String,
    },
    /// The VM was not started, or is already running / finished.
    #[error("VM state: {0}")]
    State(&'static str),
}

impl VmError {
    /// Wraps a KVM ioctl error.
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::Kvm { what, source }
    }
}
