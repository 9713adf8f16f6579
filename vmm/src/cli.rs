//! The `hvpatch` command line: servers (`run`, `attach`), the patch compiler (`build`) and the
//! API client commands (`vm`, `inspect`, `patch`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use clap::{Parser, Subcommand};
use serde_json::Value;
use thiserror::Error;

use crate::api::client::{self, ClientError};
use crate::api::protocol::{InspectWhat, Request};

/// Live-patch guest Linux kernels from the hypervisor.
#[derive(Debug, Parser)]
#[command(name = "hvpatch", version, about)]
pub struct Cli {
    /// API socket of a running `hvpatch run` / `hvpatch attach` server (client commands).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest in the hvpatch KVM VMM and serve the API.
    Run(RunArgs),
    /// Attach to a running QEMU VM through its gdbstub and serve the API.
    Attach(AttachArgs),
    /// Compile a patch source file into a patch object with the guest kernel's flags.
    Build(BuildArgs),
    /// VM control: status, pause, resume.
    Vm {
        /// Operation.
        #[command(subcommand)]
        op: VmOp,
    },
    /// Introspect the guest kernel.
    Inspect {
        /// What to show.
        what: InspectWhat,
        /// Symbol name (for `symbol`).
        name: Option<String>,
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Load, unload and list patches.
    Patch {
        /// Operation.
        #[command(subcommand)]
        op: PatchOp,
    },
    /// Internal: the guard `hvpatch attach` starts (see `vmm::attach::guard`).
    #[command(name = "__attach-guard", hide = true)]
    AttachGuard {
        /// The gdbstub socket to detach from if the parent dies.
        #[arg(long)]
        qemu_gdb: PathBuf,
    },
}

/// `hvpatch run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel: bzImage or vmlinux ELF.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory (e.g. 512M, 2G).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Where the serial console goes: `stdio` or a file path.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Size of the e820-reserved patch arena (e.g. 2M).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    pub patch_arena: u64,
    /// API socket to serve.
    #[arg(long)]
    pub api_socket: PathBuf,
}

/// `hvpatch attach` arguments.
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// QEMU's gdbstub Unix socket (`-chardev socket,id=gdb0,path=SOCKET,server=on,wait=off -gdb chardev:gdb0`).
    #[arg(long)]
    pub qemu_gdb: PathBuf,
    /// QEMU's guest RAM file (`-object memory-backend-file,mem-path=FILE,share=on`).
    #[arg(long)]
    pub qemu_mem: PathBuf,
    /// How the RAM file maps to guest-physical memory: `flat` (QEMU pc/q35 guests up to
    /// 2.75 GiB) or `split:<SIZE>` (the first SIZE bytes at 0, the rest at 4 GiB; SIZE is
    /// QEMU's below-4G RAM, e.g. `split:2G` for q35 guests larger than 2 GiB).
    #[arg(long, default_value = "flat", value_parser = parse_mem_layout)]
    pub qemu_mem_layout: crate::attach::MemLayout,
    /// API socket to serve.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Where the engine's state (patches, function stacks, a transition in progress) is kept
    /// after every change, so that a restarted `hvpatch attach` continues where a dead one
    /// stopped (default: the API socket's path + `.state`).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// The host key authenticating the journal of the engine state that hvpatch keeps in guest
    /// memory, from which a restarted `hvpatch attach` continues when the state file is gone
    /// (made on first use, mode 0600; default `$XDG_STATE_HOME/hvpatch/journal.key`, else
    /// `~/.local/state/hvpatch/journal.key`).
    #[arg(long, conflicts_with = "no_journal")]
    pub journal_key: Option<PathBuf>,
    /// Keep no journal in guest memory (a restart then needs the state file).
    #[arg(long)]
    pub no_journal: bool,
}

/// Parses `flat` or `split:<SIZE>`.
pub fn parse_mem_layout(s: &str) -> Result<crate::attach::MemLayout, String> {
    match s.split_once(':') {
        None if s == "flat" => Ok(crate::attach::MemLayout::Flat),
        Some(("split", size)) => Ok(crate::attach::MemLayout::Split {
            low: parse_size(size)?,
        }),
        _ => Err(format!(
            "unknown memory layout {s:?}: use flat or split:<SIZE>"
        )),
    }
}

