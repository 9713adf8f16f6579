//! Guest memory snapshots for the snapshot tests of introspect and patcher: a booted guest's
//! RAM and vCPU registers taken at one QEMU `stop`, plus the guest's own ground truth.
//!
//! Layout: `<root>/<ver>/` and, for the PTI variant, `<root>/pti/<ver>/`, where `<root>` is
//! `$HVPATCH_DUMPS` or `<image cache>/snapshots`. Each directory holds `ram.bin`
//! (guest-physical 0..size, flat), `regs.txt` (HMP `info registers -a`), `kallsyms.txt`,
//! `ps.txt` (`ps -o pid,comm,stat`), `stacks.txt` ("== PID COMM" + /proc/PID/stack blocks),
//! `cmdline.txt`, `uname.txt`, `meta.txt` and `stamp` (the kernel release it was made from).
//!
//! `stacks.txt` lists only tasks that provably did not run across the dump: their
//! context-switch count and stack were read before `stop` and again after `cont`, and only
//! tasks where neither changed are written (`meta.txt` says how many were dropped). `ps.txt` is
//! taken between those two reads, so the tasks in `stacks.txt` also sat still since `ps`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{find_kernel, Guest, GuestSpec, HarnessError, KernelSeries};

pub use guest_images::{snapshots_dir, DUMPS_ENV};

/// Bumped when the contents of a snapshot change, so old ones are remade.
const FORMAT: u32 = 3;

/// Each task's context-switch count ("voluntary+nonvoluntary+0") and stack, one block per
/// task: "== PID COUNT COMM" then /proc/PID/stack.
const PROC_STACKS: &str = r#"for p in /proc/[0-9]*; do echo "== ${p#/proc/} $(grep ctxt_switches $p/status | tr -dc '0-9\n' | tr '\n' '+')0 $(cat $p/comm)"; cat $p/stack; done 2>/dev/null; true"#;

/// One kind of snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotKind {
    /// Kernel series.
    pub series: KernelSeries,
    /// Booted with `pti=on` and two user-mode busy loops (`spin`), so a vCPU is caught in
    /// user mode holding the PTI user PGD.
    pub pti: bool,
}

impl SnapshotKind {
    /// Every snapshot the tests use: 6.1, 6.12 and 6.12 with PTI.
    pub const ALL: [SnapshotKind; 3] = [
        SnapshotKind {
            series: KernelSeries::V6_1,
            pti: false,
        },
        SnapshotKind {
            series: KernelSeries::V6_12,
            pti: false,
        },
        SnapshotKind {
            series: KernelSeries::V6_12,
            pti: true,
        },
    ];

    /// Its directory under `root`: `<root>/<ver>` or `<root>/pti/<ver>`.
    pub fn dir(self, root: &Path) -> PathBuf {
        let base = if self.pti {
            root.join("pti")
        } else {
            root.to_path_buf()
        };
        base.join(self.series.dir_name())
    }
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.series, if self.pti { " (pti)" } else { "" })
    }
}

/// What [`make`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The snapshot was already made from the current kernel.
    UpToDate(PathBuf),
    /// A new snapshot was written.
    Made {
        /// Its directory.
        dir: PathBuf,
        /// Tasks written to stacks.txt.
        stacks_kept: usize,
        /// Tasks left out because they ran (or exited) across the dump.
        stacks_dropped: usize,
    },
}

fn stamp_text(release: &str) -> String {
    format!("{release}\nformat {FORMAT}\n")
}

fn io(what: impl Into<String>, e: std::io::Error) -> HarnessError {
    HarnessError::io(what, e)
}

/// Makes the snapshot `kind` under `root` unless its stamp says it was made from the current
/// kernel image. Writes into a temporary directory and renames it into place.
pub fn make(kind: SnapshotKind, root: &Path) -> Result<Outcome, HarnessError> {
    let release = find_kernel(kind.series)?.release;
    let dir = kind.dir(root);
    if fs::read_to_string(dir.join("stamp")).ok().as_deref() == Some(&stamp_text(&release)) {
        return Ok(Outcome::UpToDate(dir));
    }
    let parent = dir.parent().unwrap_or(root).to_path_buf();
    fs::create_dir_all(&parent).map_err(|e| io(format!("creating {}", parent.display()), e))?;
    let name = kind.series.dir_name();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| io(format!("creating {}", tmp.display()), e))?;
    let res = capture(kind, &tmp);
    let (kept, dropped) = match res {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let write = |f: &str, data: &str| {
        fs::write(tmp.join(f), data).map_err(|e| io(format!("writing {f}"), e))
    };
    write("stamp", &stamp_text(&release))?;
    // Swap in: move the old directory aside, rename the new one, remove the old one.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        fs::rename(&dir, &old).map_err(|e| io(format!("moving {} aside", dir.display()), e))?;
    }
    fs::rename(&tmp, &dir).map_err(|e| io(format!("renaming into {}", dir.display()), e))?;
    let _ = fs::remove_dir_all(&old);
    Ok(Outcome::Made {
        dir,
        stacks_kept: kept,
        stacks_dropped: dropped,
    })
}

