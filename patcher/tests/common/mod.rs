//! Shared helpers of the patcher integration tests: a [`GuestControl`] over a guest memory
//! snapshot ([`snapshot_dir`]; made by `cargo run --release -p hvpatch-tests --example
//! snapshots`), and building patch objects from C source.

#![allow(dead_code)]

pub mod scenarios;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use introspect::{MemError, PhysMemory, VcpuRegs};
use patcher::build::{compile, BuildOptions};
use patcher::{GuestControl, GuestError, GuestEvent, SymbolMap};

/// Guest RAM from physical 0.
pub struct Ram(pub Vec<u8>);

impl PhysMemory for Ram {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError::OutOfRange {
            pa,
            len: buf.len() as u64,
        };
        let s = usize::try_from(pa).map_err(|_| err.clone())?;
        let src = self
            .0
            .get(s..s.checked_add(buf.len()).ok_or(err.clone())?)
            .ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn regions(&self) -> Vec<(u64, u64)> {
        vec![(0, self.0.len() as u64)]
    }
}

/// A stopped guest made of a snapshot: pause/resume only flip a flag.
pub struct SnapGuest {
    /// RAM (writes land here).
    pub ram: Ram,
    /// vCPU registers.
    pub vcpus: Vec<VcpuRegs>,
    paused: bool,
    /// Number of writes done.
    pub writes: usize,
    /// Fail the write with this index (0-based), to test rollback.
    pub fail_write_at: Option<usize>,
    /// Number of `write_phys_batch` calls.
    pub batches: usize,
    /// Pause count.
    pub pauses: usize,
    /// Host arena to report (`None`: like QEMU attach).
    pub arena: Option<(u64, u64)>,
}

impl GuestControl for SnapGuest {
    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
    fn pause(&mut self) -> Result<(), GuestError> {
        self.paused = true;
        self.pauses += 1;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.paused = false;
        Ok(())
    }
    fn is_paused(&self) -> bool {
        self.paused
    }
    fn regs(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        self.vcpus
            .get(vcpu)
            .copied()
            .ok_or(GuestError::NoSuchVcpu(vcpu))
    }
    fn memory(&self) -> &dyn PhysMemory {
        &self.ram
    }
    fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        assert!(self.paused, "write while running");
        if self.fail_write_at == Some(self.writes) {
            self.fail_write_at = None;
            return Err(GuestError::Backend("injected write failure".into()));
        }
        self.writes += 1;
        let s = pa as usize;
        self.ram
            .0
            .get_mut(s..s + data.len())
            .ok_or(GuestError::WriteOutOfRange {
                pa,
                len: data.len(),
            })?
            .copy_from_slice(data);
        Ok(())
    }
    fn write_phys_batch(&mut self, writes: &[(u64, &[u8])]) -> Result<(), GuestError> {
        self.batches += 1;
        for &(pa, data) in writes {
            self.write_phys(pa, data)?;
        }
        Ok(())
    }
    fn set_breakpoints(&mut self, _addrs: &[u64]) -> Result<(), GuestError> {
        Ok(())
    }
    fn set_vcpu_breakpoints(&mut self, vcpu: usize, _addrs: &[u64]) -> Result<(), GuestError> {
        if vcpu >= self.vcpus.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        Ok(())
    }
    fn single_step(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        if vcpu >= self.vcpus.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        if !self.paused {
            return Err(GuestError::NotPaused);
        }
        Err(GuestError::Backend(
            "a snapshot guest cannot execute instructions".into(),
        ))
    }
    /// Nothing ever happens in a snapshot: times out at once while "running".
    fn wait_event(&mut self, _timeout: Duration) -> Result<Option<GuestEvent>, GuestError> {
        if self.paused {
            return Err(GuestError::Paused);
        }
        Ok(None)
    }
    fn patch_arena(&self) -> Option<(u64, u64)> {
        self.arena
    }
}

/// A snapshot's files.
pub struct Snapshot {
    /// "6.1" / "6.12".
    pub version: &'static str,
    /// RAM.
    pub ram: Vec<u8>,
    /// vCPUs.
    pub vcpus: Vec<VcpuRegs>,
    /// /proc/kallsyms.
    pub kallsyms: String,
    /// Parsed kallsyms.
    pub syms: SymbolMap,
    /// `uname -r` of the guest (from uname.txt: third field of `uname -a`).
    pub release: String,
}

/// Directory of the guest snapshot `version` ("6.1" / "6.12") under
/// `guest_images::snapshots_dir()`, the layout `harness::snapshot` writes.
pub fn snapshot_dir(version: &str) -> PathBuf {
    guest_images::snapshots_dir().join(version)
}

fn read(version: &str, file: &str) -> Vec<u8> {
    let p = snapshot_dir(version).join(file);
    if !p.is_file() {
        panic!(
            "guest snapshot {} missing: run `scripts/setup` (or `cargo run --release -p \
             hvpatch-tests --example snapshots`)",
            p.display()
        );
    }
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading guest snapshot {}: {e}", p.display()))
}