/// `hvpatch build` arguments.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Patch source (C).
    pub source: PathBuf,
    /// Output object.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Guest kernel release the patch is for (recorded in the object; load refuses others).
    #[arg(long)]
    pub kernel_release: Option<String>,
    /// C compiler.
    #[arg(long, default_value = "gcc")]
    pub cc: String,
    /// Extra include directories.
    #[arg(short = 'I')]
    pub include: Vec<PathBuf>,
}

/// `hvpatch vm` operations.
#[derive(Debug, Subcommand)]
pub enum VmOp {
    /// Host, vCPUs, running or paused.
    Status {
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
}

/// Arguments of `patch enable` and `patch disable`.
#[derive(Debug, clap::Args)]
pub struct SwitchArgs {
    /// Patch name.
    pub name: String,
    /// Return at once; follow the transition with `patch status`.
    #[arg(long)]
    pub no_wait: bool,
    /// Reverse the transition if it has not completed after SECS (default 60).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// How tasks switch at kernel exit and in idle: `guest-hooks` (the guest's own klp
    /// hooks, no VM exit; the default) or `breakpoints` (hardware breakpoints, a VM exit per
    /// crossing).
    #[arg(long, value_name = "MECHANISM")]
    pub switcher: Option<patcher::Switcher>,
    /// Print the raw JSON result.
    #[arg(long)]
    pub json: bool,
}

/// `hvpatch patch` operations.
#[derive(Debug, Subcommand)]
pub enum PatchOp {
    /// Load and enable a patch object. Tasks switch one by one (the consistency model); it
    /// waits, showing progress, until every task runs the new code.
    Load {
        /// Patch object built by `hvpatch build`.
        file: PathBuf,
        /// Return at once; follow the transition with `patch status`.
        #[arg(long)]
        no_wait: bool,
        /// Reverse the transition if it has not completed after SECS (default 60 when
        /// waiting, none with --no-wait).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Switch every task at once, without the consistency model.
        #[arg(long)]
        immediate: bool,
        /// How tasks switch at kernel exit and in idle: `guest-hooks` (default) or
        /// `breakpoints`.
        #[arg(long, value_name = "MECHANISM")]
        switcher: Option<patcher::Switcher>,
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Enable a disabled patch (a transition to patched).
    Enable(SwitchArgs),
    /// Disable a patch (a transition to unpatched; it stays loaded). Disabling a patch in
    /// transition reverses it.
    Disable(SwitchArgs),
    /// The transition in progress: direction, every task's state, the tasks that block it
    /// and why, with their stacks.
    Status {
        /// Only this patch.
        name: Option<String>,
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Complete a stuck transition now, switching the tasks that still block it (they may
    /// run a mix of old and new code). Prints the tasks it overrode.
    Force {
        /// Patch name.
        name: String,
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Unload a patch: disable it (a transition), then free it.
    Unload {
        /// Patch name.
        name: String,
        /// Longest wait, in seconds, for the disabled patch's code and data to become
        /// unreachable before they are freed (default 10). On timeout the patch stays
        /// disabled and held, and the server frees it later.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// List loaded patches.
    List {
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
    /// Show one patch.
    Info {
        /// Patch name.
        name: String,
        /// Print the raw JSON result.
        #[arg(long)]
        json: bool,
    },
}

/// Errors of the CLI.
#[derive(Debug, Error)]
pub enum CliError {
    /// A client command without `--api-socket`.
    #[error("this command talks to a server: give --api-socket PATH (before the command)")]
    NoSocket,
    /// Talking to the server failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server refused the request.
    #[error("{kind}: {message}")]
    Api {
        /// Error kind.
        kind: String,
        /// Message.
        message: String,
    },
    /// Reading an input file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

/// Parses sizes like `512M`, `2G`, `4096`, `64K`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// How long a client waits for the server (patch loads under TCG can take a while).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends `req` and returns the result value, or the server's error.
pub fn request(socket: &Path, req: &Request) -> Result<Value, CliError> {
    request_with(socket, req, CLIENT_TIMEOUT)
}

/// [`request`] with its own response timeout.
pub fn request_with(socket: &Path, req: &Request, timeout: Duration) -> Result<Value, CliError> {
    let resp = client::call(socket, req, timeout)?;
    if resp.ok {
        Ok(resp.result.unwrap_or(Value::Null))
    } else {
        let e = resp
            .error
            .unwrap_or_else(|| crate::api::protocol::ApiError {
                kind: "unknown".into(),
                message: "the server gave no error details".into(),
            });
        Err(CliError::Api {
            kind: e.kind,
            message: e.message,
        })
    }
}

/// Runs a client command (`vm`, `inspect`, `patch`) against the server at `socket`.
pub fn run_client(socket: &Path, command: &Command) -> Result<(), CliError> {
    match command {
        Command::Vm { op } => {
            let (req, json) = match op {
                VmOp::Status { json } => (Request::Status {}, *json),
                VmOp::Pause => (Request::Pause {}, false),
                VmOp::Resume => (Request::Resume {}, false),
            };
            print_result(&request(socket, &req)?, json, crate::format::status);
        }
        Command::Inspect { what, name, json } => {
            if *what == InspectWhat::Symbol && name.is_none() {
                return Err(CliError::Other("inspect symbol needs a NAME".into()));
            }
            let v = request(
                socket,
                &Request::Inspect {
                    what: *what,
                    name: name.clone(),
                },
            )?;
            let f = match what {
                InspectWhat::Kernel => crate::format::kernel,
                InspectWhat::Symbols => crate::format::symbols,
                InspectWhat::Symbol => crate::format::symbol,
                InspectWhat::Tasks => crate::format::tasks,
                InspectWhat::Stacks => crate::format::stacks,
                InspectWhat::Vcpus => crate::format::vcpus,
                InspectWhat::Modules => crate::format::modules,
            };
            print_result(&v, *json, f);
        }
        Command::Patch { op } => match op {
            PatchOp::Load {
                file,
                no_wait,
                timeout,
                immediate,
                switcher,
                json,
            } => {
                let bytes = std::fs::read(file).map_err(|source| CliError::Read {
                    path: file.clone(),
                    source,
                })?;
                let file_name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let timeout_ms = secs_to_ms(*timeout)?;
                let req = Request::PatchLoad {
                    object_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                    file_name,
                    immediate: immediate.then_some(true),
                    wait: Some(!no_wait),
                    timeout_ms,
                    switcher: *switcher,
                };
                let v = waiting(socket, &req, !*no_wait && !*json, timeout_ms)?;
                print_result(&v, *json, crate::format::patch);
            }
            PatchOp::Enable(a) | PatchOp::Disable(a) => {
                let SwitchArgs {
                    name,
                    no_wait,
                    timeout,
                    switcher,
                    json,
                } = a;
                let timeout_ms = secs_to_ms(*timeout)?;
                let (name, wait) = (name.clone(), Some(!no_wait));
                let req = if matches!(op, PatchOp::Enable(_)) {
                    Request::PatchEnable {
                        name,
                        wait,
                        timeout_ms,
                        switcher: *switcher,
                    }
                } else {
                    Request::PatchDisable {
                        name,
                        wait,
                        timeout_ms,
                        switcher: *switcher,
                    }
                };
                let v = waiting(socket, &req, !*no_wait && !*json, timeout_ms)?;
                print_result(&v, *json, crate::format::patch);
            }
            PatchOp::Status { name, json } => {
                let v = request(socket, &Request::PatchStatus { name: name.clone() })?;
                print_result(&v, *json, crate::format::patch_status);
            }
            PatchOp::Force { name, json } => {
                let v = request(socket, &Request::PatchForce { name: name.clone() })?;
                if let Some(o) = v["overridden"].as_array().filter(|o| !o.is_empty()) {
                    eprintln!(
                        "warning: forced {name}: {} task(s) were switched while the transition still waited for them and may run a mix of old and new code:",
                        o.len()
                    );
                    for b in o {
                        eprintln!(
                            "  pid {} ({}): {}",
                            b["pid"],
                            b["comm"].as_str().unwrap_or("?"),
                            crate::format::why(&b["why"])
                        );
                    }
                }
                if *json {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    print_result(&v["patch"], false, crate::format::patch);
                }
            }
            PatchOp::Unload {
                name,
                timeout,
                json,
            } => {
                let timeout_ms = secs_to_ms(*timeout)?;
                let wait = Duration::from_millis(timeout_ms.unwrap_or(10_000));
                let v = request_with(
                    socket,
                    &Request::PatchUnload {
                        name: name.clone(),
                        timeout_ms,
                    },
                    CLIENT_TIMEOUT + wait,
                )?;
                print_result(&v, *json, crate::format::unloaded);
            }
            PatchOp::List { json } => print_result(
                &request(socket, &Request::PatchList {})?,
                *json,
                crate::format::patch_list,
            ),
            PatchOp::Info { name, json } => {
                let v = request(socket, &Request::PatchInfo { name: name.clone() })?;
                print_result(&v, *json, crate::format::patch);
            }
        },
        Command::Run(_) | Command::Attach(_) | Command::Build(_) | Command::AttachGuard { .. } => {
            return Err(CliError::Other("not a client command".into()))
        }
    }
    Ok(())
}

fn print_result(v: &Value, json: bool, human: fn(&Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", human(v));
    }
}

/// `--timeout SECS` in ms (0 to 3600 s).
fn secs_to_ms(t: Option<f64>) -> Result<Option<u64>, CliError> {
    match t {
        Some(t) if t.is_finite() && (0.0..=3600.0).contains(&t) => Ok(Some((t * 1000.0) as u64)),
        Some(t) => Err(CliError::Other(format!(
            "--timeout {t}: give seconds between 0 and 3600"
        ))),
        None => Ok(None),
    }
}

/// Sends `req`, which may wait for a transition (up to its timeout, then as long again for
/// the reversal); with `progress`, prints the transition's state to stderr every second
/// meanwhile (from a second connection).
fn waiting(
    socket: &Path,
    req: &Request,
    progress: bool,
    timeout_ms: Option<u64>,
) -> Result<Value, CliError> {
    let limit = CLIENT_TIMEOUT + Duration::from_millis(timeout_ms.unwrap_or(60_000)) * 2;
    if !progress {
        return request_with(socket, req, limit);
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut last = String::new();
            let t0 = std::time::Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                if t0.elapsed() < Duration::from_millis(900) {
                    continue;
                }
                let Ok(v) = request(socket, &Request::PatchStatus { name: None }) else {
                    continue;
                };
                let line = crate::format::progress(&v);
                if !line.is_empty()
                    && line != last
                    && !done.load(std::sync::atomic::Ordering::Relaxed)
                {
                    eprintln!("{line}");
                    last = line;
                }
            }
        });
        let r = request_with(socket, req, limit);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn command_line_shapes() {
        Cli::try_parse_from([
            "hvpatch",
            "--api-socket",
            "/s",
            "inspect",
            "symbol",
            "foo",
            "--json",
        ])
        .unwrap();
        Cli::try_parse_from(["hvpatch", "--api-socket", "/s", "patch", "load", "p.o"]).unwrap();
        Cli::try_parse_from(["hvpatch", "--api-socket", "/s", "vm", "pause"]).unwrap();
        Cli::try_parse_from([
            "hvpatch",
            "run",
            "--kernel",
            "k",
            "--api-socket",
            "/s",
            "--memory",
            "1G",
        ])
        .unwrap();
        assert!(Cli::try_parse_from(["hvpatch", "inspect", "bogus"]).is_err());
        assert_eq!(
            parse_mem_layout("split:2G"),
            Ok(crate::attach::MemLayout::Split { low: 2 << 30 })
        );
        assert_eq!(parse_mem_layout("flat"), Ok(crate::attach::MemLayout::Flat));
        assert!(parse_mem_layout("split").is_err() && parse_mem_layout("weird:1").is_err());
    }
}
