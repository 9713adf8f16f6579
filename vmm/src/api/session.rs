//! A session: one guest (behind [`GuestControl`]) and the state hvpatch keeps about it — the
//! introspected kernel and the patch engine. Every request runs to completion before the next.

use std::time::{Duration, Instant};

use base64::Engine as _;
use introspect::{Kernel, VcpuRegs};
use patcher::journal::{self, JournalKey};
use patcher::kernel::KernelSymbols;
use patcher::{Engine, GuestControl, Target};
use serde::Serialize;
use serde_json::Value;

use super::error::ReqError;
use super::protocol::{InspectWhat, Request, Response};
use super::server::{Handler, Reply};
use super::types::{
    Forced, FrameLine, ModuleResult, Patch, PatchArena, PatchStatus, StackView, Stacks, Status,
    SymbolLine, SymbolMatch, TaskStack, Unloaded, Vcpu, VcpuStack,
};

mod module_hooks;

/// Longest banner compared when checking that the cached kernel model still fits the guest.
const BANNER_MAX: usize = 512;

/// The guest plus hvpatch's model of it.
pub struct Session {
    control: Box<dyn GuestControl>,
    host: &'static str,
    /// Built on first use; rebuilt when the guest no longer matches it (reboot, new KASLR).
    kernel: Option<Kernel>,
    engine: Engine,
    /// When [`Handler::tick`] next re-checks held patches, and the current backoff.
    next_reap: Instant,
    reap_every: Duration,
    /// Unloads waiting for their patch's pages to become unreachable.
    pending: Vec<PendingUnload>,
    /// No waiting unload is checked before this (the pause budget).
    next_unload_check: Instant,
    /// Clients (and deadlines) waiting for the transition in progress to end.
    waiters: Vec<Waiter>,
    /// The transition is not checked again before this (the pause budget).
    next_transition_check: Instant,
    /// Where the engine state is kept after every change, and what was last written there.
    state_file: Option<(std::path::PathBuf, String)>,
    /// The journal of the engine state in guest memory, when kept ([`patcher::journal`]).
    journal: Option<Journal>,
    /// The operator paused the guest (`pause`): boundary breakpoint hits are not served (that
    /// would resume it) until `resume`.
    operator_paused: bool,
    /// Boundary breakpoints were armed at the last tick: hits queued before they were removed
    /// may still hold the guest paused (KVM), so the next tick drains them too.
    drain_hits: bool,
    /// The module hooks armed (`[coming, going]` breakpoint addresses), see `module_hooks.rs`.
    module_hooks: Option<[u64; 2]>,
}

/// The journal in guest memory ([`patcher::journal`]) and where its next record goes.
struct Journal {
    key: JournalKey,
    /// What the newest record written by this process holds.
    last: Option<String>,
    /// Sequence number of the newest record (ours or found).
    seq: u64,
    /// Slot index of the next write.
    next: usize,
    /// Whether the slots may hold a record (cleared when nothing is loaded).
    written: bool,
    /// The arena had no room for the slots (said once).
    no_room: bool,
}

/// What a client waits for while a transition runs.
#[derive(Debug)]
enum WaitOp {
    /// A load, enable or disable: answered with the patch.
    Switch,
    /// An unload: once disabled, the patch is freed (the unload continues as usual).
    Unload(Duration),
    /// No client: only the deadline (a `wait: false` request with a timeout).
    Deadline,
}

