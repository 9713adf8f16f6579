//! A booted QEMU guest and its shell.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::console::{Console, WaitError};
use crate::images::{find_kernel, KernelSeries};
use crate::qmp::Qmp;
use crate::HarnessError;

/// How much console/log tail goes into error messages.
const TAIL: usize = 3000;
/// Longest line the guest tty accepts in canonical mode (N_TTY_BUF_SIZE is 4096).
const MAX_LINE: usize = 4000;
/// Line the test initramfs prints right before starting the shell.
const READY: &[u8] = b"hvpatch-guest: ready";

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Kernel series (6.1 boots with `-cpu max,la57=off`, 6.12 with `-cpu max`).
    pub series: KernelSeries,
    /// Appended to the kernel command line `console=ttyS0 panic=-1` (KASLR stays on).
    pub extra_cmdline: String,
    /// Number of vCPUs (default 2).
    pub vcpus: u32,
    /// Guest RAM in MiB (default 512).
    pub mem_mib: u64,
    /// Time allowed until the guest's shell is ready (default 120 s).
    pub boot_timeout: Duration,
    /// Default timeout of [`Guest::run`] and friends (default 120 s).
    pub cmd_timeout: Duration,
    /// Console log level set with `dmesg -n` after boot so kernel messages do not mix into
    /// command output (default `Some(1)`: only emergencies; `None` leaves the kernel default).
    /// Read kernel messages with `dmesg`.
    pub console_loglevel: Option<u8>,
    /// Extra files for the guest's root file system, `(path, contents)`: appended to the test
    /// initramfs as a second cpio archive (the kernel unpacks concatenated archives).
    pub extra_files: Vec<(String, Vec<u8>)>,
}

impl GuestSpec {
    /// Defaults for `series`: 2 vCPUs, 512 MiB, 120 s boot and command timeouts.
    pub fn new(series: KernelSeries) -> GuestSpec {
        GuestSpec {
            series,
            extra_cmdline: String::new(),
            vcpus: 2,
            mem_mib: 512,
            boot_timeout: Duration::from_secs(120),
            cmd_timeout: Duration::from_secs(120),
            console_loglevel: Some(1),
            extra_files: Vec::new(),
        }
    }

    /// Adds a file to the guest's root file system (see [`GuestSpec::extra_files`]).
    pub fn file(mut self, path: &str, contents: Vec<u8>) -> GuestSpec {
        self.extra_files.push((path.to_string(), contents));
        self
    }

    /// Adds kernel command-line arguments.
    pub fn cmdline(mut self, extra: &str) -> GuestSpec {
        if !self.extra_cmdline.is_empty() {
            self.extra_cmdline.push(' ');
        }
        self.extra_cmdline.push_str(extra);
        self
    }
}

/// The kernel a guest runs.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    /// Series.
    pub series: KernelSeries,
    /// Release string (`uname -r`), from the image cache.
    pub release: String,
    /// The bzImage QEMU booted.
    pub bzimage: PathBuf,
    /// The ELF vmlinux of that kernel, when the image cache has it.
    pub vmlinux: Option<PathBuf>,
}

/// A running QEMU/TCG guest with a root shell on its serial console.
///
/// Dropping it kills QEMU and removes its temporary directory (under `/dev/shm`).
pub struct Guest {
    child: Child,
    console: Console,
    dir: PathBuf,
    kernel: KernelInfo,
    mem_bytes: u64,
    vcpus: u32,
    cmd_timeout: Duration,
    /// Console transcript offset up to which output was handed out.
    consumed: usize,
    /// Bulk-file offset up to which output was handed out.
    bulk_consumed: u64,
    seq: u64,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").finish_non_exhaustive()
    }
}

