//! The API wire format: one JSON object per line over a Unix stream socket.
//!
//! Request: `{"op": "<operation>", ...arguments}`. Response: `{"ok": true, "result": <value>}` or
//! `{"ok": false, "error": {"kind": "<kind>", "message": "<text>"}}`. See `docs/API.md`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest request line accepted (a patch object travels inside it, base64-encoded).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// What `inspect` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InspectWhat {
    /// Release, KASLR slide, paging mode, table locations.
    Kernel,
    /// The whole symbol table, vmlinux then every loaded module, in /proc/kallsyms order.
    Symbols,
    /// The symbols with one name (every `sympos`).
    Symbol,
    /// The task list.
    Tasks,
    /// The kernel stack of every task and vCPU with a reliability verdict.
    Stacks,
    /// Per-vCPU registers, mode and current task.
    Vcpus,
    /// Loaded modules: name, state, size, core and init text/data regions.
    Modules,
}

/// One API request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Host, vCPU count, paused or running, loaded patches.
    Status {},
    /// Pause all vCPUs.
    Pause {},
    /// Resume all vCPUs.
    Resume {},
    /// Introspect the guest kernel.
    Inspect {
        /// What to report.
        what: InspectWhat,
        /// Symbol name, for `what = symbol`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Load and enable a patch object: a transition of the consistency model (tasks switch one
    /// by one), or every task at once for an immediate patch.
    PatchLoad {
        /// The relocatable ELF object, base64-encoded.
        object_base64: String,
        /// The object's file name (names the patch unless it declares a name).
        file_name: String,
        /// Switch every task at once, without the consistency model (default: as the patch
        /// says with `HVPATCH_PATCH_FLAGS`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        immediate: Option<bool>,
        /// Answer once the transition completed (default true); false: at once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<bool>,
        /// Reverse the transition when it has not completed after this many ms (default
        /// 60 000 when waiting, none otherwise).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// How tasks switch at kernel exit and in idle: `guest_hooks` (default) or
        /// `breakpoints`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switcher: Option<patcher::Switcher>,
    },
    /// Enable a disabled patch (a transition to patched).
    PatchEnable {
        /// Patch name.
        name: String,
        /// Answer once the transition completed (default true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<bool>,
        /// Reverse after this many ms (default 60 000 when waiting).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// How tasks switch at kernel exit and in idle: `guest_hooks` (default) or
        /// `breakpoints`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switcher: Option<patcher::Switcher>,
    },
    /// Disable an enabled patch (a transition to unpatched); it stays loaded. Disabling a
    /// patch in transition reverses the transition.
    PatchDisable {
        /// Patch name.
        name: String,
        /// Answer once the transition completed (default true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<bool>,
        /// Reverse after this many ms (default 60 000 when waiting).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// How tasks switch at kernel exit and in idle: `guest_hooks` (default) or
        /// `breakpoints`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        switcher: Option<patcher::Switcher>,
    },
    /// Complete a stuck transition at once, switching every task without checks.
    PatchForce {
        /// Patch name (must be the one in transition).
        name: String,
    },
    /// The transition in progress (tasks, blockers) and the loaded patches.
    PatchStatus {
        /// Only this patch (its transition, if it is the one in transition).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Unload a patch by name: disable it (a transition for a consistent patch, at once for an
    /// immediate one), then wait (up to `timeout_ms`, default 10 s in all) until nothing in the
    /// guest can reach its code or data, and free them.
    PatchUnload {
        /// Patch name.
        name: String,
        /// Longest wait for the patch's pages to become unreachable, ms.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// List loaded patches.
    PatchList {},
    /// One patch in detail.
    PatchInfo {
        /// Patch name.
        name: String,
    },
}

/// Error details in a failed response (made from a typed
/// [`ReqError`](super::error::ReqError)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable category (`bad_request`, `guest`, `introspect`, `patch`, ...).
    pub kind: String,
    /// Human-readable message naming the problem.
    pub message: String,
}

/// One API response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    /// A successful response.
    pub fn ok(result: Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r: Request =
            serde_json::from_str(r#"{"op":"inspect","what":"symbol","name":"x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Inspect {
                what: InspectWhat::Symbol,
                name: Some("x".into())
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status {});
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"status","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"inspect","what":"nope"}"#).is_err());
    }
}