/// A client waiting for the transition of `patch` to end, or a deadline reversing it.
struct Waiter {
    op: WaitOp,
    patch: String,
    reply: Option<Reply>,
    deadline: Option<Instant>,
    started: Instant,
    /// The target the transition had when this waiter's deadline reversed it, and what
    /// blocked it then.
    reversed_from: Option<(i32, Vec<patcher::transition::Blocker>)>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for p in self.pending.drain(..) {
            p.reply.send(ReqError::Stopping.into());
        }
        for w in self.waiters.drain(..) {
            if let Some(r) = w.reply {
                r.send(ReqError::Stopping.into());
            }
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

/// How long `patch unload` waits for a disabled patch to become unreachable, by default.
pub const DEFAULT_UNLOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait an unload request may ask for (a held patch is freed later anyway).
pub const MAX_UNLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a waiting load, enable or disable lets its transition run before reversing it.
pub const DEFAULT_TRANSITION_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest interval between two checks of a transition.
const TRANSITION_CHECK_MIN: Duration = Duration::from_millis(5);
/// First and longest interval between background checks of held patches.
const REAP_FIRST: Duration = Duration::from_millis(100);
const REAP_MAX: Duration = Duration::from_secs(5);
/// Longest time one tick serves boundary breakpoint hits before requests get their turn.
const BOUNDARY_SLICE: Duration = Duration::from_millis(5);

/// A result on the wire.
fn to_json<T: Serialize>(v: &T) -> Result<Value, ReqError> {
    Ok(serde_json::to_value(v)?)
}

fn missing_kernel() -> ReqError {
    ReqError::Internal("kernel model missing".into())
}

impl Session {
    /// A session over `control`; `host` names the backend ("kvm" or "qemu-attach").
    pub fn new(control: Box<dyn GuestControl>, host: &'static str) -> Session {
        Session {
            control,
            host,
            kernel: None,
            engine: Engine::new(),
            next_reap: Instant::now(),
            reap_every: REAP_FIRST,
            pending: Vec::new(),
            next_unload_check: Instant::now(),
            waiters: Vec::new(),
            next_transition_check: Instant::now(),
            state_file: None,
            journal: None,
            operator_paused: false,
            drain_hits: false,
            module_hooks: None,
        }
    }

    /// Keeps the engine state in `path` after every change, and continues from the state
    /// there now, if any: the patches and a transition a dead server left in the guest. A state
    /// that does not match the guest (its entry sites or arena mapping differ: another guest,
    /// a reboot) is set aside as `<path>.stale`. With `journal_key`, the state is also kept in
    /// a journal in guest memory ([`patcher::journal`]), authenticated with that key, and the
    /// session continues from the journal when the file is missing or does not match.
    pub fn keep_state_in(&mut self, path: std::path::PathBuf, journal_key: Option<JournalKey>) {
        let mut from_file = false;
        if let Ok(json) = std::fs::read_to_string(&path) {
            match Engine::from_state(&json) {
                Ok(e) => {
                    let problems = e.check(self.control.as_ref());
                    if problems.is_empty() {
                        tracing::info!(
                            patches = e.list().len(),
                            transition = e.in_transition(),
                            "continuing from {}",
                            path.display()
                        );
                        self.engine = e;
                        from_file = true;
                    } else {
                        tracing::warn!(
                            "{} does not match the guest ({}); set aside",
                            path.display(),
                            problems.join("; ")
                        );
                        let _ = std::fs::rename(&path, path.with_extension("state.stale"));
                    }
                }
                Err(e) => tracing::warn!("{}: {e}; set aside", path.display()),
            }
        }
        if let Some(key) = journal_key {
            // An empty state (a server that never loaded anything) does not hide the journal.
            let empty = self.engine.list().is_empty() && !self.engine.in_transition();
            self.open_journal(key, !from_file || empty);
        }
        self.state_file = Some((path, String::new()));
        self.persist();
    }

    /// Finds the journal in guest memory; with `adopt`, continues from its newest record when
    /// that matches the guest. An authenticated record that does not match is cleared.
    fn open_journal(&mut self, key: JournalKey, adopt: bool) {
        let window = self
            .control
            .patch_arena()
            .map(|(start, len)| (start, start.saturating_add(len)))
            .unwrap_or(patcher::arena::LOW_WINDOW);
        let scan = journal::scan(self.control.memory(), window, &key);
        for (pa, why) in &scan.rejected {
            tracing::warn!("journal record at {pa:#x} ignored: {why}");
        }
        let mut j = Journal {
            key,
            last: None,
            seq: 0,
            next: 0,
            written: false,
            no_room: false,
        };
        if let Some((pa, rec)) = scan.newest {
            j.seq = rec.seq;
            // A record is cleared only where it says its slots are: a guest that copied an
            // authentic record elsewhere must not make us zero bytes of its choosing.
            let (found, own_slot) = match Engine::from_state(&rec.state) {
                Ok(e) => {
                    let own = e.journal_starts().contains(&pa);
                    let problems = e.check(self.control.as_ref());
                    if problems.is_empty() {
                        (Some(e), own)
                    } else {
                        tracing::warn!(
                            "journal record {} at {pa:#x} does not match the guest ({})",
                            rec.seq,
                            problems.join("; ")
                        );
                        (None, own)
                    }
                }
                Err(e) => {
                    tracing::warn!("journal record {} at {pa:#x}: {e}", rec.seq);
                    (None, false)
                }
            };
            match found {
                Some(e) if adopt && own_slot => {
                    tracing::info!(
                        patches = e.list().len(),
                        transition = e.in_transition(),
                        "continuing from the journal in guest memory (record {} at {pa:#x})",
                        rec.seq
                    );
                    self.engine = e;
                }
                Some(_) if !own_slot => tracing::warn!(
                    "journal record {} at {pa:#x} is not in a slot it names; ignored",
                    rec.seq
                ),
                Some(_) => {}
                None if own_slot => {
                    // The header is enough to invalidate it, and those bytes are known to be
                    // ours (the pages after it may be anybody's by now).
                    let zero = vec![0u8; journal::HEADER];
                    match self.control.write_data_phys(pa, &zero) {
                        Ok(()) => tracing::info!("stale journal record at {pa:#x} cleared"),
                        Err(e) => tracing::warn!("clearing the journal record at {pa:#x}: {e}"),
                    }
                }
                None => {}
            }
            let slots = self.engine.journal_starts();
            j.written = !slots.is_empty();
            j.next = usize::from(slots.first() == Some(&pa));
        }
        self.journal = Some(j);
    }

    /// Writes the engine state to the journal and the state file where it changed.
    fn persist(&mut self) {
        self.persist_journal();
        let Some((path, last)) = &mut self.state_file else {
            return;
        };
        let now = self.engine.state();
        if &now == last {
            return;
        }
        let tmp = path.with_extension("state.tmp");
        match std::fs::write(&tmp, &now).and_then(|()| std::fs::rename(&tmp, &*path)) {
            Ok(()) => *last = now,
            Err(e) => tracing::warn!("saving the engine state to {}: {e}", path.display()),
        }
    }

    /// Writes the journal record if what it keeps changed ([`Engine::journal_state`]), into
    /// the slot not holding the newest record; clears both slots once nothing is loaded.
    fn persist_journal(&mut self) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if self.engine.journal_state().is_none() {
            if j.written {
                let zero = vec![0u8; journal::SLOT_BYTES];
                for pa in self.engine.journal_starts() {
                    if let Err(e) = self.control.write_data_phys(pa, &zero) {
                        tracing::warn!("clearing the journal at {pa:#x}: {e}");
                    }
                }
                j.written = false;
                j.last = None;
            }
            return;
        }
        let slots = match self.engine.journal_slots(self.control.memory()) {
            Ok(s) if s.len() == journal::SLOTS => s,
            Ok(_) => return,
            Err(e) => {
                if !j.no_room {
                    tracing::warn!("no room for the journal in guest memory: {e}");
                    j.no_room = true;
                }
                return;
            }
        };
        let Some(state) = self.engine.journal_state() else {
            return;
        };
        if j.last.as_deref() == Some(state.as_str()) {
            return;
        }
        let rec = match journal::encode(&state, j.seq + 1, &j.key) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{e}; a restart needs the state file");
                return;
            }
        };
        match self.control.write_data_phys(slots[j.next], &rec) {
            Ok(()) => {
                tracing::debug!(
                    seq = j.seq + 1,
                    state = state.len(),
                    record = rec.len(),
                    "journal record written at {:#x}",
                    slots[j.next]
                );
                j.seq += 1;
                j.next ^= 1;
                j.last = Some(state);
                j.written = true;
            }
            Err(e) => tracing::warn!("writing the journal at {:#x}: {e}", slots[j.next]),
        }
    }

    /// Frees held patches that nothing reaches any more (one check, in one pause).
    fn reap(&mut self) {
        let Some(kernel) = self.kernel.as_ref() else {
            return;
        };
        match self.engine.reap(self.control.as_mut(), kernel) {
            Ok(freed) if !freed.is_empty() => {
                tracing::info!(?freed, "held patches freed");
                self.reap_every = REAP_FIRST;
            }
            Ok(_) => self.reap_every = (self.reap_every * 2).min(REAP_MAX),
            Err(e) => {
                tracing::warn!("checking held patches: {e}");
                self.reap_every = REAP_MAX;
            }
        }
        self.next_reap = Instant::now() + self.reap_every;
    }

    /// Runs `f` with every vCPU paused and their registers read, then restores the run state
    /// the guest had before (an operator's `pause` is kept).
    fn paused<T>(
        &mut self,
        f: impl FnOnce(&mut Session, &[VcpuRegs]) -> Result<T, ReqError>,
    ) -> Result<T, ReqError> {
        let was_paused = self.control.is_paused();
        if !was_paused {
            self.control.pause()?;
        }
        let regs: Result<Vec<VcpuRegs>, ReqError> = (0..self.control.vcpu_count())
            .map(|i| self.control.regs(i).map_err(ReqError::from))
            .collect();
        let result = regs.and_then(|regs| f(self, &regs));
        if !was_paused {
            let resumed = self.control.resume().map_err(ReqError::from);
            if result.is_ok() {
                resumed?;
            }
        }
        result
    }

    /// The kernel model, built (or rebuilt) if needed. The guest must be paused.
    fn kernel(&mut self, regs: &[VcpuRegs]) -> Result<&Kernel, ReqError> {
        let mem = self.control.memory();
        let still_valid = self.kernel.as_ref().is_some_and(|k| {
            let banner = k
                .lookup("linux_banner", None)
                .ok()
                .and_then(|va| k.read_cstr(mem, va, BANNER_MAX));
            banner.is_some() && banner.as_deref() == k.info().banner.as_deref()
        });
        if !still_valid {
            if self.kernel.is_some() && !self.engine.list().is_empty() {
                // The guest runs another kernel (rebooted): its patches went with the old one.
                tracing::warn!(
                    "guest kernel changed; forgetting {} loaded patches",
                    self.engine.list().len()
                );
                if self.engine.wants_boundary_hits() {
                    // The old transition's boundary breakpoints must not fire in the new kernel.
                    if let Err(e) = self.control.set_breakpoints(&[]) {
                        tracing::warn!("removing the old kernel's boundary breakpoints: {e}");
                    }
                }
                self.engine = Engine::new();
                for p in self.pending.drain(..) {
                    p.reply.send(ReqError::KernelChanged.into());
                }
                for w in self.waiters.drain(..) {
                    if let Some(r) = w.reply {
                        r.send(ReqError::KernelChanged.into());
                    }
                }
            }
            let k = Kernel::open(self.control.memory(), regs)?;
            self.kernel = Some(k);
        }
        self.kernel.as_ref().ok_or_else(missing_kernel)
    }

    fn status(&mut self) -> Status {
        Status {
            host: self.host.to_string(),
            vcpus: self.control.vcpu_count(),
            paused: self.control.is_paused(),
            patch_arena: self
                .control
                .patch_arena()
                .map(|(start, len)| PatchArena { start, len }),
            patches: self.engine.list().len(),
        }
    }

    fn inspect(&mut self, what: InspectWhat, name: Option<String>) -> Result<Value, ReqError> {
        self.paused(|s, regs| {
            s.kernel(regs)?;
            let (Some(k), mem) = (s.kernel.as_ref(), s.control.memory()) else {
                return Err(missing_kernel());
            };
            match what {
                InspectWhat::Kernel => to_json(k.info()),
                InspectWhat::Symbols => {
                    let mut all: Vec<SymbolLine> = k
                        .symbols()
                        .iter()
                        .map(|y| SymbolLine {
                            addr: y.addr,
                            kind: y.kind,
                            name: y.name.to_string(),
                            module: None,
                        })
                        .collect();
                    // A kernel without module support (no `modules` list in BTF) has none.
                    let mods = match k.module_symbols(mem) {
                        Err(introspect::ModuleError::NoLayout) => Vec::new(),
                        r => r?,
                    };
                    // Then the JITed BPF programs, `[bpf]`, as /proc/kallsyms lists them.
                    let bpf = k.bpf_symbols(mem)?;
                    all.extend(mods.into_iter().chain(bpf).map(|y| SymbolLine {
                        addr: y.addr,
                        kind: y.kind,
                        name: y.name,
                        module: Some(y.module),
                    }));
                    to_json(&all)
                }
                InspectWhat::Modules => match k.modules(mem) {
                    Err(introspect::ModuleError::NoLayout) => to_json(&Vec::<ModuleResult>::new()),
                    r => to_json(&r?),
                },
                InspectWhat::Symbol => {
                    let name = name.ok_or_else(|| {
                        ReqError::BadRequest("inspect symbol needs a name".into())
                    })?;
                    // `MODULE:NAME` looks in one module only (like kallsyms_lookup_name).
                    let (only, sym) = match name.split_once(':') {
                        Some((m, n)) => (Some(m.to_string()), n.to_string()),
                        None => (None, name.clone()),
                    };
                    let mut matches: Vec<SymbolMatch> = Vec::new();
                    if only.is_none() || only.as_deref() == Some("vmlinux") {
                        let mut all: Vec<_> = k.symbols().lookup_all(&sym).collect();
                        all.sort_by_key(|y| y.index);
                        matches.extend(all.iter().enumerate().map(|(i, y)| {
                            SymbolMatch {
                                addr: y.addr,
                                kind: y.kind,
                                name: y.name.to_string(),
                                sympos: i + 1,
                                size: k
                                    .symbolize(y.addr)
                                    .filter(|r| r.addr == y.addr)
                                    .map(|r| r.size),
                                module: None,
                            }
                        }));
                    }
                    let modules = match k.modules(mem) {
                        Err(introspect::ModuleError::NoLayout) => Vec::new(),
                        r => r?,
                    };
                    for m in modules {
                        if only.as_ref().is_some_and(|o| *o != m.name) {
                            continue;
                        }
                        let syms = k.symbols_of_module(mem, &m)?;
                        let defined = syms.iter().filter(|y| y.defined && y.name == sym);
                        for (i, y) in defined.enumerate() {
                            matches.push(SymbolMatch {
                                addr: y.addr,
                                kind: y.kind,
                                name: y.name.clone(),
                                sympos: i + 1,
                                size: introspect::modsyms::symbol_size(&syms, &m, y.addr),
                                module: Some(m.name.clone()),
                            });
                        }
                    }
                    if matches.is_empty() {
                        return Err(ReqError::NoSymbol(name));
                    }
                    to_json(&matches)
                }
                InspectWhat::Tasks => to_json(&k.tasks(mem, regs)?),
                InspectWhat::Stacks => {
                    let tasks = k.tasks(mem, regs)?;
                    let mut vcpus = Vec::new();
                    for i in 0..regs.len() {
                        let st = k.vcpu_stack(mem, regs, i)?;
                        vcpus.push(VcpuStack {
                            vcpu: i,
                            stack: stack_view(k, mem, &st),
                        });
                    }
                    let mut out = Vec::new();
                    for t in tasks.iter().filter(|t| t.running_on_vcpu.is_none()) {
                        let st = k.task_stack(mem, t)?;
                        out.push(TaskStack {
                            pid: t.pid,
                            comm: t.comm.clone(),
                            addr: t.addr,
                            stack: stack_view(k, mem, &st),
                        });
                    }
                    to_json(&Stacks { vcpus, tasks: out })
                }
                InspectWhat::Vcpus => {
                    let tasks = k.tasks(mem, regs)?;
                    let cpus = k.vcpu_cpus(mem, regs)?;
                    let mut out = Vec::new();
                    for (i, r) in regs.iter().enumerate() {
                        let st = k.vcpu_stack(mem, regs, i).ok();
                        let cur = cpus.get(i).and_then(|c| c.current);
                        let task = cur.and_then(|a| tasks.iter().find(|t| t.addr == a));
                        out.push(Vcpu {
                            vcpu: i,
                            cpu: cpus.get(i).and_then(|c| c.cpu),
                            mode: st.as_ref().map(|s| s.kind),
                            rip: r.rip,
                            rsp: r.rsp(),
                            cr3: r.cr3,
                            cpl: r.cpl(),
                            rip_symbol: if r.cpl() == 0 {
                                k.symbolize(r.rip).map(|y| y.to_string())
                            } else {
                                None
                            },
                            current: cur,
                            current_pid: task.map(|t| t.pid),
                            current_comm: task.map(|t| t.comm.clone()),
                            stack: st.as_ref().map(|st| stack_view(k, mem, st)),
                        });
                    }
                    to_json(&out)
                }
            }
        })
    }

    fn patch_load(
        &mut self,
        object_base64: &str,
        file_name: &str,
        opts: patcher::LoadOptions,
    ) -> Result<Patch, ReqError> {
        let object = base64::engine::general_purpose::STANDARD
            .decode(object_base64)
            .map_err(|e| ReqError::BadRequest(format!("object_base64 is not base64: {e}")))?;
        // Build the kernel model while paused (consistent registers), then let the engine do
        // its own preparation outside and its writes inside its own pause window.
        // EFER.NXE decides whether the arena's data pages may carry NX; read it in the same pause.
        let nx = self.paused(|s, regs| {
            s.kernel(regs)?;
            Ok(regs.first().is_some_and(|r| r.nx_enabled()))
        })?;
        let Some(kernel) = self.kernel.as_ref() else {
            return Err(missing_kernel());
        };
        let syms = KernelSymbols::new(kernel, self.control.memory());
        let target = Target {
            symbols: &syms,
            paging: syms.paging(nx),
        };
        let info = self.engine.load_consistent(
            self.control.as_mut(),
            &target,
            kernel,
            &object,
            file_name,
            opts,
        )?;
        Ok(info.into())
    }

    /// After a load, enable or disable: answers at once, or waits for the transition (and
    /// arms its deadline).
    fn after_switch(
        &mut self,
        name: &str,
        wait: bool,
        timeout: Option<Duration>,
        result: Result<(), ReqError>,
        reply: Reply,
    ) {
        if let Err(e) = result {
            return reply.send(e.into());
        }
        let running = self
            .engine
            .transition_status()
            .is_some_and(|t| t.patch == name);
        let deadline = timeout.map(|t| Instant::now() + t);
        if running && wait {
            self.waiters.push(Waiter {
                op: WaitOp::Switch,
                patch: name.to_string(),
                reply: Some(reply),
                deadline,
                started: Instant::now(),
                reversed_from: None,
            });
            return;
        }
        if running && deadline.is_some() {
            self.waiters.push(Waiter {
                op: WaitOp::Deadline,
                patch: name.to_string(),
                reply: None,
                deadline,
                started: Instant::now(),
                reversed_from: None,
            });
        }
        reply.send(self.patch_result(name));
    }

    fn patch_result(&self, name: &str) -> Response {
        match self.engine.info(name) {
            Some(i) => match to_json(&Patch::from(i)) {
                Ok(v) => Response::ok(v),
                Err(e) => e.into(),
            },
            None => ReqError::NoPatch(name.to_string()).into(),
        }
    }

    /// `patch enable` / `patch disable` (target 1 / 0).
    fn patch_switch(
        &mut self,
        name: &str,
        target: i32,
        opts: patcher::SwitchOptions,
    ) -> Result<(), ReqError> {
        self.paused(|s, regs| s.kernel(regs).map(|_| ()))?;
        let Some(kernel) = self.kernel.as_ref() else {
            return Err(missing_kernel());
        };
        if target == 1 {
            self.engine
                .enable(self.control.as_mut(), kernel, name, opts)?;
        } else {
            self.engine
                .disable(self.control.as_mut(), kernel, name, opts)?;
        }
        Ok(())
    }

    /// `patch_enable` (target 1) / `patch_disable` (0).
    fn switch_request(
        &mut self,
        name: &str,
        target: i32,
        wait: Option<bool>,
        timeout_ms: Option<u64>,
        switcher: Option<patcher::Switcher>,
        reply: Reply,
    ) {
        let wait = wait.unwrap_or(true);
        let timeout = transition_timeout(wait, timeout_ms);
        let opts = patcher::SwitchOptions {
            timeout,
            switcher: switcher.unwrap_or_default(),
        };
        let r = self.patch_switch(name, target, opts);
        self.after_switch(name, wait, timeout, r, reply);
    }

    fn patch_force(&mut self, name: &str) -> Result<Forced, ReqError> {
        match self.engine.transition_status() {
            Some(t) if t.patch == name => {}
            Some(t) => {
                return Err(ReqError::BadRequest(format!(
                    "{name} is not in transition ({} is)",
                    t.patch
                )))
            }
            None => {
                return Err(ReqError::BadRequest(format!(
                    "no transition is in progress ({name} is not in transition)"
                )))
            }
        }
        self.paused(|s, regs| s.kernel(regs).map(|_| ()))?;
        let Some(kernel) = self.kernel.as_ref() else {
            return Err(missing_kernel());
        };
        let overridden = self.engine.force(self.control.as_mut(), kernel)?;
        if !overridden.is_empty() {
            tracing::warn!(
                patch = name,
                tasks = ?overridden.iter().map(|b| format!("{} ({})", b.pid, b.comm)).collect::<Vec<_>>(),
                "transition forced: these tasks were switched while they still blocked"
            );
        }
        self.answer_waiters();
        let patch = self
            .engine
            .info(name)
            .map(Patch::from)
            .ok_or_else(|| ReqError::NoPatch(name.to_string()))?;
        Ok(Forced { patch, overridden })
    }

    fn patch_status(&self, name: Option<&str>) -> PatchStatus {
        let mut transition = self.engine.transition_status();
        if let Some(n) = name {
            transition = transition.filter(|t| t.patch == n);
        }
        PatchStatus {
            transition,
            patches: self
                .engine
                .list()
                .into_iter()
                .filter(|p| name.is_none_or(|n| p.name == n))
                .map(Patch::from)
                .collect(),
        }
    }

    /// One check of the transition in progress, when due; reverses it first if a waiter's
    /// deadline passed.
    fn advance_transition(&mut self) {
        if Instant::now() < self.next_transition_check {
            return;
        }
        if self.kernel.is_none() {
            // A transition continued from the state file: find the kernel first.
            if let Err(e) = self.paused(|s, regs| s.kernel(regs).map(|_| ())) {
                tracing::warn!("transition check: {e}");
                self.next_transition_check = Instant::now() + Duration::from_millis(500);
                return;
            }
        }
        let Some(kernel) = self.kernel.as_ref() else {
            return;
        };
        let now = Instant::now();
        if let Some(t) = self.engine.transition_status() {
            let due = self.waiters.iter().any(|w| {
                w.patch == t.patch
                    && w.reversed_from.is_none()
                    && w.deadline.is_some_and(|d| now >= d)
            });
            if due {
                match self.engine.reverse(self.control.as_mut(), kernel) {
                    Ok(()) => {
                        for w in self.waiters.iter_mut().filter(|w| w.patch == t.patch) {
                            w.reversed_from = Some((t.target, t.blocking.clone()));
                            w.deadline = None;
                        }
                    }
                    Err(e) => tracing::warn!("reversing the transition of {}: {e}", t.patch),
                }
            }
        }
        let t0 = Instant::now();
        if let Err(e) = self.engine.transition_step(self.control.as_mut(), kernel) {
            tracing::warn!("transition check: {e}");
        }
        self.next_transition_check = Instant::now() + (t0.elapsed() * 10).max(TRANSITION_CHECK_MIN);
        self.answer_waiters();
    }

    /// Serves the boundary breakpoint hits of a transition with `Switcher::Breakpoints`, for at
    /// most [`BOUNDARY_SLICE`]: each hit stopped every vCPU; the engine switches the vCPU's
    /// task, and the guest resumes.
    ///
    /// Between ticks no pause is held but the operator's: a guest found paused here is held by
    /// a breakpoint hit that nobody took (queued before its transition ended, or left by a
    /// failed wait) and is resumed.
    /// The next breakpoint hit before `until` (`what` names the breakpoints, for the log), or
    /// `None` when none came, the guest exited, or waiting failed (a guest left paused by no
    /// hit is then resumed).
    pub(super) fn next_hit(&mut self, until: Instant, what: &str) -> Option<(usize, u64)> {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match self.control.wait_event(left) {
            Ok(Some(patcher::GuestEvent::Breakpoint { vcpu, rip })) => Some((vcpu, rip)),
            Ok(Some(patcher::GuestEvent::Exited)) | Ok(None) => None,
            Err(e) => {
                tracing::debug!("waiting for {what}: {e}");
                if self.control.is_paused() {
                    if let Err(e) = self.control.resume() {
                        tracing::warn!("resuming a guest no hit holds any more: {e}");
                    }
                }
                None
            }
        }
    }

    fn serve_boundary_hits(&mut self) {
        if self.operator_paused || self.module_hooks.is_some() {
            // (The module hooks serve every stop while armed; no breakpoints transition runs
            // meanwhile.)
            return;
        }
        let serving = self.engine.wants_boundary_hits();
        let stuck = self.control.is_paused();
        if !(serving || self.drain_hits || stuck) {
            return;
        }
        // Once the transition has ended, one more pass resumes a guest that a hit queued
        // before the breakpoints went still holds paused.
        self.drain_hits = serving;
        let boundaries = self.engine.boundaries();
        let until = Instant::now() + BOUNDARY_SLICE;
        loop {
            let Some((vcpu, rip)) = self.next_hit(until, "boundary hits") else {
                return;
            };
            // An event taken after the guest was resumed (a hit that raced with one of our
            // own pauses) is stale: that task went on.
            if !self.control.is_paused() {
                continue;
            }
            let t0 = Instant::now();
            let mut check_now = false;
            // (A hit of a transition that has ended is only resumed.)
            // (Only a stop at one of the boundaries is a boundary hit.)
            if let (true, Some(kernel)) = (
                self.engine.wants_boundary_hits() && boundaries.contains(&rip),
                self.kernel.as_ref(),
            ) {
                match self
                    .engine
                    .boundary_hit(self.control.as_mut(), kernel, vcpu)
                {
                    Ok((_, now)) => check_now = now,
                    Err(e) => tracing::warn!("boundary hit on vCPU {vcpu}: {e}"),
                }
            }
            if let Err(e) = self.control.resume() {
                tracing::warn!("resuming after a boundary hit: {e}");
                return;
            }
            self.engine.add_transition_pause(t0.elapsed());
            if check_now {
                self.next_transition_check = Instant::now();
                return;
            }
        }
    }

    /// Answers the clients waiting for a transition that is no longer running.
    fn answer_waiters(&mut self) {
        let running = self.engine.transition_status().map(|t| t.patch);
        let mut i = 0;
        while i < self.waiters.len() {
            if running.as_deref() == Some(self.waiters[i].patch.as_str()) {
                i += 1;
                continue;
            }
            let w = self.waiters.swap_remove(i);
            let Some(reply) = w.reply else {
                continue;
            };
            if let Some((target, blocking)) = &w.reversed_from {
                let e = Engine::timeout_error(&w.patch, w.started.elapsed(), *target, blocking);
                reply.send(ReqError::from(e).into());
                continue;
            }
            match w.op {
                WaitOp::Unload(timeout) => {
                    let left = timeout.saturating_sub(w.started.elapsed());
                    self.patch_unload(&w.patch, left, reply);
                }
                _ => reply.send(self.patch_result(&w.patch)),
            }
        }
    }

    /// Starts an unload: disables the patch and checks once. Freed at once: the result. Still
    /// reachable: the unload waits in [`Session::pending`], advanced by [`Handler::tick`].
    fn patch_unload(&mut self, name: &str, timeout: Duration, reply: Reply) {
        // A patch waiting for its modules has nothing in the guest.
        if !self.engine.is_loaded(name) {
            if let Some(info) = self.engine.forget_waiting(name) {
                return reply.send(unloaded(info, patcher::UnloadReport::nothing(name)));
            }
        }
        // A consistent patch is first disabled by a transition; the unload goes on once every
        // task runs the previous version.
        let consistent_enabled = self
            .engine
            .info(name)
            .is_some_and(|i| i.state == patcher::PatchState::Enabled && !i.immediate);
        let disabling = self
            .engine
            .transition_status()
            .is_some_and(|t| t.patch == name && t.target == 0);
        if consistent_enabled || disabling {
            let r = if disabling {
                Ok(())
            } else {
                self.patch_switch(
                    name,
                    0,
                    patcher::SwitchOptions {
                        timeout: Some(timeout),
                        switcher: patcher::Switcher::default(),
                    },
                )
            };
            if let Err(e) = r {
                return reply.send(e.into());
            }
            if self
                .engine
                .transition_status()
                .is_some_and(|t| t.patch == name)
            {
                self.waiters.push(Waiter {
                    op: WaitOp::Unload(timeout),
                    patch: name.to_string(),
                    reply: Some(reply),
                    deadline: Some(Instant::now() + timeout),
                    started: Instant::now(),
                    reversed_from: None,
                });
                return;
            }
        }
        let r = (|| {
            let info = self
                .engine
                .info(name)
                .ok_or_else(|| ReqError::NoPatch(name.to_string()))?;
            self.paused(|s, regs| s.kernel(regs).map(|_| ()))?;
            let Some(kernel) = self.kernel.as_ref() else {
                return Err(missing_kernel());
            };
            let progress = self
                .engine
                .unload_start(self.control.as_mut(), name, kernel)?;
            Ok((info, progress))
        })();
        self.next_reap = Instant::now() + REAP_FIRST;
        self.reap_every = REAP_FIRST;
        match r {
            Err(e) => reply.send(e.into()),
            Ok((info, progress)) if progress.is_done() => {
                reply.send(unloaded(info, progress.report));
            }
            Ok((info, progress)) => self.pending.push(PendingUnload {
                next_check: progress.next_check(),
                info,
                progress,
                timeout,
                reply,
            }),
        }
    }

    /// Advances the waiting unloads whose next check is due.
    fn advance_unloads(&mut self) {
        let now = Instant::now();
        if now < self.next_unload_check {
            return;
        }
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].next_check > now {
                i += 1;
                continue;
            }
            let Some(kernel) = self.kernel.as_ref() else {
                return;
            };
            let p = &mut self.pending[i];
            let t0 = Instant::now();
            let step = self
                .engine
                .unload_continue(self.control.as_mut(), &mut p.progress, kernel);
            // Pause budget: the guest runs at least 10x as long as the check took before the
            // next one, whatever the number of waiting unloads.
            self.next_unload_check = Instant::now() + t0.elapsed() * 10;
            let done = match step {
                Ok(true) => Some(unloaded(p.info.clone(), p.progress.report.clone())),
                Ok(false) if p.progress.elapsed() >= p.timeout => {
                    Some(ReqError::from(p.progress.timed_out()).into())
                }
                Ok(false) => {
                    p.next_check = p.progress.next_check();
                    None
                }
                Err(e) => Some(ReqError::from(e).into()),
            };
            if let Some(resp) = done {
                self.pending.swap_remove(i).reply.send(resp);
            }
            // One check per tick.
            return;
        }
    }
}