fn hex_after(block: &str, key: &str) -> u64 {
    let i = block
        .find(key)
        .unwrap_or_else(|| panic!("{key} missing in regs.txt"))
        + key.len();
    let h: String = block[i..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u64::from_str_radix(&h, 16).unwrap()
}

/// Parses HMP `info registers -a`: every register the engine and the reachability check use
/// (the introspect tests' parser).
pub fn parse_regs(text: &str) -> Vec<VcpuRegs> {
    hmp::parse_hmp_registers(text)
}

#[path = "../../../introspect/tests/common/hmp.rs"]
mod hmp;

impl Snapshot {
    /// A snapshot from parts (e.g. taken from a live guest).
    pub fn from_parts(
        version: &'static str,
        ram: Vec<u8>,
        vcpus: Vec<VcpuRegs>,
        kallsyms: String,
        release: String,
    ) -> Self {
        Snapshot {
            version,
            ram,
            vcpus,
            syms: SymbolMap::from_kallsyms(&kallsyms),
            kallsyms,
            release,
        }
    }
}

fn load(version: &'static str) -> Snapshot {
    let text = |f| String::from_utf8_lossy(&read(version, f)).into_owned();
    let kallsyms = text("kallsyms.txt");
    let uname = text("uname.txt");
    Snapshot {
        version,
        ram: read(version, "ram.bin"),
        vcpus: parse_regs(&text("regs.txt")),
        syms: SymbolMap::from_kallsyms(&kallsyms),
        kallsyms,
        release: uname.split_whitespace().nth(2).unwrap_or("").to_string(),
    }
}

/// The 6.1 snapshot.
pub fn snap_6_1() -> &'static Snapshot {
    static S: OnceLock<Snapshot> = OnceLock::new();
    S.get_or_init(|| load("6.1"))
}

/// The 6.12 snapshot.
pub fn snap_6_12() -> &'static Snapshot {
    static S: OnceLock<Snapshot> = OnceLock::new();
    S.get_or_init(|| load("6.12"))
}

impl Snapshot {
    /// A fresh guest over a copy of the RAM.
    pub fn guest(&self) -> SnapGuest {
        SnapGuest {
            ram: Ram(self.ram.clone()),
            vcpus: self.vcpus.clone(),
            paused: false,
            writes: 0,
            fail_write_at: None,
            batches: 0,
            pauses: 0,
            arena: None,
        }
    }
}

/// Compiles C source (with `#include <hvpatch.h>` prepended) into an object.
pub fn build_c(tag: &str, src: &str) -> Vec<u8> {
    // A directory per call: tests in one process build the same tags concurrently.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("hvpatch-ptest-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let c = d.join(format!("{tag}.c"));
    std::fs::write(&c, format!("#include <hvpatch.h>\n{src}\n")).unwrap();
    let o = d.join(format!("{tag}.o"));
    compile(&BuildOptions::new(&c, &o))
        .unwrap_or_else(|e| panic!("building {tag} (needs gcc): {e}"));
    std::fs::read(&o).unwrap()
}

/// A patch replacing `func` (a `seq_file` show function) by one printing `msg`.
pub fn show_patch(name: &str, func: &str, msg: &str) -> Vec<u8> {
    build_c(
        name,
        &format!(
            "HVPATCH_NAME(\"{name}\");\n\
             static int new_{func}(struct seq_file *m, void *v) {{ seq_printf(m, \"%s\\n\", \"{msg}\"); return 0; }}\n\
             HVPATCH_FUNC({func}, new_{func});\n"
        ),
    )
}

/// The klp sample patch.
pub fn cmdline_patch() -> Vec<u8> {
    show_patch(
        "cmdline-fix",
        "cmdline_proc_show",
        "this has been live patched",
    )
}

impl SnapGuest {
    /// Whether the guest is paused.
    pub fn is_paused_for_test(&self) -> bool {
        self.paused
    }
}

/// A `SnapGuest` with no memory and no vCPUs (fill in the fields).
pub fn snap_guest_default() -> SnapGuest {
    SnapGuest {
        ram: Ram(Vec::new()),
        vcpus: Vec::new(),
        paused: false,
        writes: 0,
        fail_write_at: None,
        batches: 0,
        pauses: 0,
        arena: None,
    }
}

/// How long snapshot tests let an unload wait (nothing runs in a snapshot, so a hold is final).
pub const UNLOAD_WAIT: std::time::Duration = std::time::Duration::from_millis(0);

/// The snapshot's kernel, opened from its RAM and registers (answers reachability checks).
pub fn kernel(s: &Snapshot) -> introspect::Kernel {
    introspect::Kernel::open(&introspect::SliceMemory::flat(&s.ram), &s.vcpus)
        .expect("Kernel::open on the snapshot")
}
