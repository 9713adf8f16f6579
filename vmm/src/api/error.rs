//! Why a request failed: [`ReqError`], a typed error that keeps its cause and names its wire
//! kind ([`ReqError::kind`]). The wire form is unchanged: `{"kind": …, "message": …}`
//! ([`ApiError`]), the message being the error's `Display`.

use introspect::stack::StackError;
use introspect::tasks::TaskError;
use introspect::KernelError;
use patcher::{GuestError, PatchError};
use thiserror::Error;

use super::protocol::{ApiError, Response};

/// A failed request.
#[derive(Debug, Error)]
pub enum ReqError {
    /// The request is malformed or invalid.
    #[error("{0}")]
    BadRequest(String),
    /// More connections than the server serves at once.
    #[error("{0}")]
    Busy(String),
    /// No symbol of that name in the guest kernel.
    #[error("no symbol named {0} in the guest kernel")]
    NoSymbol(String),
    /// No patch of that name is loaded.
    #[error("no patch named {0} is loaded")]
    NoPatch(String),
    /// An unload timed out: the patch is disabled but its pages are kept.
    #[error(transparent)]
    Held(PatchError),
    /// The engine refused the patch or operation; the guest is unchanged.
    #[error(transparent)]
    Patch(PatchError),
    /// The backend failed (guest gone, not paused, …).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The guest kernel could not be understood.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The guest's task list could not be read.
    #[error(transparent)]
    Tasks(#[from] TaskError),
    /// A kernel stack could not be read.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// The module list or a module's symbols could not be read.
    #[error(transparent)]
    Modules(#[from] introspect::ModuleError),
    /// The server stopped while the request waited.
    #[error("the server is stopping; the patch stays disabled and held in the guest")]
    Stopping,
    /// The guest rebooted into another kernel while the request waited.
    #[error("the guest kernel changed (reboot) while the unload waited; its patches are gone")]
    KernelChanged,
    /// A bug in hvpatch.
    #[error("{0}")]
    Internal(String),
}

impl ReqError {
    /// The wire kind (`docs/API.md`, "Response").
    pub fn kind(&self) -> &'static str {
        match self {
            ReqError::BadRequest(_) => "bad_request",
            ReqError::Busy(_) => "busy",
            ReqError::NoSymbol(_) | ReqError::NoPatch(_) => "not_found",
            ReqError::Held(_) => "held",
            ReqError::Patch(_) => "patch",
            ReqError::Guest(_) | ReqError::Stopping | ReqError::KernelChanged => "guest",
            ReqError::Kernel(_)
            | ReqError::Tasks(_)
            | ReqError::Stack(_)
            | ReqError::Modules(_) => "introspect",
            ReqError::Internal(_) => "internal",
        }
    }

    /// The wire form.
    pub fn to_api(&self) -> ApiError {
        ApiError {
            kind: self.kind().to_string(),
            message: self.to_string(),
        }
    }
}

impl From<PatchError> for ReqError {
    fn from(e: PatchError) -> Self {
        match e {
            PatchError::NotLoaded(name) => ReqError::NoPatch(name),
            PatchError::Held { .. } => ReqError::Held(e),
            // The backend failed under the engine: the guest's fault, not the patch's.
            PatchError::Guest(g) => ReqError::Guest(g),
            other => ReqError::Patch(other),
        }
    }
}

impl From<serde_json::Error> for ReqError {
    fn from(e: serde_json::Error) -> Self {
        ReqError::Internal(format!("serializing the result: {e}"))
    }
}

impl From<ReqError> for Response {
    fn from(e: ReqError) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(e.to_api()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_causes() {
        let e = ReqError::from(PatchError::NotLoaded("p".into()));
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            ("not_found", "no patch named p is loaded")
        );
        let e = ReqError::from(PatchError::Guest(GuestError::NotPaused));
        assert_eq!(e.kind(), "guest");
        assert!(matches!(e, ReqError::Guest(GuestError::NotPaused)));
        let e = ReqError::from(PatchError::AlreadyLoaded("p".into()));
        assert_eq!(e.kind(), "patch");
        assert!(e.to_string().contains("already loaded"));
        let r = Response::from(ReqError::BadRequest("x".into()));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":{"kind":"bad_request","message":"x"}}"#
        );
        let e = ReqError::from(KernelError::NoLongModeVcpu);
        assert_eq!(e.kind(), "introspect");
    }
}