/// An unload waiting for its patch's pages to become unreachable.
struct PendingUnload {
    info: patcher::PatchInfo,
    progress: patcher::UnloadProgress,
    timeout: Duration,
    next_check: Instant,
    reply: Reply,
}

/// The result of a finished unload: the patch as it was, `Unloaded`, with the report.
fn unloaded(info: patcher::PatchInfo, report: patcher::UnloadReport) -> Response {
    match to_json(&Unloaded::new(info, report)) {
        Ok(v) => Response::ok(v),
        Err(e) => e.into(),
    }
}

/// A stack as the API reports it: frames rendered `name+0xoff/0xsize`, and `proc`, the lines
/// the guest's `/proc/PID/stack` would show for it.
fn stack_view(
    k: &Kernel,
    mem: &dyn introspect::PhysMemory,
    st: &introspect::stack::Stack,
) -> StackView {
    StackView {
        kind: st.kind,
        reliable: st.reliable,
        reason: st.reason.clone(),
        frames: st
            .frames
            .iter()
            .map(|f| FrameLine {
                addr: f.addr,
                symbol: f.render(),
            })
            .collect(),
        proc: k.proc_stack_view(mem, st).unwrap_or_default(),
    }
}

impl Handler for Session {
    fn handle(&mut self, req: Request, reply: Reply) {
        let r = match req {
            Request::PatchUnload { name, timeout_ms } => {
                let timeout = timeout_ms
                    .map_or(DEFAULT_UNLOAD_TIMEOUT, Duration::from_millis)
                    .min(MAX_UNLOAD_TIMEOUT);
                return self.patch_unload(&name, timeout, reply);
            }
            Request::Status {} => to_json(&self.status()),
            Request::Pause {} => match self.control.pause() {
                Ok(()) => {
                    self.operator_paused = true;
                    to_json(&self.status())
                }
                Err(e) => Err(e.into()),
            },
            Request::Resume {} => match self.control.resume() {
                Ok(()) => {
                    self.operator_paused = false;
                    to_json(&self.status())
                }
                Err(e) => Err(e.into()),
            },
            Request::Inspect { what, name } => self.inspect(what, name),
            Request::PatchLoad {
                object_base64,
                file_name,
                immediate,
                wait,
                timeout_ms,
                switcher,
            } => {
                let wait = wait.unwrap_or(true);
                let timeout = transition_timeout(wait, timeout_ms);
                let opts = patcher::LoadOptions {
                    immediate: immediate.unwrap_or(false),
                    timeout,
                    switcher: switcher.unwrap_or_default(),
                };
                match self.patch_load(&object_base64, &file_name, opts) {
                    Ok(p) => {
                        let name = p.name.clone();
                        return self.after_switch(&name, wait, timeout, Ok(()), reply);
                    }
                    Err(e) => Err(e),
                }
            }
            Request::PatchEnable {
                name,
                wait,
                timeout_ms,
                switcher,
            } => return self.switch_request(&name, 1, wait, timeout_ms, switcher, reply),
            Request::PatchDisable {
                name,
                wait,
                timeout_ms,
                switcher,
            } => return self.switch_request(&name, 0, wait, timeout_ms, switcher, reply),
            Request::PatchForce { name } => self.patch_force(&name).and_then(|f| to_json(&f)),
            Request::PatchStatus { name } => to_json(&self.patch_status(name.as_deref())),
            Request::PatchList {} => {
                let list: Vec<Patch> = self.engine.list().into_iter().map(Patch::from).collect();
                to_json(&list)
            }
            Request::PatchInfo { name } => match self.engine.info(&name) {
                Some(i) => to_json(&Patch::from(i)),
                None => Err(ReqError::NoPatch(name)),
            },
        };
        // A load may have left a patch waiting for its module: watch for it before the
        // client can load the module.
        self.sync_module_hooks();
        self.persist();
        reply.send(match r {
            Ok(v) => Response::ok(v),
            Err(e) => e.into(),
        })
    }

