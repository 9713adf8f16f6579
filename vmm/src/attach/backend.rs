//! [`QemuAttach`]: [`guest_control::GuestControl`] over QEMU's gdbstub and RAM file.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_control::{GuestControl, GuestError, GuestEvent};
use introspect::{PhysMemory, VcpuRegs};

use super::gdb::{hex_decode, hex_encode, parse_thread_id, GdbClient, StopReply};
use super::layout::{includes, RegLayout};
use super::ram::{MemLayout, RamFile};
use super::AttachError;

/// Most hardware breakpoints (x86 has four debug address registers).
const MAX_BREAKPOINTS: usize = 4;
/// Most vCPUs accepted from the thread list.
const MAX_VCPUS: usize = 1024;
/// Bytes per memory-write packet (hex-encoded: twice that on the wire; QEMU's packet
/// buffer is 4 KiB).
const WRITE_CHUNK: usize = 1024;
/// Most gdbstub packets sent before their replies are read.
const PIPELINE: usize = 32;
/// Register names the backend needs from the target description.
const GPR_NAMES: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

/// Options of [`QemuAttach::connect_with`].
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    /// RAM file to guest-physical mapping.
    pub mem_layout: MemLayout,
    /// Guest RAM size, checked against the RAM file when given.
    pub mem_size: Option<u64>,
    /// Time allowed for each gdbstub request.
    pub timeout: Duration,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            mem_layout: MemLayout::Flat,
            mem_size: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A QEMU guest controlled through its gdbstub (all-stop mode) and shared RAM file.
///
/// Connecting leaves the guest running. Dropping it removes its breakpoints and detaches,
/// so the guest keeps running after hvpatch exits.
///
/// Per-vCPU breakpoints ([`GuestControl::set_vcpu_breakpoints`]) are emulated: QEMU's
/// gdbstub inserts a `Z1` breakpoint on every CPU, so the backend inserts the union of all
/// vCPUs' addresses (at most 4 in all) and a hit by a vCPU that did not ask for that address
/// is stepped over and the guest continued without an event. Such hits cost a few gdbstub
/// round trips each while the guest is stopped.
pub struct QemuAttach {
    gdb: GdbClient,
    ram: RamFile,
    layout: RegLayout,
    /// gdbstub thread id of each vCPU (vCPU index = position).
    threads: Vec<u64>,
    paused: bool,
    gone: Option<String>,
    /// Breakpoints inserted in QEMU (`Z1`): the union of `vcpu_bps`, sorted.
    breakpoints: Vec<u64>,
    /// Breakpoints each vCPU asked for (index = vCPU).
    vcpu_bps: Vec<Vec<u64>>,
    /// vCPUs that stopped on one of our breakpoints (need a step over it on resume).
    bp_vcpus: Vec<usize>,
    /// A breakpoint stop that arrived while we were pausing.
    pending: Option<GuestEvent>,
    /// Physical-memory-mode switches on (`Qqemu.PhyMemMode:1`) so far.
    phys_mode_switches: u64,
    /// Every vCPU's registers, read once per stop (all vCPUs in one pipelined batch); cleared
    /// whenever a vCPU runs.
    regs_cache: Option<Vec<VcpuRegs>>,
    timeout: Duration,
}

impl std::fmt::Debug for QemuAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuAttach").finish_non_exhaustive()
    }
}

