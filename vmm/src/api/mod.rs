//! The hvpatch API: wire protocol, server, client and the session that runs requests
//! against a guest. Both hosts (our KVM VMM and QEMU attach) serve the same API.

pub mod client;
pub mod error;
pub mod protocol;
pub mod server;
pub mod session;
pub mod types;

pub use error::ReqError;
pub use protocol::{InspectWhat, Request, Response};
pub use server::{Handler, Reply, Server, ServerError};
pub use session::Session;