    fn tick(&mut self) {
        self.sync_module_hooks();
        self.serve_module_hooks();
        self.serve_boundary_hits();
        if self.engine.in_transition() || !self.waiters.is_empty() {
            self.advance_transition();
        }
        self.persist();
        if !self.pending.is_empty() {
            self.advance_unloads();
        } else if self.engine.has_held() && Instant::now() >= self.next_reap {
            self.reap();
        }
    }

    fn tick_interval(&self) -> Duration {
        if (self.engine.wants_boundary_hits() || self.module_hooks.is_some())
            && !self.operator_paused
        {
            // A hit keeps every vCPU stopped until it is served.
            return Duration::ZERO;
        }
        if self.engine.in_transition() {
            return self
                .next_transition_check
                .saturating_duration_since(Instant::now());
        }
        match self.pending.iter().map(|p| p.next_check).min() {
            Some(t) => t
                .max(self.next_unload_check)
                .saturating_duration_since(Instant::now()),
            None => Duration::from_millis(20),
        }
    }
}

/// The timeout of a transition: as asked, else [`DEFAULT_TRANSITION_TIMEOUT`] when the client
/// waits and none when it does not; at most [`MAX_UNLOAD_TIMEOUT`].
fn transition_timeout(wait: bool, timeout_ms: Option<u64>) -> Option<Duration> {
    match timeout_ms {
        Some(ms) => Some(Duration::from_millis(ms).min(MAX_UNLOAD_TIMEOUT)),
        None if wait => Some(DEFAULT_TRANSITION_TIMEOUT),
        None => None,
    }
}
