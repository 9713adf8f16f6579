//! Test-local QEMU control for the patch end-to-end tests, used until `vmm::attach::QemuAttach`
//! exists: pause/resume/registers through QMP (a fresh connection per call, so the harness's
//! own QMP use is not blocked), reads from the shared RAM file, writes through the gdbstub in
//! physical-memory mode (`Qqemu.PhyMemMode:1`), which invalidates QEMU's translated code.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use introspect::{MemError, PhysMemory, VcpuRegs};
use patcher::{GuestControl, GuestError, GuestEvent};
use serde_json::{json, Value};

fn be(e: impl std::fmt::Display) -> GuestError {
    GuestError::Backend(e.to_string())
}

/// Guest RAM through the shared memory-backend file.
pub struct RamFile {
    file: File,
    size: u64,
}

impl PhysMemory for RamFile {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError::OutOfRange {
            pa,
            len: buf.len() as u64,
        };
        let end = pa.checked_add(buf.len() as u64).ok_or(err.clone())?;
        if end > self.size {
            return Err(err);
        }
        self.file.read_exact_at(buf, pa).map_err(|_| err)
    }
    fn regions(&self) -> Vec<(u64, u64)> {
        vec![(0, self.size)]
    }
}

/// A running QEMU guest.
pub struct QemuCtl {
    qmp: PathBuf,
    gdb: UnixStream,
    mem: RamFile,
    paused: bool,
    vcpus: usize,
    regs: Option<Vec<VcpuRegs>>,
}

fn qmp(path: &Path, cmd: &str, args: Value) -> Result<Value, GuestError> {
    let s = UnixStream::connect(path).map_err(be)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(be)?;
    let mut w = s.try_clone().map_err(be)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(be)?;
    for (c, a) in [("qmp_capabilities", json!({})), (cmd, args)] {
        writeln!(w, "{}", json!({"execute": c, "arguments": a})).map_err(be)?;
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(be)? == 0 {
                return Err(be("QMP closed"));
            }
            let v: Value = serde_json::from_str(&line).map_err(be)?;
            if let Some(e) = v.get("error") {
                return Err(be(format!("QMP {c}: {e}")));
            }
            if let Some(ret) = v.get("return") {
                if c == cmd {
                    return Ok(ret.clone());
                }
                break;
            }
        }
    }
    Err(be("unreachable"))
}

