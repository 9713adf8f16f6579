//! A session: one guest (behind [`GuestControl`]) and the state hvpatch keeps about it — the
//! introspected kernel and the patch engine. Every request runs to completion before the next.

use std::time::{Duration, Instant};

use base64::Engine as _;
use introspect::{Kernel, VcpuRegs};
use patcher::kernel::KernelSymbols;
use patcher::{Engine, GuestControl, PatchError, Target};
use serde_json::{json, Value};

use super::protocol::{InspectWhat, Request, Response};
use super::server::{Handler, Reply};

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
}

impl Drop for Session {
    fn drop(&mut self) {
        for p in self.pending.drain(..) {
            p.reply.send(Response::err(
                "guest",
                "the server is stopping; the patch stays disabled and held in the guest",
            ));
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
/// First and longest interval between background checks of held patches.
const REAP_FIRST: Duration = Duration::from_millis(100);
const REAP_MAX: Duration = Duration::from_secs(5);

/// A failed request: (kind, message).
type ReqError = (&'static str, String);

fn guest_err(e: patcher::GuestError) -> ReqError {
    ("guest", e.to_string())
}

fn patch_err(e: PatchError) -> ReqError {
    match e {
        PatchError::NotLoaded(_) => ("not_found", e.to_string()),
        PatchError::Held { .. } => ("held", e.to_string()),
        PatchError::Guest(g) => ("guest", g.to_string()),
        other => ("patch", other.to_string()),
    }
}

/// A 64-bit address as the API writes it: a hex string (JSON numbers lose precision above
/// 2^53 in jq and JavaScript).
fn hx(v: u64) -> String {
    introspect::hex::to_hex(v)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ReqError> {
    serde_json::to_value(v).map_err(|e| ("internal", e.to_string()))
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
            self.control.pause().map_err(guest_err)?;
        }
        let regs: Result<Vec<VcpuRegs>, ReqError> = (0..self.control.vcpu_count())
            .map(|i| self.control.regs(i).map_err(guest_err))
            .collect();
        let result = regs.and_then(|regs| f(self, &regs));
        if !was_paused {
            let resumed = self.control.resume().map_err(guest_err);
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
                self.engine = Engine::new();
                for p in self.pending.drain(..) {
                    p.reply.send(Response::err(
                        "guest",
                        "the guest kernel changed (reboot) while the unload waited; its patches are gone",
                    ));
                }
            }
            let k = Kernel::open(mem, regs).map_err(|e| ("introspect", e.to_string()))?;
            self.kernel = Some(k);
        }
        self.kernel
            .as_ref()
            .ok_or(("internal", "kernel model missing".to_string()))
    }

    fn status(&mut self) -> Result<Value, ReqError> {
        Ok(json!({
            "host": self.host,
            "vcpus": self.control.vcpu_count(),
            "paused": self.control.is_paused(),
            "patch_arena": self.control.patch_arena().map(|(s, l)| json!({"start": hx(s), "len": l})),
            "patches": self.engine.list().len(),
        }))
    }

    fn inspect(&mut self, what: InspectWhat, name: Option<String>) -> Result<Value, ReqError> {
        self.paused(|s, regs| {
            s.kernel(regs)?;
            let (Some(k), mem) = (s.kernel.as_ref(), s.control.memory()) else {
                return Err(("internal", "kernel model missing".into()));
            };
            match what {
                InspectWhat::Kernel => to_json(k.info()),
                InspectWhat::Symbols => Ok(Value::Array(
                    k.symbols()
                        .iter()
                        .map(|y| json!({"addr": hx(y.addr), "type": y.kind.to_string(), "name": y.name}))
                        .collect(),
                )),
                InspectWhat::Symbol => {
                    let name = name.ok_or(("bad_request", "inspect symbol needs a name".to_string()))?;
                    let mut all: Vec<_> = k.symbols().lookup_all(&name).collect();
                    all.sort_by_key(|y| y.index);
                    if all.is_empty() {
                        return Err(("not_found", format!("no symbol named {name} in the guest kernel")));
                    }
                    Ok(Value::Array(
                        all.iter()
                            .enumerate()
                            .map(|(i, y)| {
                                let size = k.symbolize(y.addr).filter(|r| r.addr == y.addr).map(|r| r.size);
                                json!({"addr": hx(y.addr), "type": y.kind.to_string(), "name": y.name,
                                       "sympos": i + 1, "size": size})
                            })
                            .collect(),
                    ))
                }
                InspectWhat::Tasks => {
                    let tasks = k.tasks(mem, regs).map_err(|e| ("introspect", e.to_string()))?;
                    to_json(&tasks)
                }
                InspectWhat::Stacks => {
                    let tasks = k.tasks(mem, regs).map_err(|e| ("introspect", e.to_string()))?;
                    let mut vcpus = Vec::new();
                    for i in 0..regs.len() {
                        let st = k.vcpu_stack(mem, regs, i).map_err(|e| ("introspect", e.to_string()))?;
                        vcpus.push(json!({"vcpu": i, "stack": stack_json(k, mem, &st)}));
                    }
                    let mut out = Vec::new();
                    for t in tasks.iter().filter(|t| t.running_on_vcpu.is_none()) {
                        let st = k.task_stack(mem, t).map_err(|e| ("introspect", e.to_string()))?;
                        out.push(json!({"pid": t.pid, "comm": t.comm, "addr": hx(t.addr), "stack": stack_json(k, mem, &st)}));
                    }
                    Ok(json!({"vcpus": vcpus, "tasks": out}))
                }
                InspectWhat::Vcpus => {
                    let tasks = k.tasks(mem, regs).map_err(|e| ("introspect", e.to_string()))?;
                    let cpus = k.vcpu_cpus(mem, regs).map_err(|e| ("introspect", e.to_string()))?;
                    let mut out = Vec::new();
                    for (i, r) in regs.iter().enumerate() {
                        let st = k.vcpu_stack(mem, regs, i).ok();
                        let cur = cpus.get(i).and_then(|c| c.current);
                        let task = cur.and_then(|a| tasks.iter().find(|t| t.addr == a));
                        out.push(json!({
                            "vcpu": i,
                            "cpu": cpus.get(i).and_then(|c| c.cpu),
                            "mode": st.as_ref().map(|s| format!("{:?}", s.kind)),
                            "rip": hx(r.rip), "rsp": hx(r.rsp()), "cr3": hx(r.cr3), "cpl": r.cpl(),
                            "rip_symbol": if r.cpl() == 0 { k.symbolize(r.rip).map(|y| y.to_string()) } else { None },
                            "current": cur.map(hx),
                            "current_pid": task.map(|t| t.pid),
                            "current_comm": task.map(|t| t.comm.clone()),
                            "stack": st.as_ref().map(|st| stack_json(k, mem, st)),
                        }));
                    }
                    Ok(Value::Array(out))
                }
            }
        })
    }

    fn patch_load(&mut self, object_base64: &str, file_name: &str) -> Result<Value, ReqError> {
        let object = base64::engine::general_purpose::STANDARD
            .decode(object_base64)
            .map_err(|e| ("bad_request", format!("object_base64 is not base64: {e}")))?;
        // Build the kernel model while paused (consistent registers), then let the engine do
        // its own preparation outside and its writes inside its own pause window.
        // EFER.NXE decides whether the arena's data pages may carry NX; read it in the same pause.
        let nx = self.paused(|s, regs| {
            s.kernel(regs)?;
            Ok(regs.first().is_some_and(|r| r.nx_enabled()))
        })?;
        let Some(kernel) = self.kernel.as_ref() else {
            return Err(("internal", "kernel model missing".into()));
        };
        let syms = KernelSymbols::new(kernel, self.control.memory());
        let target = Target {
            symbols: &syms,
            paging: syms.paging(nx),
        };
        let info = self
            .engine
            .load(self.control.as_mut(), &target, &object, file_name)
            .map_err(patch_err)?;
        to_json(&info)
    }

    /// Starts an unload: disables the patch and checks once. Freed at once: the result. Still
    /// reachable: the unload waits in [`Session::pending`], advanced by [`Handler::tick`].
    fn patch_unload(&mut self, name: &str, timeout: Duration, reply: Reply) {
        let r = (|| {
            let info = self
                .engine
                .info(name)
                .ok_or(("not_found", format!("no patch named {name} is loaded")))?;
            self.paused(|s, regs| s.kernel(regs).map(|_| ()))?;
            let Some(kernel) = self.kernel.as_ref() else {
                return Err(("internal", "kernel model missing".to_string()));
            };
            let progress = self
                .engine
                .unload_start(self.control.as_mut(), name, kernel)
                .map_err(patch_err)?;
            Ok((info, progress))
        })();
        self.next_reap = Instant::now() + REAP_FIRST;
        self.reap_every = REAP_FIRST;
        match r {
            Err((kind, msg)) => reply.send(Response::err(kind, msg)),
            Ok((info, progress)) if progress.is_done() => {
                reply.send(unloaded(&info, &progress.report));
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
                Ok(true) => Some(unloaded(&p.info, &p.progress.report)),
                Ok(false) if p.progress.elapsed() >= p.timeout => {
                    let (kind, msg) = patch_err(p.progress.timed_out());
                    Some(Response::err(kind, msg))
                }
                Ok(false) => {
                    p.next_check = p.progress.next_check();
                    None
                }
                Err(e) => {
                    let (kind, msg) = patch_err(e);
                    Some(Response::err(kind, msg))
                }
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
fn unloaded(info: &patcher::PatchInfo, report: &patcher::UnloadReport) -> Response {
    let mut v = match to_json(info) {
        Ok(v) => v,
        Err((kind, msg)) => return Response::err(kind, msg),
    };
    v["state"] = json!("Unloaded");
    // None of its functions is live any more.
    if let Some(fs) = v["functions"].as_array_mut() {
        for f in fs {
            f["active"] = json!(false);
        }
    }
    v["held"] = Value::Null;
    v["unload_pause_us"] = json!(report.pause_us);
    v["unload_us"] = json!(report.unload_us);
    match to_json(report) {
        Ok(r) => v["unload"] = r,
        Err((kind, msg)) => return Response::err(kind, msg),
    }
    Response::ok(v)
}

/// A stack as the API reports it: frames rendered `name+0xoff/0xsize`, and `proc`, the lines
/// the guest's `/proc/PID/stack` would show for it.
fn stack_json(
    k: &Kernel,
    mem: &dyn introspect::PhysMemory,
    st: &introspect::stack::Stack,
) -> Value {
    json!({
        "kind": format!("{:?}", st.kind),
        "reliable": st.reliable,
        "reason": st.reason,
        "frames": st.frames.iter().map(|f| json!({"addr": hx(f.addr), "symbol": f.render()})).collect::<Vec<_>>(),
        "proc": k.proc_stack_view(mem, st).unwrap_or_default(),
    })
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
            Request::Status {} => self.status(),
            Request::Pause {} => self
                .control
                .pause()
                .map_err(guest_err)
                .and_then(|_| self.status()),
            Request::Resume {} => self
                .control
                .resume()
                .map_err(guest_err)
                .and_then(|_| self.status()),
            Request::Inspect { what, name } => self.inspect(what, name),
            Request::PatchLoad {
                object_base64,
                file_name,
            } => self.patch_load(&object_base64, &file_name),
            Request::PatchList {} => to_json(&self.engine.list()),
            Request::PatchInfo { name } => self
                .engine
                .info(&name)
                .ok_or(("not_found", format!("no patch named {name} is loaded")))
                .and_then(|i| to_json(&i)),
        };
        reply.send(match r {
            Ok(v) => Response::ok(v),
            Err((kind, msg)) => Response::err(kind, msg),
        })
    }

    fn tick(&mut self) {
        if !self.pending.is_empty() {
            self.advance_unloads();
        } else if self.engine.has_held() && Instant::now() >= self.next_reap {
            self.reap();
        }
    }

    fn tick_interval(&self) -> Duration {
        match self.pending.iter().map(|p| p.next_check).min() {
            Some(t) => t
                .max(self.next_unload_check)
                .saturating_duration_since(Instant::now()),
            None => Duration::from_millis(20),
        }
    }
}
