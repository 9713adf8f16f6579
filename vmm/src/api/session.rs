//! A session: one guest (behind [`GuestControl`]) and the state hvpatch keeps about it.
//! Every request runs to completion before the next one starts.

use patcher::GuestControl;
use serde_json::{json, Value};

use super::protocol::{InspectWhat, Request, Response};
use super::server::Handler;

/// The guest plus hvpatch's model of it.
pub struct Session {
    control: Box<dyn GuestControl>,
    host: &'static str,
    /// Whether the operator paused the guest through the API (inspection then leaves it paused).
    user_paused: bool,
}

/// A failed request: (kind, message).
type ReqError = (&'static str, String);

impl Session {
    /// A session over `control`; `host` names the backend ("kvm" or "qemu-attach").
    pub fn new(control: Box<dyn GuestControl>, host: &'static str) -> Session {
        Session {
            control,
            host,
            user_paused: false,
        }
    }

    fn status(&mut self) -> Result<Value, ReqError> {
        Ok(json!({
            "host": self.host,
            "vcpus": self.control.vcpu_count(),
            "paused": self.control.is_paused(),
            "patch_arena": self.control.patch_arena().map(|(s, l)| json!({"start": s, "len": l})),
        }))
    }

    fn pause(&mut self) -> Result<Value, ReqError> {
        self.control.pause().map_err(guest_err)?;
        self.user_paused = true;
        self.status()
    }

    fn resume(&mut self) -> Result<Value, ReqError> {
        self.control.resume().map_err(guest_err)?;
        self.user_paused = false;
        self.status()
    }

    fn inspect(&mut self, what: InspectWhat, name: Option<String>) -> Result<Value, ReqError> {
        let _ = (what, name);
        Err(("unsupported", "inspection is not available yet".into()))
    }
}

fn guest_err(e: patcher::GuestError) -> ReqError {
    ("guest", e.to_string())
}

impl Handler for Session {
    fn handle(&mut self, req: Request) -> Response {
        let r = match req {
            Request::Status {} => self.status(),
            Request::Pause {} => self.pause(),
            Request::Resume {} => self.resume(),
            Request::Inspect { what, name } => self.inspect(what, name),
            Request::PatchLoad { .. }
            | Request::PatchUnload { .. }
            | Request::PatchList {}
            | Request::PatchInfo { .. } => {
                Err(("unsupported", "patching is not available yet".into()))
            }
        };
        match r {
            Ok(v) => Response::ok(v),
            Err((kind, msg)) => Response::err(kind, msg),
        }
    }
}