/// `addrs` sorted, without duplicates.
fn sorted(addrs: &[u64]) -> Vec<u64> {
    let mut v = addrs.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn gerr(e: AttachError) -> GuestError {
    match e {
        AttachError::Closed => GuestError::Gone("QEMU closed the gdbstub connection".into()),
        e => GuestError::Backend(e.to_string()),
    }
}

impl QemuAttach {
    /// Attaches to the QEMU whose gdbstub listens on `gdb_socket` and whose guest RAM is the
    /// `memory-backend-file` `mem_file` (flat layout, guests up to 2.75 GiB).
    pub fn connect(gdb_socket: &Path, mem_file: &Path) -> Result<QemuAttach, AttachError> {
        Self::connect_with(gdb_socket, mem_file, AttachOptions::default())
    }

    /// [`QemuAttach::connect`] with options.
    pub fn connect_with(
        gdb_socket: &Path,
        mem_file: &Path,
        opts: AttachOptions,
    ) -> Result<QemuAttach, AttachError> {
        let ram = RamFile::open(mem_file, opts.mem_layout, opts.mem_size)?;
        let mut gdb = GdbClient::connect(gdb_socket)?;
        let t = opts.timeout;
        // QEMU stops the VM when a debugger connects. Ask why it stopped; if the VM was
        // running after all, the first byte stopped it and the packet was dropped: ask again.
        let mut stopped = false;
        for _ in 0..3 {
            match gdb.command("?", Duration::from_secs(2)) {
                Ok(r) if StopReply::parse(&r).is_some() => {
                    stopped = true;
                    break;
                }
                Ok(_) | Err(AttachError::Timeout) => continue,
                Err(e) => return Err(e),
            }
        }
        if !stopped {
            return Err(AttachError::Protocol("no stop reply to `?`".into()));
        }
        let sup = gdb.command("qSupported:xmlRegisters=i386", t)?;
        let sup = String::from_utf8_lossy(&sup).into_owned();
        if !sup.contains("qXfer:features:read+") {
            return Err(AttachError::Unsupported(format!(
                "target descriptions (qSupported: {sup})"
            )));
        }
        if sup.contains("QStartNoAckMode+") {
            gdb.start_no_ack(t)?;
        }
        let layout = Self::read_layout(&mut gdb, t)?;
        let mut me = QemuAttach {
            gdb,
            ram,
            layout,
            threads: Vec::new(),
            paused: true,
            gone: None,
            breakpoints: Vec::new(),
            vcpu_bps: Vec::new(),
            bp_vcpus: Vec::new(),
            pending: None,
            phys_mode_switches: 0,
            regs_cache: None,
            timeout: t,
        };
        me.threads = me.read_threads()?;
        me.vcpu_bps = vec![Vec::new(); me.threads.len()];
        me.check_phys_mode_and_ram()?;
        me.gdb.clear_stops();
        me.cont()?;
        Ok(me)
    }

    fn read_layout(gdb: &mut GdbClient, t: Duration) -> Result<RegLayout, AttachError> {
        let main = gdb.xfer_read("features", "target.xml", t)?;
        let main = String::from_utf8_lossy(&main).into_owned();
        let mut docs = vec![main.clone()];
        for inc in includes(&main).into_iter().take(16) {
            if inc.is_empty() || inc.contains([':', '#', '$', '}', '*']) {
                return Err(AttachError::Protocol(format!("bad include name {inc:?}")));
            }
            let d = gdb.xfer_read("features", &inc, t)?;
            docs.push(String::from_utf8_lossy(&d).into_owned());
        }
        let layout = RegLayout::from_xml(&docs)?;
        for name in GPR_NAMES
            .iter()
            .chain(&["rip", "eflags", "cs", "ss", "cr0", "cr3", "cr4"])
        {
            if layout.find(name).is_none() {
                return Err(AttachError::Unsupported(format!("register {name}")));
            }
        }
        Ok(layout)
    }

    fn read_threads(&mut self) -> Result<Vec<u64>, AttachError> {
        let mut threads = Vec::new();
        let mut reply = self.gdb.command_ok("qfThreadInfo", self.timeout)?;
        for _ in 0..MAX_VCPUS {
            match reply.split_first() {
                Some((b'm', list)) => {
                    for id in list.split(|&b| b == b',') {
                        let tid = parse_thread_id(id)
                            .ok_or_else(|| AttachError::Protocol("bad thread id".into()))?;
                        if threads.len() >= MAX_VCPUS {
                            return Err(AttachError::Protocol("too many threads".into()));
                        }
                        threads.push(tid);
                    }
                }
                Some((b'l', _)) => break,
                _ => return Err(AttachError::Protocol("bad thread list reply".into())),
            }
            reply = self.gdb.command_ok("qsThreadInfo", self.timeout)?;
        }
        if threads.is_empty() {
            return Err(AttachError::Protocol("no vCPU threads".into()));
        }
        Ok(threads)
    }

    /// Checks that physical-memory mode works and that the RAM file is this guest's RAM:
    /// the page under vCPU 0's CR3 must read the same through the stub and the file.
    fn check_phys_mode_and_ram(&mut self) -> Result<(), AttachError> {
        let regs = self.read_regs(0)?;
        let pa = regs.cr3 & 0x000f_ffff_ffff_f000;
        let mut from_file = [0u8; 64];
        self.ram.read_phys(pa, &mut from_file).map_err(|_| {
            AttachError::MemLayout(format!("CR3 page {pa:#x} is outside the RAM file"))
        })?;
        self.phys_mode(true)?;
        let r = self.gdb.command_ok(&format!("m{pa:x},40"), self.timeout);
        self.phys_mode(false)?;
        let from_stub =
            hex_decode(&r?).ok_or_else(|| AttachError::Protocol("bad memory reply".into()))?;
        if from_stub != from_file {
            return Err(AttachError::MemLayout(format!(
                "guest-physical {pa:#x} differs between the gdbstub and the RAM file: wrong file or layout"
            )));
        }
        Ok(())
    }

    fn phys_mode(&mut self, on: bool) -> Result<(), AttachError> {
        self.phys_mode_switches += u64::from(on);
        let r = self
            .gdb
            .command(&format!("Qqemu.PhyMemMode:{}", u8::from(on)), self.timeout)?;
        if r.as_slice() != b"OK" {
            return Err(AttachError::Unsupported(format!(
                "physical memory mode (Qqemu.PhyMemMode: {})",
                String::from_utf8_lossy(&r)
            )));
        }
        Ok(())
    }

    /// Registers of `vcpu` of the stopped guest: from the cache, else every vCPU's at once
    /// (`Hg` + `g` per thread, pipelined).
    fn read_regs(&mut self, vcpu: usize) -> Result<VcpuRegs, AttachError> {
        if vcpu >= self.threads.len() {
            return Err(AttachError::Protocol(format!("no vCPU {vcpu}")));
        }
        if self.regs_cache.is_none() {
            let cmds: Vec<String> = self
                .threads
                .iter()
                .flat_map(|tid| [format!("Hg{tid:x}"), "g".to_string()])
                .collect();
            let replies = self.gdb.commands(&cmds, self.timeout)?;
            let mut all = Vec::with_capacity(self.threads.len());
            for (i, pair) in replies.chunks(2).enumerate() {
                let [hg, g] = pair else {
                    return Err(AttachError::Protocol("missing register reply".into()));
                };
                if hg.as_slice() != b"OK" {
                    return Err(AttachError::Protocol(format!(
                        "Hg{:x}: {}",
                        self.threads[i],
                        String::from_utf8_lossy(hg)
                    )));
                }
                all.push(self.parse_g(g)?);
            }
            self.regs_cache = Some(all);
        }
        self.regs_cache
            .as_ref()
            .and_then(|c| c.get(vcpu).cloned())
            .ok_or_else(|| AttachError::Protocol(format!("no registers of vCPU {vcpu}")))
    }

    /// Decodes a `g` reply.
    fn parse_g(&self, reply: &[u8]) -> Result<VcpuRegs, AttachError> {
        if reply.first() == Some(&b'E') && reply.len() == 3 {
            return Err(AttachError::Stub {
                command: "g".into(),
                reply: String::from_utf8_lossy(reply).into_owned(),
            });
        }
        let g =
            hex_decode(reply).ok_or_else(|| AttachError::Protocol("bad register reply".into()))?;
        let l = &self.layout;
        let get = |name: &str| -> Result<u64, AttachError> {
            l.get(&g, name).ok_or_else(|| {
                AttachError::Protocol(format!("register {name} missing in `g` reply"))
            })
        };
        let opt = |name: &str| l.get(&g, name).unwrap_or(0);
        let mut gprs = [0u64; 16];
        for (slot, name) in gprs.iter_mut().zip(GPR_NAMES) {
            *slot = get(name)?;
        }
        Ok(VcpuRegs {
            gprs,
            rip: get("rip")?,
            rflags: get("eflags")?,
            cs: get("cs")? as u16,
            ss: get("ss")? as u16,
            cr0: get("cr0")?,
            cr2: opt("cr2"),
            cr3: get("cr3")?,
            cr4: get("cr4")?,
            efer: opt("efer"),
            fs_base: opt("fs_base"),
            gs_base: opt("gs_base"),
            kernel_gs_base: opt("k_gs_base"),
            lstar: None,
            idtr_base: None,
        })
    }

    /// Continues all vCPUs.
    fn cont(&mut self) -> Result<(), AttachError> {
        let deadline = Instant::now() + self.timeout;
        self.regs_cache = None;
        self.gdb.send(b"c", deadline)?;
        self.paused = false;
        Ok(())
    }

    /// Interrupts and waits for the stop. A breakpoint stop that raced with the interrupt
    /// is kept for the next `wait_event`.
    fn stop(&mut self) -> Result<(), AttachError> {
        self.gdb.send_interrupt()?;
        let deadline = Instant::now() + self.timeout;
        match self.gdb.wait_stop(deadline)? {
            None => Err(AttachError::Timeout),
            Some(StopReply::Exited(code)) => {
                self.gone = Some(format!("guest exited ({code})"));
                Err(AttachError::Closed)
            }
            Some(StopReply::Signal { signal, thread }) => {
                self.paused = true;
                if signal == 5 {
                    if let Some(ev) = self.breakpoint_event(thread)? {
                        self.pending = Some(ev);
                    }
                }
                Ok(())
            }
        }
    }

    /// The event for a SIGTRAP stop of `thread`, if it stopped on one of our breakpoints.
    fn breakpoint_event(&mut self, thread: Option<u64>) -> Result<Option<GuestEvent>, AttachError> {
        let Some(tid) = thread else { return Ok(None) };
        let Some(vcpu) = self.threads.iter().position(|&t| t == tid) else {
            return Ok(None);
        };
        let rip = self.read_regs(vcpu)?.rip;
        if !self.breakpoints.contains(&rip) {
            return Ok(None);
        }
        if !self.bp_vcpus.contains(&vcpu) {
            self.bp_vcpus.push(vcpu);
        }
        // Another vCPU's breakpoint (per-vCPU emulation): no event; stepped over on resume.
        Ok(self.vcpu_bps[vcpu]
            .contains(&rip)
            .then_some(GuestEvent::Breakpoint { vcpu, rip }))
    }

    /// Resumes; first steps the vCPU that sits on one of our breakpoints past it (QEMU would
    /// report the same breakpoint again at once).
    fn do_resume(&mut self) -> Result<(), AttachError> {
        for vcpu in std::mem::take(&mut self.bp_vcpus) {
            let rip = self.read_regs(vcpu)?.rip;
            if self.breakpoints.contains(&rip) {
                self.step_over(vcpu)?;
            }
        }
        self.cont()
    }

    /// Single-steps `vcpu` (`vCont;s:tid`: the other vCPUs stay stopped) with our
    /// breakpoints removed for the step. QEMU's default step flags hold off interrupts and
    /// timers during it.
    fn step_over(&mut self, vcpu: usize) -> Result<(), AttachError> {
        let tid = self.threads[vcpu];
        let bps = self.breakpoints.clone();
        for &a in &bps {
            self.gdb.command_ok(&format!("z1,{a:x},1"), self.timeout)?;
        }
        let deadline = Instant::now() + self.timeout;
        self.regs_cache = None;
        self.gdb
            .send(format!("vCont;s:{tid:x}").as_bytes(), deadline)?;
        let stop = self.gdb.wait_stop(deadline)?;
        for &a in &bps {
            self.gdb.command_ok(&format!("Z1,{a:x},1"), self.timeout)?;
        }
        match stop {
            Some(StopReply::Signal { .. }) => Ok(()),
            Some(StopReply::Exited(code)) => {
                self.gone = Some(format!("guest exited ({code})"));
                Err(AttachError::Closed)
            }
            None => Err(AttachError::Timeout),
        }
    }

    fn check_alive(&self) -> Result<(), GuestError> {
        match &self.gone {
            Some(why) => Err(GuestError::Gone(why.clone())),
            None => Ok(()),
        }
    }

    /// Marks the guest gone on connection loss.
    fn track<T>(&mut self, r: Result<T, AttachError>) -> Result<T, GuestError> {
        if let Err(AttachError::Closed) = &r {
            if self.gone.is_none() {
                self.gone = Some("QEMU closed the gdbstub connection".into());
            }
        }
        r.map_err(gerr)
    }

    /// Runs `f` with the guest paused, restoring the run state afterwards.
    fn paused_op<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, AttachError>,
    ) -> Result<T, GuestError> {
        self.check_alive()?;
        let was_running = !self.paused;
        if was_running {
            let r = self.stop();
            self.track(r)?;
        }
        let r = f(self);
        let r = self.track(r)?;
        if was_running {
            let c = self.do_resume();
            self.track(c)?;
        }
        Ok(r)
    }

    /// Replaces every vCPU's breakpoints with `per` and inserts their union in QEMU.
    fn insert_breakpoints(&mut self, per: Vec<Vec<u64>>) -> Result<(), GuestError> {
        let mut union: Vec<u64> = per.iter().flatten().copied().collect();
        union.sort_unstable();
        union.dedup();
        if union.len() > MAX_BREAKPOINTS {
            return Err(GuestError::TooManyBreakpoints(union.len()));
        }
        self.paused_op(|me| {
            for a in std::mem::take(&mut me.breakpoints) {
                me.gdb.command_ok(&format!("z1,{a:x},1"), me.timeout)?;
            }
            for &a in &union {
                let r = me.gdb.command_ok(&format!("Z1,{a:x},1"), me.timeout)?;
                if r.as_slice() != b"OK" {
                    return Err(AttachError::Unsupported(format!(
                        "hardware breakpoints (Z1: {})",
                        String::from_utf8_lossy(&r)
                    )));
                }
                me.breakpoints.push(a);
            }
            me.vcpu_bps = per;
            Ok(())
        })
    }

    fn step_one(&mut self, vcpu: usize) -> Result<VcpuRegs, AttachError> {
        let tid = self.threads[vcpu];
        let r = self.gdb.command_ok(&format!("Hg{tid:x}"), self.timeout)?;
        if r.as_slice() != b"OK" {
            return Err(AttachError::Protocol(format!(
                "Hg{tid:x}: {}",
                String::from_utf8_lossy(&r)
            )));
        }
        let before = self.read_regs(vcpu)?.rip;
        // QEMU may answer a step with a stop that was already pending (the vCPU did not move):
        // step again, a few times at most. (An instruction that keeps RIP, a `rep` string
        // iteration or a jump to itself, is thus stepped up to three times.)
        let mut regs;
        let mut tries = 0;
        loop {
            tries += 1;
            self.step_over(vcpu)?;
            regs = self.read_regs(vcpu)?;
            if regs.rip != before || tries == 3 {
                break;
            }
        }
        self.bp_vcpus.retain(|&v| v != vcpu);
        // Landed on a breakpoint: step over it on resume, as after a hit.
        if self.breakpoints.contains(&regs.rip) {
            self.bp_vcpus.push(vcpu);
        }
        Ok(regs)
    }

    /// gdbstub thread ids of the vCPUs.
    pub fn threads(&self) -> &[u64] {
        &self.threads
    }

    /// How often the backend switched the gdbstub to physical-memory mode (one per
    /// [`GuestControl::write_phys_batch`], plus one at connect).
    pub fn phys_mode_switches(&self) -> u64 {
        self.phys_mode_switches
    }

    /// The mapped RAM file.
    pub fn ram(&self) -> &RamFile {
        &self.ram
    }
}

