//! The real `hvpatch` binary serving a harness guest: `hvpatch attach` against QEMU's gdbstub and
//! RAM file, driven through the CLI exactly as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::Guest;

/// Errors running the `hvpatch` binary.
#[derive(Debug, Error)]
pub enum HvpatchError {
    /// Building or finding the binary failed.
    #[error("cannot build the hvpatch binary: {0}")]
    Build(String),
    /// Spawning failed.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command.
        cmd: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server did not come up.
    #[error("hvpatch attach did not create its API socket within {0:?}; its log:\n{1}")]
    NoSocket(Duration, String),
    /// A CLI command failed.
    #[error("`hvpatch {args}` failed ({status}):\n{stderr}")]
    Failed {
        /// Arguments.
        args: String,
        /// Exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// `--json` output did not parse.
    #[error("`hvpatch {0}` printed invalid JSON: {1}")]
    Json(String, String),
}

/// Path of the `hvpatch` binary of this build profile, built on first use.
pub fn hvpatch_bin() -> Result<PathBuf, HvpatchError> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        // Tests run from target/<profile>/deps/; the binary lives in target/<profile>/.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut dir = exe.parent().ok_or("no exe dir")?.to_path_buf();
        if dir.ends_with("deps") || dir.ends_with("examples") {
            dir.pop();
        }
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "hvpatch-vmm", "--bin", "hvpatch"]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let bin = dir.join("hvpatch");
        if bin.exists() {
            Ok(bin)
        } else {
            Err(format!("{} missing after cargo build", bin.display()))
        }
    })
    .clone()
    .map_err(HvpatchError::Build)
}

/// Output of one CLI run.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Whether it exited 0.
    pub success: bool,
    /// Exit status as text.
    pub status: String,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

/// Runs `hvpatch ARGS` and returns its output whatever the exit status.
pub fn hvpatch(args: &[&str]) -> Result<CliOutput, HvpatchError> {
    let bin = hvpatch_bin()?;
    let out = Command::new(&bin)
        .args(args)
        .output()
        .map_err(|source| HvpatchError::Spawn {
            cmd: bin.display().to_string(),
            source,
        })?;
    Ok(CliOutput {
        success: out.status.success(),
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// An `hvpatch attach` server for a harness guest. Killed on drop.
pub struct AttachServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl std::fmt::Debug for AttachServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachServer").finish_non_exhaustive()
    }
}

impl AttachServer {
    /// Starts `hvpatch attach` on `guest`'s gdbstub and RAM file, with the journal key in the
    /// guest's directory.
    pub fn start(guest: &Guest) -> Result<AttachServer, HvpatchError> {
        Self::start_with(guest, &[])
    }

    /// [`AttachServer::start`] with more arguments for `hvpatch attach` (they come last, so
    /// that e.g. `--journal-key` overrides the harness's own).
    pub fn start_with(guest: &Guest, extra: &[&str]) -> Result<AttachServer, HvpatchError> {
        let bin = hvpatch_bin()?;
        let dir = guest
            .mem_file()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let socket = dir.join(format!("hvpatch-api-{}.sock", std::process::id()));
        // A killed earlier server leaves its socket file behind; wait for a fresh one.
        let _ = std::fs::remove_file(&socket);
        let log = dir.join("hvpatch-attach.log");
        let logf = std::fs::File::create(&log).map_err(|source| HvpatchError::Spawn {
            cmd: log.display().to_string(),
            source,
        })?;
        let errf = logf.try_clone().map_err(|source| HvpatchError::Spawn {
            cmd: log.display().to_string(),
            source,
        })?;
        let child = Command::new(&bin)
            .arg("attach")
            .arg("--qemu-gdb")
            .arg(guest.gdb_socket())
            .arg("--qemu-mem")
            .arg(guest.mem_file())
            .arg("--api-socket")
            .arg(&socket)
            .args(
                if extra
                    .iter()
                    .any(|a| a.starts_with("--journal-key") || *a == "--no-journal")
                {
                    Vec::new()
                } else {
                    vec![
                        "--journal-key".into(),
                        dir.join("journal.key").display().to_string(),
                    ]
                },
            )
            .args(extra)
            .env(
                "HVPATCH_LOG",
                std::env::var("HVPATCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .map_err(|source| HvpatchError::Spawn {
                cmd: bin.display().to_string(),
                source,
            })?;
        let mut server = AttachServer { child, socket, log };
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        while !server.socket.exists() {
            if start.elapsed() > timeout || matches!(server.child.try_wait(), Ok(Some(_))) {
                return Err(HvpatchError::NoSocket(timeout, server.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// Kills the server with SIGKILL (no clean-up of its own) and waits for it to be gone.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The state file next to the API socket.
    pub fn state_file(&self) -> PathBuf {
        PathBuf::from(format!("{}.state", self.socket.display()))
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `hvpatch --api-socket SOCKET ARGS`.
    pub fn cli(&self, args: &[&str]) -> Result<CliOutput, HvpatchError> {
        let sock = self.socket.display().to_string();
        let mut all = vec!["--api-socket", sock.as_str()];
        all.extend_from_slice(args);
        hvpatch(&all)
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String, HvpatchError> {
        let out = self.cli(args)?;
        if out.success {
            Ok(out.stdout)
        } else {
            Err(HvpatchError::Failed {
                args: args.join(" "),
                status: out.status,
                stderr: out.stderr,
            })
        }
    }

    /// Runs a CLI command with `--json` that must succeed; returns the parsed result.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value, HvpatchError> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli_ok(&all)?;
        serde_json::from_str(&out).map_err(|e| HvpatchError::Json(args.join(" "), e.to_string()))
    }
}

impl Drop for AttachServer {
    fn drop(&mut self) {
        // SIGTERM first: hvpatch detaches from the gdbstub and leaves the guest running.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