/// Makes every snapshot in [`SnapshotKind::ALL`] under [`snapshots_dir`].
pub fn make_all() -> Result<Vec<Outcome>, HarnessError> {
    let root = snapshots_dir();
    SnapshotKind::ALL.iter().map(|&k| make(k, &root)).collect()
}

/// One /proc task block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskStack {
    pid: u32,
    comm: String,
    switches: String,
    stack: String,
}

/// Parses [`PROC_STACKS`] output.
fn parse_stacks(text: &str) -> Vec<TaskStack> {
    let mut out: Vec<TaskStack> = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("== ") {
            let mut it = h.splitn(3, ' ');
            let pid = it.next().and_then(|p| p.parse().ok());
            let switches = it.next().unwrap_or("").to_string();
            let comm = it.next().unwrap_or("").to_string();
            if let Some(pid) = pid {
                out.push(TaskStack {
                    pid,
                    comm,
                    switches,
                    stack: String::new(),
                });
                continue;
            }
        }
        if let Some(t) = out.last_mut() {
            t.stack.push_str(line);
            t.stack.push('\n');
        }
    }
    out
}

/// Whether a vCPU block of HMP `info registers -a` is in user mode (CPL=3) with the PTI user
/// PGD (CR3 bit 12).
fn user_pgd_caught(regs: &str) -> bool {
    regs.split("CPU#").skip(1).any(|b| {
        let cr3 = b
            .split_whitespace()
            .find_map(|t| t.strip_prefix("CR3="))
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        b.contains("CPL=3") && cr3.is_some_and(|c| c & 0x1000 != 0)
    })
}

/// Parks the tasks the tests look for; returns (pid, wait function) pairs.
/// Whether every CPU of an `info registers -a` dump is halted (`HLT=1`: in the idle loop).
fn all_halted(regs: &str) -> bool {
    let cpus = regs.matches("CPU#").count();
    cpus > 0 && regs.matches("HLT=1").count() == cpus
}