impl GuestControl for QemuAttach {
    fn vcpu_count(&self) -> usize {
        self.threads.len()
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        self.check_alive()?;
        if self.paused {
            return Ok(());
        }
        let r = self.stop();
        self.track(r)
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.check_alive()?;
        if !self.paused {
            return Ok(());
        }
        let r = self.do_resume();
        self.track(r)
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn regs(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        self.check_alive()?;
        if vcpu >= self.threads.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        if !self.paused {
            return Err(GuestError::NotPaused);
        }
        let r = self.read_regs(vcpu);
        self.track(r)
    }

    fn memory(&self) -> &dyn PhysMemory {
        &self.ram
    }

    fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.write_phys_batch(&[(pa, data)])
    }

    /// Straight into the RAM file when it is writable (no pause), else through the gdbstub.
    fn write_data_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        match self.ram.write_direct(pa, data) {
            Ok(true) => Ok(()),
            Ok(false) => self.write_phys(pa, data),
            Err(e) => {
                tracing::debug!("direct write of {pa:#x}: {e}; through the gdbstub instead");
                self.write_phys(pa, data)
            }
        }
    }

    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<(), GuestError> {
        let per = vec![sorted(addrs); self.threads.len()];
        self.insert_breakpoints(per)
    }

    /// Emulated (see [`QemuAttach`]): QEMU's `Z1` applies to all CPUs.
    fn set_vcpu_breakpoints(&mut self, vcpu: usize, addrs: &[u64]) -> Result<(), GuestError> {
        if vcpu >= self.threads.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        let mut per = self.vcpu_bps.clone();
        per[vcpu] = sorted(addrs);
        self.insert_breakpoints(per)
    }

    /// `Hg` + `vCont;s:tid` on that vCPU's thread; the others stay stopped.
    fn single_step(&mut self, vcpu: usize) -> Result<VcpuRegs, GuestError> {
        self.check_alive()?;
        if vcpu >= self.threads.len() {
            return Err(GuestError::NoSuchVcpu(vcpu));
        }
        if !self.paused {
            return Err(GuestError::NotPaused);
        }
        let r = self.step_one(vcpu);
        self.track(r)
    }

    /// One physical-memory-mode toggle (`Qqemu.PhyMemMode:1` … `:0`) for the whole batch;
    /// then the written bytes are checked in the RAM file (local reads, no stub round trips).
    fn write_phys_batch(&mut self, writes: &[(u64, &[u8])]) -> Result<(), GuestError> {
        for &(pa, data) in writes {
            if !self.ram.contains(pa, data.len() as u64) {
                return Err(GuestError::WriteOutOfRange {
                    pa,
                    len: data.len(),
                });
            }
        }
        if writes.iter().all(|(_, d)| d.is_empty()) {
            return Ok(());
        }
        self.paused_op(|me| {
            me.phys_mode(true)?;
            // The writes go out pipelined, at most PIPELINE packets before their replies.
            let cmds: Vec<String> = writes
                .iter()
                .flat_map(|&(pa, data)| {
                    data.chunks(WRITE_CHUNK).enumerate().map(move |(i, chunk)| {
                        let a = pa + (i * WRITE_CHUNK) as u64;
                        format!("M{a:x},{:x}:{}", chunk.len(), hex_encode(chunk))
                    })
                })
                .collect();
            let mut res = Ok(());
            'writes: for part in cmds.chunks(PIPELINE) {
                match me.gdb.commands(part, me.timeout) {
                    Ok(replies) => {
                        if let Some(r) = replies.iter().find(|r| r.as_slice() != b"OK") {
                            res = Err(AttachError::Protocol(format!(
                                "M: {}",
                                String::from_utf8_lossy(r)
                            )));
                            break 'writes;
                        }
                    }
                    Err(e) => {
                        res = Err(e);
                        break 'writes;
                    }
                }
            }
            // Always leave physical mode, even after a failed write.
            let off = me.phys_mode(false);
            res?;
            off?;
            // The RAM file must now hold the bytes (of each write no later write overlaps).
            for (k, &(pa, data)) in writes.iter().enumerate() {
                let end = pa + data.len() as u64;
                let overlapped = writes[k + 1..]
                    .iter()
                    .any(|&(p, d)| p < end && pa < p + d.len() as u64);
                if data.is_empty() || overlapped {
                    continue;
                }
                let mut back = vec![0u8; data.len()];
                me.ram
                    .read_phys(pa, &mut back)
                    .map_err(|e| AttachError::MemLayout(e.to_string()))?;
                if back != data {
                    return Err(AttachError::MemLayout(format!(
                        "write at {pa:#x} through the gdbstub is not visible in the RAM file"
                    )));
                }
            }
            Ok(())
        })
    }

    fn wait_event(&mut self, timeout: Duration) -> Result<Option<GuestEvent>, GuestError> {
        self.check_alive()?;
        if let Some(ev) = self.pending.take() {
            return Ok(Some(ev));
        }
        if self.paused {
            return Err(GuestError::Paused);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.gdb.wait_stop(deadline);
            match self.track(r)? {
                None => return Ok(None),
                Some(StopReply::Exited(code)) => {
                    self.gone = Some(format!("guest exited ({code})"));
                    return Ok(Some(GuestEvent::Exited));
                }
                Some(StopReply::Signal { signal, thread }) => {
                    self.paused = true;
                    if signal == 5 {
                        let r = self.breakpoint_event(thread);
                        if let Some(ev) = self.track(r)? {
                            return Ok(Some(ev));
                        }
                    }
                    // Some other stop (e.g. a monitor `stop`): keep the guest running.
                    let r = self.do_resume();
                    self.track(r)?;
                }
            }
        }
    }
}

impl Drop for QemuAttach {
    fn drop(&mut self) {
        if self.gone.is_some() {
            return;
        }
        if !self.paused && self.stop().is_err() {
            return;
        }
        for a in std::mem::take(&mut self.breakpoints) {
            let _ = self.gdb.command(&format!("z1,{a:x},1"), self.timeout);
        }
        // Detach: QEMU resumes the guest.
        if self.gdb.command_ok("D", self.timeout).is_ok() {
            DETACHED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Set once a [`QemuAttach`] detached from its gdbstub with QEMU's `OK` (the guest runs on).
/// `hvpatch attach` releases its guard only then; otherwise the guard detaches for it.
pub static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
