//! Boots the initramfs on both cached kernels under QEMU TCG and checks, from the guest's own
//! /proc, that the test programs park tasks where they claim. Fails with a how-to if the images
//! or qemu-system-x86_64 are missing.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use guest_images::{existing, KernelSeries, READY_LINE};

/// Kills QEMU however the test ends.
struct Qemu {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn boot(series: KernelSeries) -> Self {
        let images = existing().unwrap_or_else(|e| panic!("guest images unavailable: {e}"));
        let k = images.kernel(series).unwrap();
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", series.qemu_cpu()])
            .args(["-m", "512M", "-smp", "2", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&k.bzimage)
            .arg("-initrd")
            .arg(&images.initramfs)
            .args(["-append", "console=ttyS0 panic=-1 hvpatch.test=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start qemu-system-x86_64 ({e}): apt-get install -y qemu-system-x86")
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        Qemu {
            child,
            stdin,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a line satisfying `pred`; returns it.
    fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => panic!(
                    "timed out waiting for {what}; serial output:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Lines strictly between `start` and `end` markers.
    fn section(&mut self, start: &str, end: &str) -> Vec<String> {
        let t = Duration::from_secs(10);
        self.wait_line(start, t, |l| l == start);
        let mut out = Vec::new();
        loop {
            let l = self.wait_line(end, t, |_| true);
            if l == end {
                return out;
            }
            out.push(l);
        }
    }

    fn send(&mut self, cmd: &str) {
        self.stdin.write_all(cmd.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Runs `cmd` and returns its output lines (markers are built by the shell so the echoed
    /// command line never matches them).
    fn run(&mut self, tag: u32, cmd: &str) -> Vec<String> {
        self.send(&format!("echo B$(({tag}+0))B; {cmd}; echo E$(({tag}+0))E"));
        self.section(&format!("B{tag}B"), &format!("E{tag}E"))
    }
}

fn boot_and_check(series: KernelSeries) {
    let started = Instant::now();
    let mut q = Qemu::boot(series);
    q.wait_line(READY_LINE, Duration::from_secs(60), |l| l == READY_LINE);
    let boot_time = started.elapsed();

    let mounts = q.run(1, "cat /proc/mounts").join("\n");
    for fs in [
        "proc /proc",
        "sysfs /sys",
        "devtmpfs /dev",
        "tracefs /sys/kernel/tracing",
        "debugfs /sys/kernel/debug",
    ] {
        assert!(mounts.contains(fs), "{series}: {fs} not mounted:\n{mounts}");
    }
    let uname = q.run(2, "uname -r");
    let images = existing().unwrap();
    assert_eq!(
        uname,
        [images.kernel(series).unwrap().release.clone()],
        "{series}"
    );

    // cmdloop prints /proc/cmdline: the guest's own view must be what we passed.
    let out = q.run(3, "cmdloop 2");
    assert_eq!(
        out,
        [
            "cmdloop 1: console=ttyS0 panic=-1 hvpatch.test=1",
            "cmdloop 2: console=ttyS0 panic=-1 hvpatch.test=1"
        ],
        "{series}"
    );

    // The programs' banners may share a line with the prompt: parse from the banner on.
    let mut announce = |cmd: &str, banner: &str| -> Vec<String> {
        q.send(cmd);
        let line = q.wait_line(banner, Duration::from_secs(10), |l| l.contains(banner));
        let from = line.find(banner).unwrap();
        line[from..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let words = announce("hvpoll &", "hvpoll: pid ");
    let hvpoll: u32 = words[2].parse().unwrap();
    let words = announce("pipewait &", "pipewait: parent ");
    let (parent, child): (u32, u32) = (words[2].parse().unwrap(), words[6].parse().unwrap());
    let words = announce("spin &", "spin: pid ");
    let spin: u32 = words[2].parse().unwrap();
    q.send("sleep 1");

    let has =
        |lines: &[String], func: &str| lines.iter().any(|l| l.contains(&format!("] {func}+0x")));
    let stack = q.run(4, &format!("cat /proc/{hvpoll}/stack"));
    assert!(
        has(&stack, "do_sys_poll"),
        "{series}: hvpoll stack {stack:?}"
    );
    let stack = q.run(5, &format!("cat /proc/{child}/stack"));
    assert!(
        has(&stack, "pipe_read"),
        "{series}: pipewait child stack {stack:?}"
    );
    let stack = q.run(6, &format!("cat /proc/{parent}/stack"));
    assert!(
        has(&stack, "do_wait"),
        "{series}: pipewait parent stack {stack:?}"
    );
    // spin is runnable (R) and accumulates user time.
    let stat = q.run(7, &format!("cat /proc/{spin}/stat"));
    let fields: Vec<&str> = stat[0].rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[0], "R", "{series}: spin state {stat:?}");
    assert!(
        fields[11].parse::<u64>().unwrap() > 0,
        "{series}: spin utime {stat:?}"
    );

    // poweroff -f ends QEMU.
    q.send("poweroff -f");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = q.child.try_wait().unwrap() {
            eprintln!(
                "{series}: booted in {boot_time:?}, powered off ({status}) after {:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{series}: poweroff -f did not stop QEMU"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn boot_6_1_initramfs_parks_tasks_and_powers_off() {
    boot_and_check(KernelSeries::V6_1);
}

#[test]
fn boot_6_12_initramfs_parks_tasks_and_powers_off() {
    boot_and_check(KernelSeries::V6_12);
}