fn park(g: &mut Guest, pti: bool) -> Result<Vec<(u32, &'static str)>, HarnessError> {
    let pipewait = g.spawn("pipewait")?;
    let mut parked = vec![
        (g.spawn("sleep 1000")?, "hrtimer_nanosleep"),
        (g.spawn("sleep 1001 | cat")?, "do_wait"),
        (g.spawn("sh -c 'sleep 1002; true'")?, "do_wait"),
        (g.spawn("hvpoll")?, "do_sys_poll"),
        (g.spawn("ttyread")?, "n_tty_read"),
        (pipewait, "do_wait"),
    ];
    // pipewait's child reads a pipe.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = g.run(&format!("cat /proc/{pipewait}/task/{pipewait}/children"))?;
        if let Ok(child) = c.trim().parse::<u32>() {
            parked.push((child, "pipe_read"));
            break;
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Protocol(format!(
                "pipewait (pid {pipewait}) has no child: {c:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if pti {
        g.spawn("spin")?;
        g.spawn("spin")?;
    }
    Ok(parked)
}

/// Boots the guest, parks tasks, captures everything into `out`; returns (kept, dropped)
/// stack counts.
fn capture(kind: SnapshotKind, out: &Path) -> Result<(usize, usize), HarnessError> {
    let mut spec = GuestSpec::new(kind.series);
    if kind.pti {
        spec = spec.cmdline("pti=on");
    }
    let mut g = Guest::boot(spec)?;
    let parked = park(&mut g, kind.pti)?;
    std::thread::sleep(Duration::from_secs(2));
    let write = |f: &str, data: &[u8]| {
        fs::write(out.join(f), data).map_err(|e| io(format!("writing {f}"), e))
    };
    write("kallsyms.txt", &g.run_bulk_bytes("cat /proc/kallsyms")?)?;
    write("cmdline.txt", g.run("cat /proc/cmdline")?.as_bytes())?;
    write("uname.txt", g.run("uname -a")?.as_bytes())?;

    let before = parse_stacks(&g.run_bulk(PROC_STACKS)?);
    // Between the two stack reads, so a task in stacks.txt had the same state and comm in ps
    // as in RAM. `exec`: no wrapper shell; `ps` itself has exited when RAM is saved.
    write("ps.txt", g.run("exec ps -o pid,comm,stat")?.as_bytes())?;
    // PTI: stop again until a vCPU is caught in user mode on the user PGD.
    let mut attempt = 0;
    let regs = loop {
        attempt += 1;
        let stopped = g.hmp("stop")?;
        let regs = g.hmp("info registers -a");
        // Without PTI the snapshot tests want every vCPU in the idle loop: stop again until
        // all are halted (a busy moment of the guest, e.g. an RCU kthread, is waited out).
        let wanted = regs.as_ref().is_ok_and(|r| {
            attempt >= 50
                || if kind.pti {
                    user_pgd_caught(r)
                } else {
                    all_halted(r)
                }
        });
        let copied = wanted.then(|| fs::copy(g.mem_file(), out.join("ram.bin")));
        let resumed = g.hmp("cont");
        let regs = regs?;
        if let Some(c) = copied {
            c.map_err(|e| io(format!("copying {}", g.mem_file().display()), e))?;
        }
        resumed?;
        if !regs.contains("CPU#") {
            return Err(HarnessError::Protocol(format!(
                "`info registers -a` gave no CPU# blocks (stop said {stopped:?}): {regs}"
            )));
        }
        if wanted {
            break regs;
        }
        std::thread::sleep(Duration::from_millis(50 * attempt));
    };
    if kind.pti && !user_pgd_caught(&regs) {
        return Err(HarnessError::Protocol(format!(
            "{kind}: no vCPU caught in user mode on the PTI user PGD in {attempt} stops"
        )));
    }
    write("regs.txt", regs.as_bytes())?;
    let after = parse_stacks(&g.run_bulk(PROC_STACKS)?);

    let mut stacks = String::new();
    let mut dropped = Vec::new();
    let mut kept = 0;
    for t in &before {
        if after.iter().any(|a| a == t) && !t.stack.is_empty() {
            stacks.push_str(&format!("== {} {}\n{}", t.pid, t.comm, t.stack));
            kept += 1;
        } else {
            dropped.push(format!("{} {}", t.pid, t.comm));
        }
    }
    for (pid, func) in &parked {
        let t = before.iter().find(|t| t.pid == *pid);
        if !t.is_some_and(|t| t.stack.contains(func))
            || dropped.iter().any(|d| d.starts_with(&format!("{pid} ")))
        {
            return Err(HarnessError::Protocol(format!(
                "{kind}: parked task {pid} is not sitting in {func}: {t:?}"
            )));
        }
    }
    write("stacks.txt", stacks.as_bytes())?;
    let parked_txt: Vec<String> = parked.iter().map(|(p, f)| format!("{p}:{f}")).collect();
    write(
        "meta.txt",
        format!(
            "kernel {}\ncmdline_extra {}\nstacks_kept {kept}\nstacks_dropped {}\ndropped {}\nparked {}\n",
            g.kernel().release,
            if kind.pti { "pti=on" } else { "" },
            dropped.len(),
            dropped.join(", "),
            parked_txt.join(" "),
        )
        .as_bytes(),
    )?;
    let _ = g.shutdown();
    Ok((kept, dropped.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stack_blocks() {
        let t = parse_stacks(
            "== 1 3+1+0 sh\n[<0>] do_wait+0x5/0x10\n== 2 0+0+0 kthreadd\n== x junk\n[<0>] a+0x1/0x2\n",
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].pid, 1);
        assert_eq!(t[0].switches, "3+1+0");
        assert_eq!(t[0].comm, "sh");
        assert_eq!(t[0].stack, "[<0>] do_wait+0x5/0x10\n");
        assert_eq!(t[1].stack, "== x junk\n[<0>] a+0x1/0x2\n");
    }

    #[test]
    fn halted_cpus() {
        assert!(all_halted("CPU#0\nRIP=1 HLT=1\nCPU#1\nRIP=2 HLT=1\n"));
        assert!(!all_halted("CPU#0\nRIP=1 HLT=1\nCPU#1\nRIP=2 HLT=0\n"));
        assert!(!all_halted(""));
    }

    #[test]
    fn user_pgd() {
        let k = "CPU#0\nRIP=1 CPL=0 II=0\nCR0=1 CR2=0 CR3=0000000001e57000 CR4=0\n";
        let u = "CPU#1\nRIP=1 CPL=3 II=0\nCR0=1 CR2=0 CR3=0000000001e57000 CR4=0\n";
        assert!(!user_pgd_caught(k));
        assert!(user_pgd_caught(&format!("{k}{u}")));
        assert!(!user_pgd_caught(&u.replace("e57", "e56")));
    }

    #[test]
    fn layout() {
        let r = Path::new("/r");
        assert_eq!(SnapshotKind::ALL[0].dir(r), Path::new("/r/6.1"));
        assert_eq!(SnapshotKind::ALL[2].dir(r), Path::new("/r/pti/6.12"));
    }
}