fn hex_after(block: &str, key: &str) -> Option<u64> {
    let i = block.find(key)? + key.len();
    let h: String = block[i..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u64::from_str_radix(&h, 16).ok()
}

impl QemuCtl {
    /// Connects to the guest's gdbstub, QMP socket (beside it) and RAM file.
    pub fn connect(gdb_sock: &Path, mem_file: &Path, mem_size: u64) -> Result<QemuCtl, GuestError> {
        let qmp_path = gdb_sock.with_file_name("qmp.sock");
        let gdb = UnixStream::connect(gdb_sock).map_err(be)?;
        gdb.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(be)?;
        let file = File::open(mem_file).map_err(be)?;
        let mut c = QemuCtl {
            qmp: qmp_path,
            gdb,
            mem: RamFile {
                file,
                size: mem_size,
            },
            paused: true,
            vcpus: 0,
            regs: None,
        };
        // gdbstub stops the VM when a debugger connects.
        std::thread::sleep(Duration::from_millis(100));
        c.gdb_cmd("Qqemu.PhyMemMode:1")?;
        c.vcpus = c.read_regs()?.len();
        c.resume()?;
        Ok(c)
    }

    fn gdb_send(&mut self, data: &str) -> Result<(), GuestError> {
        let sum = data.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        write!(self.gdb, "${data}#{sum:02x}").map_err(be)
    }

    /// Reads one packet (acks it); returns its payload.
    fn gdb_packet(&mut self) -> Result<String, GuestError> {
        let mut b = [0u8; 1];
        loop {
            self.gdb.read_exact(&mut b).map_err(be)?;
            if b[0] == b'$' {
                break;
            }
        }
        let mut data = Vec::new();
        loop {
            self.gdb.read_exact(&mut b).map_err(be)?;
            if b[0] == b'#' {
                break;
            }
            data.push(b[0]);
        }
        let mut cs = [0u8; 2];
        self.gdb.read_exact(&mut cs).map_err(be)?;
        self.gdb.write_all(b"+").map_err(be)?;
        Ok(String::from_utf8_lossy(&data).into_owned())
    }

    /// Sends a command while paused and returns its reply (skipping stop notifications).
    fn gdb_cmd(&mut self, data: &str) -> Result<String, GuestError> {
        self.gdb_send(data)?;
        for _ in 0..16 {
            let p = self.gdb_packet()?;
            if p.starts_with('T') || p.starts_with('S') {
                continue;
            }
            return Ok(p);
        }
        Err(be(format!("gdbstub: no reply to {data}")))
    }

    fn read_regs(&mut self) -> Result<Vec<VcpuRegs>, GuestError> {
        let out = qmp(
            &self.qmp,
            "human-monitor-command",
            json!({"command-line": "info registers -a"}),
        )?;
        let text = out.as_str().unwrap_or_default().to_string();
        let v: Vec<VcpuRegs> = text
            .split("CPU#")
            .skip(1)
            .map(|b| {
                let mut gprs = [0u64; 16];
                gprs[VcpuRegs::RSP] = hex_after(b, "RSP=").unwrap_or(0);
                (b, gprs)
            })
            .map(|(b, gprs)| VcpuRegs {
                gprs,
                cs: hex_after(b, "CS =").unwrap_or(0) as u16,
                rip: hex_after(b, "RIP=").unwrap_or(0),
                cr0: hex_after(b, "CR0=").unwrap_or(0),
                cr2: hex_after(b, "CR2=").unwrap_or(0),
                cr3: hex_after(b, "CR3=").unwrap_or(0),
                cr4: hex_after(b, "CR4=").unwrap_or(0),
                efer: hex_after(b, "EFER=").unwrap_or(0),
                ..Default::default()
            })
            .collect();
        if v.is_empty() {
            return Err(be(format!("no registers in {text:?}")));
        }
        Ok(v)
    }
}

impl GuestControl for QemuCtl {
    fn vcpu_count(&self) -> usize {
        self.vcpus
    }
    fn pause(&mut self) -> Result<(), GuestError> {
        qmp(&self.qmp, "stop", json!({}))?;
        self.paused = true;
        self.regs = None;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        // Swallow a pending stop notification from the gdbstub (sent when QMP stopped us).
        self.gdb.set_nonblocking(true).map_err(be)?;
        let mut sink = [0u8; 4096];
        let mut drained = Vec::new();
        while let Ok(n) = self.gdb.read(&mut sink) {
            if n == 0 {
                break;
            }
            drained.extend_from_slice(&sink[..n]);
        }
        self.gdb.set_nonblocking(false).map_err(be)?;
        if drained.contains(&b'$') {
            self.gdb.write_all(b"+").map_err(be)?;
        }
        qmp(&self.qmp, "cont", json!({}))?;
        self.paused = false;
        Ok(())
    }
    fn is_paused(&self) -> bool {
        self.paused
    }
    fn regs(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        if !self.paused {
            return Err(GuestError::NotPaused);
        }
        if self.regs.is_none() {
            self.regs = Some(self.read_regs()?);
        }
        self.regs
            .as_ref()
            .and_then(|r| r.get(vcpu).copied())
            .ok_or(GuestError::NoSuchVcpu(vcpu))
    }
    fn memory(&self) -> &dyn PhysMemory {
        &self.mem
    }
    fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        if !self.paused {
            return Err(GuestError::NotPaused);
        }
        if !matches!(pa.checked_add(data.len() as u64), Some(e) if e <= self.mem.size) {
            return Err(GuestError::WriteOutOfRange {
                pa,
                len: data.len(),
            });
        }
        for (i, chunk) in data.chunks(1024).enumerate() {
            let a = pa + (i * 1024) as u64;
            let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
            let r = self.gdb_cmd(&format!("M{a:x},{:x}:{hex}", chunk.len()))?;
            if r != "OK" {
                return Err(be(format!("gdbstub M at {a:#x}: {r}")));
            }
        }
        Ok(())
    }
    fn set_breakpoints(&mut self, _addrs: &[u64]) -> Result<(), GuestError> {
        Err(be("not supported by the test control"))
    }
    fn wait_event(&mut self, _timeout: Duration) -> Result<Option<GuestEvent>, GuestError> {
        Err(be("not supported by the test control"))
    }
}
