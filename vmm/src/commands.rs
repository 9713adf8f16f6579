//! The server and build commands: `hvpatch run`, `hvpatch attach`, `hvpatch build`.

use crate::api::{Server, Session};
use crate::cli::{AttachArgs, BuildArgs, CliError, RunArgs};

/// `hvpatch run`: boot a guest in the KVM VMM and serve the API until it exits.
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other(
        "hvpatch run: the KVM VMM is not wired up yet".into(),
    ))
}

/// `hvpatch attach`: attach to QEMU and serve the API until interrupted.
pub fn attach(args: &AttachArgs) -> Result<(), CliError> {
    let _ = (args, Server::bind, Session::new);
    Err(CliError::Other(
        "hvpatch attach: the QEMU backend is not wired up yet".into(),
    ))
}

/// `hvpatch build`: compile a patch.
pub fn build(args: &BuildArgs) -> Result<(), CliError> {
    let _ = args;
    Err(CliError::Other("hvpatch build: not wired up yet".into()))
}