/// Spawns QEMU from one long-lived thread: `PR_SET_PDEATHSIG` fires when the *thread* that
/// forked the child exits, so forking from a short-lived test thread would kill a guest that
/// is shared between tests.
fn spawn_from_keeper(cmd: Command) -> std::io::Result<Child> {
    type Req = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        let _ = std::thread::Builder::new()
            .name("hvpatch-qemu-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, rtx))
        .map_err(|_| std::io::Error::other("QEMU spawner thread is gone"))?;
    rrx.recv()
        .map_err(|_| std::io::Error::other("QEMU spawner thread is gone"))?
}

fn temp_dir() -> Result<PathBuf, HarnessError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = PathBuf::from(format!(
        "{base}/hvpatch-guest-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Finds `__HVP<seq>:<value>__` followed by a newline; returns (marker start, value, end
/// including the newline).
fn find_marker(buf: &[u8], seq: u64) -> Option<(usize, i64, usize)> {
    let tag = format!("__HVP{seq}:");
    let start = buf.windows(tag.len()).position(|w| w == tag.as_bytes())?;
    let rest = buf.get(start + tag.len()..)?;
    let close = rest.windows(2).position(|w| w == b"__")?;
    if close > 24 {
        return None;
    }
    let value = std::str::from_utf8(&rest[..close])
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let after = start + tag.len() + close + 2;
    let nl = buf.get(after..)?.iter().position(|&b| b == b'\n')?;
    if nl > 1 {
        return None;
    }
    Some((start, value, after + nl + 1))
}

/// The printf that ends each command: the marker's digits are arguments, so the command
/// text itself never contains the marker.
fn marker_cmd(seq: u64, value: &str) -> String {
    format!("printf '\\n__HVP%s:%s__\\n' {seq} \"{value}\"")
}

/// How many times [`Guest::boot`] boots a guest whose kernel crashed on its own.
pub const BOOT_TRIES: u32 = 3;

/// Whether a console tail shows the guest kernel crashing (oops, BUG or panic).
fn guest_crashed(tail: &str) -> bool {
    ["Oops:", "BUG:", "Kernel panic - not syncing"]
        .iter()
        .any(|m| tail.contains(m))
}

/// The console lines that name the crash.
fn crash_lines(tail: &str) -> String {
    tail.lines()
        .filter(|l| {
            ["Oops", "BUG", "RIP:", "Kernel panic"]
                .iter()
                .any(|m| l.contains(m))
        })
        .map(|l| format!("  {l}\n"))
        .collect()
}

/// Single-quotes `s` for the shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn normalize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\n")
}

impl Guest {
    /// Boots a guest and waits for its shell.
    ///
    /// A guest kernel that crashes on its own while booting (an oops or panic on the console
    /// before its shell, with nothing of ours attached yet) is booted again, at most
    /// [`BOOT_TRIES`] times in all, and each crash is reported on stderr. Multi-threaded TCG
    /// occasionally loses a cross-vCPU text_poke_bp() race at boot ("Oops: int3" in a
    /// jump-label site); every other boot failure is returned at once.
    pub fn boot(spec: GuestSpec) -> Result<Guest, HarnessError> {
        let files = find_kernel(spec.series)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let dir = temp_dir()?;
            match Self::boot_in(&spec, files.clone(), dir.clone()) {
                Ok(g) => return Ok(g),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    match &e {
                        HarnessError::QemuExited { tail, .. }
                        | HarnessError::BootTimeout { tail, .. }
                            if tries < BOOT_TRIES && guest_crashed(tail) =>
                        {
                            eprintln!(
                                "hvpatch harness: {:?} guest crashed while booting (try {tries} of \
                                 {BOOT_TRIES}), booting again:\n{}",
                                spec.series,
                                crash_lines(tail)
                            );
                        }
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    fn boot_in(
        spec: &GuestSpec,
        files: crate::images::KernelFiles,
        dir: PathBuf,
    ) -> Result<Guest, HarnessError> {
        let cpu = spec.series.qemu_cpu();
        let mem = format!("{}M", spec.mem_mib);
        let p = |name: &str| dir.join(name).display().to_string();
        let initrd = if spec.extra_files.is_empty() {
            files.initramfs.clone()
        } else {
            let mut img = std::fs::read(&files.initramfs)
                .map_err(|e| HarnessError::io("reading the initramfs", e))?;
            let mut w = guest_images::cpio::CpioWriter::new();
            for (path, data) in &spec.extra_files {
                let path = path.trim_start_matches('/');
                // Parent directories first.
                let mut at = String::new();
                for part in path
                    .split('/')
                    .collect::<Vec<_>>()
                    .split_last()
                    .map_or(&[][..], |x| x.1)
                {
                    at = if at.is_empty() {
                        part.to_string()
                    } else {
                        format!("{at}/{part}")
                    };
                    let _ = w.dir(&at, 0o755);
                }
                w.file(path, 0o644, data).map_err(|e| {
                    HarnessError::io("extra initramfs file", std::io::Error::other(e.to_string()))
                })?;
            }
            // newc archives are 4-byte aligned; pad the first one so the second starts aligned.
            while img.len() % 4 != 0 {
                img.push(0);
            }
            img.extend(w.finish());
            let out = dir.join("initrd.img");
            std::fs::write(&out, img).map_err(|e| HarnessError::io("writing initrd.img", e))?;
            out
        };
        let cmdline = format!("console=ttyS0 panic=-1 {}", spec.extra_cmdline);
        let log = File::create(dir.join("qemu.log"))
            .map_err(|e| HarnessError::io("creating qemu.log", e))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", cpu])
            .args(["-smp", &spec.vcpus.to_string(), "-m", &mem])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram0,size={mem},mem-path={},share=on",
                p("ram")
            ))
            .args(["-machine", "memory-backend=ram0"])
            .args(["-no-reboot", "-display", "none", "-nodefaults"])
            .arg("-kernel")
            .arg(&files.bzimage)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", cmdline.trim()])
            .args([
                "-chardev",
                "stdio,id=con0,signal=off",
                "-serial",
                "chardev:con0",
            ])
            .arg("-serial")
            .arg(format!("file:{}", p("bulk")))
            .arg("-chardev")
            .arg(format!(
                "socket,id=gdb0,path={},server=on,wait=off",
                p("gdb.sock")
            ))
            .args(["-gdb", "chardev:gdb0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", p("qmp.sock")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, _exit); it touches no Rust state.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = spawn_from_keeper(cmd).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HarnessError::QemuMissing(e),
            _ => HarnessError::io("starting qemu-system-x86_64", e),
        })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Protocol("QEMU stdio pipes missing".into()));
        };
        let console_log = File::create(dir.join("console.log"))
            .map_err(|e| HarnessError::io("creating console.log", e))?;
        let console = Console::start(stdin, stdout, console_log);
        let mut g = Guest {
            child,
            console,
            dir,
            kernel: KernelInfo {
                series: files.series,
                release: files.release,
                bzimage: files.bzimage,
                vmlinux: files.vmlinux,
            },
            mem_bytes: spec.mem_mib.saturating_mul(1 << 20),
            vcpus: spec.vcpus,
            cmd_timeout: spec.cmd_timeout,
            consumed: 0,
            bulk_consumed: 0,
            seq: 0,
        };
        g.wait_ready(spec)?;
        Ok(g)
    }

    fn wait_ready(&mut self, spec: &GuestSpec) -> Result<(), HarnessError> {
        let deadline = Instant::now() + spec.boot_timeout;
        let found = self.console.wait_for(0, deadline, |b| {
            let i = b.windows(READY.len()).position(|w| w == READY)?;
            // Then the shell's prompt ("/ # ").
            let j = b[i..].windows(2).position(|w| w == b"# ")?;
            Some(i + j + 2)
        });
        match found {
            Ok(end) => self.consumed = end,
            Err(WaitError::Timeout) => {
                return Err(HarnessError::BootTimeout {
                    timeout: spec.boot_timeout,
                    tail: self.tail(),
                })
            }
            Err(WaitError::Eof) => return Err(self.exited("booting")),
        }
        // The init shell is an interactive busybox ash (PID 1). With echo off it reads lines
        // with fgets, which takes a SIGCHLD-interrupted read for end of file and exits (the
        // guest panics). So: echo off, then hand the console to a non-interactive `cat | sh`
        // (restarted by a loop in PID 1) (cat retries interrupted reads).
        // One line, so that the init shell reads nothing after it.
        let mut setup = String::from("stty -echo; ");
        if let Some(level) = spec.console_loglevel {
            setup.push_str(&format!("dmesg -n {level}; "));
        }
        setup.push_str("stty -F /dev/ttyS1 raw -echo; while :; do cat | sh; done\n");
        self.console
            .write(setup.as_bytes())
            .map_err(|e| HarnessError::io("writing to the guest console", e))?;
        self.sync()
    }

    /// Waits until the console shell answers. Lines typed while a shell switches the tty back
    /// to canonical mode can be swallowed by that shell, so sync lines are sent repeatedly
    /// until one is answered, then one more to drain the rest.
    fn sync(&mut self) -> Result<(), HarnessError> {
        for _ in 0..20 {
            match self.exchange("", "console sync", "$?", Duration::from_secs(3), false) {
                Ok(_) => {
                    self.exchange("", "console sync", "$?", Duration::from_secs(30), false)?;
                    return Ok(());
                }
                Err(HarnessError::CommandTimeout { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(HarnessError::Protocol(format!(
            "the guest console shell does not answer\n{}",
            self.tail()
        )))
    }

    /// Sends `text` followed by the marker printf and returns (marker value, output).
    fn exchange(
        &mut self,
        text: &str,
        what: &str,
        value: &str,
        timeout: Duration,
        interrupt_on_timeout: bool,
    ) -> Result<(i64, Vec<u8>), HarnessError> {
        self.seq += 1;
        let seq = self.seq;
        let line = format!("{text}{}\n", marker_cmd(seq, value));
        self.console
            .write(line.as_bytes())
            .map_err(|e| HarnessError::io("writing to the guest console", e))?;
        let from = self.consumed;
        match self
            .console
            .wait_for(from, Instant::now() + timeout, |b| find_marker(b, seq))
        {
            Ok((start, value, end)) => {
                let mut out = self.console.slice(from, from + start);
                // Drop the newline the marker printf put before the marker.
                if out.ends_with(b"\r\n") {
                    out.truncate(out.len() - 2);
                } else if out.ends_with(b"\n") {
                    out.truncate(out.len() - 1);
                }
                self.consumed = from + end;
                Ok((value, out))
            }
            Err(WaitError::Eof) => Err(self.exited(&format!("running `{what}`"))),
            Err(WaitError::Timeout) => {
                let tail = self.tail();
                if interrupt_on_timeout {
                    self.interrupt();
                }
                Err(HarnessError::CommandTimeout {
                    cmd: what.to_string(),
                    timeout,
                    tail,
                })
            }
        }
    }

    /// After a timeout: ^C the command (which also ends the console shell and its loop in
    /// PID 1), restart the console shell and resynchronise.
    fn interrupt(&mut self) {
        let _ = self.console.write(b"\x03");
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.console.write(b"while :; do cat | sh; done\n");
        if self.sync().is_err() {
            self.consumed = self.console.len();
        }
    }

    fn check_cmd(cmd: &str) -> Result<(), HarnessError> {
        if cmd.contains('\0') || cmd.contains('\x03') || cmd.contains('\x04') {
            return Err(HarnessError::BadCommand(format!(
                "control characters in {cmd:?}"
            )));
        }
        if cmd.lines().any(|l| l.len() > MAX_LINE) {
            return Err(HarnessError::BadCommand(format!(
                "a line is longer than {MAX_LINE} bytes (the guest tty drops the rest)"
            )));
        }
        Ok(())
    }

    /// Runs a shell command and returns its exit status and output (stdout and stderr,
    /// CRLF normalised to LF, exactly as printed: a trailing newline is kept). Stdin is
    /// `/dev/null`. Non-zero status is not an error here.
    pub fn run_status(&mut self, cmd: &str) -> Result<(i32, String), HarnessError> {
        self.run_status_timeout(cmd, self.cmd_timeout)
    }

    /// [`Guest::run_status`] with an explicit timeout. On timeout the command gets ^C.
    pub fn run_status_timeout(
        &mut self,
        cmd: &str,
        timeout: Duration,
    ) -> Result<(i32, String), HarnessError> {
        Self::check_cmd(cmd)?;
        let text = format!("sh -c {} </dev/null; ", quote(cmd));
        let (status, out) = self.exchange(&text, cmd, "$?", timeout, true)?;
        Ok((status as i32, normalize(&out)))
    }

    /// Runs a shell command; a non-zero exit status is [`HarnessError::CommandFailed`].
    /// Returns the output like [`Guest::run_status`].
    pub fn run(&mut self, cmd: &str) -> Result<String, HarnessError> {
        self.run_timeout(cmd, self.cmd_timeout)
    }

    /// [`Guest::run`] with an explicit timeout.
    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> Result<String, HarnessError> {
        let (status, output) = self.run_status_timeout(cmd, timeout)?;
        if status != 0 {
            return Err(HarnessError::CommandFailed {
                cmd: cmd.to_string(),
                status,
                output,
            });
        }
        Ok(output)
    }

    /// Runs a command with its stdout gzip-compressed on the second serial port (ttyS1, a
    /// host file) and returns that output as bytes; for large outputs (`cat /proc/kallsyms`).
    /// Stderr stays on the console and is part of the error if the command fails (non-zero
    /// status is an error).
    pub fn run_bulk_bytes(&mut self, cmd: &str) -> Result<Vec<u8>, HarnessError> {
        Self::check_cmd(cmd)?;
        let bulk_seq = self.seq + 1;
        // pipefail: the status is the command's, not gzip's. The end marker follows the gzip
        // stream on ttyS1, so once it is in the file, all of the stream is.
        let text = format!(
            "set -o pipefail; sh -c {} </dev/null | gzip -1 >/dev/ttyS1; __hvs=$?; \
             printf '__HVPB%s__\\n' {bulk_seq} >/dev/ttyS1; ",
            quote(cmd)
        );
        let timeout = self.cmd_timeout;
        let (status, console_out) = self.exchange(&text, cmd, "$__hvs", timeout, true)?;
        let tag = format!("__HVPB{bulk_seq}__\n");
        let deadline = Instant::now() + Duration::from_secs(30);
        let path = self.bulk_log();
        let data = loop {
            let mut f =
                File::open(&path).map_err(|e| HarnessError::io("opening the bulk file", e))?;
            f.seek(SeekFrom::Start(self.bulk_consumed))
                .map_err(|e| HarnessError::io("reading the bulk file", e))?;
            let mut data = Vec::new();
            f.read_to_end(&mut data)
                .map_err(|e| HarnessError::io("reading the bulk file", e))?;
            if data.ends_with(tag.as_bytes()) {
                self.bulk_consumed += data.len() as u64;
                data.truncate(data.len() - tag.len());
                break data;
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Protocol(format!(
                    "bulk output of `{cmd}` never ended (no end marker on ttyS1)"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status != 0 {
            return Err(HarnessError::CommandFailed {
                cmd: cmd.to_string(),
                status: status as i32,
                output: normalize(&console_out),
            });
        }
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(data.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| {
                HarnessError::Protocol(format!("bulk output of `{cmd}`: bad gzip stream: {e}"))
            })?;
        Ok(out)
    }

    /// [`Guest::run_bulk_bytes`] as text (lossy UTF-8, CRLF normalised).
    pub fn run_bulk(&mut self, cmd: &str) -> Result<String, HarnessError> {
        self.run_bulk_bytes(cmd).map(|b| normalize(&b))
    }

    /// Starts `cmd` in the background (stdin, stdout and stderr on `/dev/null` unless the
    /// command redirects them itself) and returns the PID of the background job.
    pub fn spawn(&mut self, cmd: &str) -> Result<u32, HarnessError> {
        Self::check_cmd(cmd)?;
        let text = format!("sh -c {} </dev/null >/dev/null 2>&1 & ", quote(cmd));
        let timeout = self.cmd_timeout;
        let (pid, out) = self.exchange(&text, cmd, "$!", timeout, true)?;
        u32::try_from(pid).ok().filter(|&p| p > 1).ok_or_else(|| {
            HarnessError::Protocol(format!("spawn `{cmd}`: bad PID {pid}: {}", normalize(&out)))
        })
    }

    /// Runs an HMP command through QMP (e.g. `info registers -a`) and returns its output.
    pub fn hmp(&mut self, cmd: &str) -> Result<String, HarnessError> {
        let mut q = Qmp::connect(&self.dir.join("qmp.sock"), Duration::from_secs(10))?;
        let r = q.execute("human-monitor-command", json!({ "command-line": cmd }))?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// Asks QEMU to quit (QMP `quit`), falling back to SIGKILL; consumes the guest.
    pub fn shutdown(mut self) -> Result<(), HarnessError> {
        if let Ok(mut q) = Qmp::connect(&self.dir.join("qmp.sock"), Duration::from_secs(5)) {
            let _ = q.execute("quit", json!({}));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(HarnessError::Protocol(
            "QEMU did not quit within 10 s; killed".into(),
        ))
        // Drop kills and reaps.
    }

    /// QEMU's gdbstub (Unix socket), for `vmm::attach::QemuAttach::connect`.
    pub fn gdb_socket(&self) -> PathBuf {
        self.dir.join("gdb.sock")
    }

    /// The guest RAM file (QEMU `memory-backend-file`, shared; guest-physical 0..size).
    pub fn mem_file(&self) -> PathBuf {
        self.dir.join("ram")
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_bytes
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// The kernel this guest runs.
    pub fn kernel(&self) -> &KernelInfo {
        &self.kernel
    }

    /// Everything the guest printed on ttyS0 (also while commands ran), as a file.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The ttyS1 output file (bulk output).
    pub fn bulk_log(&self) -> PathBuf {
        self.dir.join("bulk")
    }

    /// QEMU's stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// QEMU's PID.
    pub fn qemu_pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills QEMU with SIGKILL now (to test how clients cope with a vanishing guest). The
    /// [`Guest`] stays usable for its paths and transcript.
    pub fn kill_qemu(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The whole console transcript (CRLF normalised).
    pub fn transcript(&self) -> String {
        self.console.transcript()
    }

    /// Console tail plus QEMU's stderr tail, for error messages.
    pub fn tail(&self) -> String {
        let mut s = format!("--- console tail ---\n{}\n", self.console.tail(TAIL));
        if let Ok(log) = std::fs::read_to_string(self.qemu_log()) {
            if !log.trim().is_empty() {
                let start = log.len().saturating_sub(TAIL);
                let start = (start..log.len())
                    .find(|&i| log.is_char_boundary(i))
                    .unwrap_or(0);
                s.push_str(&format!("--- qemu stderr ---\n{}\n", &log[start..]));
            }
        }
        s
    }

    fn exited(&mut self, doing: &str) -> HarnessError {
        // Give QEMU a moment to finish exiting so the status is known.
        let mut status = "still running?".to_string();
        for _ in 0..50 {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = s.to_string();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        HarnessError::QemuExited {
            status,
            doing: doing.to_string(),
            tail: self.tail(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "hvpatch harness: test panicked; guest {} console tail:\n{}",
                self.kernel.release,
                self.tail()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.console.join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_crashes_are_told_from_other_failures() {
        let oops = "[    2.31] RIP: 0010:pv_native_safe_halt+0xf/0x20\n\
                    [    2.31] Oops: int3: 0000 [#2] PREEMPT SMP PTI\n\
                    [    2.31] RIP: 0010:sched_clock_cpu+0x9/0x190\n\
                    [    2.32] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(guest_crashed(oops));
        assert_eq!(crash_lines(oops).lines().count(), 4);
        // A boot that merely stalls, or a QEMU error, is not a guest crash.
        assert!(!guest_crashed("[    1.9] Run /init as init process\n"));
        assert!(!guest_crashed(
            "qemu-system-x86_64: could not open kernel file\n"
        ));
    }

    #[test]
    fn markers() {
        let b = b"out\r\n\r\n__HVP3:0__\r\nrest";
        let (start, v, end) = find_marker(b, 3).unwrap();
        assert_eq!((start, v), (7, 0));
        assert_eq!(&b[end..], b"rest");
        assert!(find_marker(b, 2).is_none());
        assert!(find_marker(b"__HVP3:0__", 3).is_none(), "needs the newline");
        assert!(find_marker(b"__HVP3:%s__\n", 3).is_none());
        assert_eq!(find_marker(b"__HVP3:-1__\n", 3).map(|m| m.1), Some(-1));
        assert!(!marker_cmd(3, "$?").contains("__HVP3:"));
    }
}
