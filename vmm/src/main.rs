//! The `hvpatch` command.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{Cli, CliError, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HVPATCH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => vmm::commands::run(args),
        Command::Attach(args) => vmm::commands::attach(args),
        Command::Build(args) => vmm::commands::build(args),
        Command::AttachGuard { qemu_gdb } => Ok(vmm::attach::guard::run_guard(qemu_gdb)),
        other => match &cli.api_socket {
            Some(sock) => vmm::cli::run_client(sock, other).map(|()| 0),
            None => Err(CliError::NoSocket),
        },
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("hvpatch: {e}");
            ExitCode::FAILURE
        }
    }
}
