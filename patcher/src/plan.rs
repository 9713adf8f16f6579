//! Everything a load computes while the guest runs, before any vCPU is paused: the release
//! check, arena placement, linking ([`GuestResolver`]), the entry-site checks ([`entry_site`])
//! and the full list of writes with the bytes expected under each — a [`LoadPlan`]. The pause
//! window then only re-verifies and writes (`txn`).

use introspect::PhysMemory;

use crate::arena::{pte, Arena, ArenaError, PageKind, PAGE};
use crate::engine::{Engine, PatchError, Target};
use crate::func_stack::SiteStack;
use crate::guest::GuestControl;
use crate::info::{FuncInfo, PatchState};
use crate::link::{link, pick_sympos, LinkError, LinkedFunc, Resolver, RETURN_THUNK};
use crate::patchobj::PatchObject;
use crate::prologue::{Method, MovedInsn, Prologue, MAX_TRAMP_LEN};
use crate::site::{self, SiteOwner, NOP5};
use crate::symbols::ModuleSyms;
use crate::txn::Write;
use std::collections::BTreeMap;

/// Resolves the patch's names in the guest: kallsyms by klp's sympos rule, the runtime return
/// thunk from guest memory.
struct GuestResolver<'a> {
    t: &'a Target<'a>,
    mem: &'a dyn PhysMemory,
    /// The engine's function stacks (to tell our own jmps and their original bytes).
    sites: &'a BTreeMap<u64, SiteStack>,
    /// The trampolines of the functions this load rewrites the prologue of, by (name,
    /// sympos): their original code.
    tramps: &'a BTreeMap<(String, u64), u64>,
    /// The kernel modules the patch names, read at planning.
    objects: &'a BTreeMap<String, ModuleSyms>,
}

impl Resolver for GuestResolver<'_> {
    /// The patch's modules first (a name in exactly one of them), then vmlinux; `MODULE:NAME`
    /// looks in that module only.
    fn resolve(&self, name: &str, sympos: u64) -> Result<u64, LinkError> {
        if let Some((o, n)) = name.split_once(':') {
            return self.resolve_in((o != "vmlinux").then_some(o), n, sympos);
        }
        let hits: Vec<(&String, Vec<u64>)> = self
            .objects
            .iter()
            .map(|(o, m)| (o, m.addresses(name)))
            .filter(|(_, a)| !a.is_empty())
            .collect();
        match hits.as_slice() {
            [] => pick_sympos(name, &self.t.symbols.addresses(name), sympos),
            [(o, addrs)] => pick_sympos(name, addrs, sympos).map_err(|e| match e {
                LinkError::Symbol(source) => LinkError::ModuleSymbol {
                    module: o.to_string(),
                    source,
                },
                e => e,
            }),
            many => Err(LinkError::AmbiguousModules {
                name: name.to_string(),
                modules: many
                    .iter()
                    .map(|(o, _)| o.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn resolve_in(&self, object: Option<&str>, name: &str, sympos: u64) -> Result<u64, LinkError> {
        let Some(o) = object else {
            return pick_sympos(name, &self.t.symbols.addresses(name), sympos);
        };
        let m = self.objects.get(o).ok_or_else(|| LinkError::ModuleSymbol {
            module: o.to_string(),
            source: introspect::SymbolError::Unknown {
                name: name.to_string(),
            },
        })?;
        pick_sympos(name, &m.addresses(name), sympos).map_err(|e| match e {
            LinkError::Symbol(source) => LinkError::ModuleSymbol {
                module: o.to_string(),
                source,
            },
            e => e,
        })
    }

    fn original_body(&self, name: &str, sympos: u64) -> Result<u64, LinkError> {
        if let Some(&tramp) = self.tramps.get(&(name.to_string(), sympos)) {
            return Ok(tramp);
        }
        let addr = self.resolve(name, sympos)?;
        let mut head = [0u8; 9];
        self.t
            .paging
            .read_virt(self.mem, addr, &mut head)
            .map_err(|e| LinkError::Guest(e.to_string()))?;
        let off = site::site_offset(&head) as usize;
        let site = addr + off as u64;
        // site + 5 is an instruction boundary only after the ftrace NOP or call; a prologue
        // rewrite of ours (at the site, or after ftrace's call) would be entered there.
        let unpatched = self
            .sites
            .get(&site)
            .map_or(&head[off..off + 5], |st| &st.original);
        if (unpatched != NOP5 && unpatched[0] != 0xe8) || self.sites.contains_key(&(site + 5)) {
            return Err(LinkError::Guest(format!(
                "HVPATCH_ORIG({name}): its entry has no ftrace site and this patch does not \
                 rewrite its prologue (another patch does, or a consistency-model load): calling \
                 its original is not supported there"
            )));
        }
        Ok(site + 5)
    }

    fn return_thunk(&self) -> Result<Option<u64>, LinkError> {
        let rt = self.t.symbols.addresses(RETURN_THUNK).first().copied();
        if let Some(var) = self.t.symbols.addresses("x86_return_thunk").first() {
            let v = self
                .t
                .paging
                .read_u64(self.mem, *var)
                .map_err(|e| LinkError::Guest(e.to_string()))?;
            if Some(v) == rt {
                return Ok(None);
            }
            if self.t.symbols.symbolize(v).is_none() {
                return Err(LinkError::Guest(format!(
                    "x86_return_thunk = {v:#x} is not kernel text"
                )));
            }
            return Ok(Some(v));
        }
        // Older kernels: no selectable thunk; `__x86_return_thunk` is either `ret` or the thunk.
        match rt {
            None => Ok(None),
            Some(rt) => {
                let mut b = [0u8; 1];
                self.t
                    .paging
                    .read_virt(self.mem, rt, &mut b)
                    .map_err(|e| LinkError::Guest(e.to_string()))?;
                Ok(if b[0] == 0xc3 { None } else { Some(rt) })
            }
        }
    }
}

/// Reads the guest's `uname -r` from `linux_banner` ([`introspect::kernel::release_from_banner`]).
pub fn guest_release(mem: &dyn PhysMemory, t: &Target) -> Result<String, PatchError> {
    let va = *t
        .symbols
        .addresses("linux_banner")
        .first()
        .ok_or_else(|| PatchError::Release("no linux_banner symbol".into()))?;
    let mut b = [0u8; 160];
    t.paging
        .read_virt(mem, va, &mut b)
        .map_err(|e| PatchError::Release(e.to_string()))?;
    let s = String::from_utf8_lossy(&b);
    let banner = s.split('\0').next().unwrap_or("");
    introspect::kernel::release_from_banner(banner)
        .map(str::to_string)
        .ok_or_else(|| PatchError::Release(format!("unexpected banner {banner:?}")))
}

/// Names a dynamically allocated ftrace ops trampoline: ftrace copies `ftrace_caller` or
/// `ftrace_regs_caller` into module space (`create_trampoline()`), so its first bytes match.
pub(crate) fn ftrace_trampoline(mem: &dyn PhysMemory, t: &Target, addr: u64) -> Option<String> {
    let mut here = [0u8; 24];
    t.paging.read_virt(mem, addr, &mut here).ok()?;
    for name in ["ftrace_regs_caller", "ftrace_caller"] {
        let Some(&orig) = t.symbols.addresses(name).first() else {
            continue;
        };
        let mut b = [0u8; 24];
        if t.paging.read_virt(mem, orig, &mut b).is_ok() && b == here {
            return Some(format!(
                "{name} (a copy: ftrace ops trampoline at {addr:#x})"
            ));
        }
    }
    None
}

/// A replaced function's entry site, checked: where it is and what it holds. Writing a `jmp`
/// there (to the new function, or to any other target in rel32 reach) is one [`Write`] away
/// ([`EntrySite::write_jmp`]).
#[derive(Debug, Clone)]
pub(crate) struct EntrySite {
    /// The replaced function.
    pub(crate) func: String,
    /// Its address.
    pub(crate) addr: u64,
    /// The site: fn+0, or fn+4 after ENDBR.
    pub(crate) site: u64,
    /// Guest-physical address of the site (all 5 bytes on one page).
    pub(crate) site_pa: u64,
    /// The bytes there now, verified: the jmp of the site's top patch, or the NOP.
    pub(crate) expect: [u8; 5],
    /// The bytes before any patch (what comes back when its last patch goes).
    pub(crate) original: [u8; 5],
}

impl EntrySite {
    /// The load error for this site.
    pub(crate) fn error(&self, what: String) -> PatchError {
        PatchError::Site {
            func: self.func.clone(),
            addr: self.addr,
            site: self.site,
            what,
        }
    }

    /// The write replacing the (verified) current bytes with `jmp target`.
    pub(crate) fn write_jmp(&self, target: u64) -> Result<Write, PatchError> {
        let jmp = site::jmp_bytes(self.site, target)
            .ok_or_else(|| self.error(format!("new function {target:#x} is out of rel32 reach")))?;
        Ok(Write {
            pa: self.site_pa,
            expect: Some(self.expect.to_vec()),
            old: vec![],
            new: jmp.to_vec(),
            what: format!("entry site {:#x}", self.site),
        })
    }
}

/// Finds and checks the entry site of `f` (linked, so its old address is resolved): the site
/// must lie on one page and hold what `sites` (the engine's function stacks) says it holds —
/// the top patch's jmp, or the NOP when unpatched. Anything else is named (ftrace, a kprobe,
/// another live patcher, ...) in the error.
pub(crate) fn entry_site(
    sites: &BTreeMap<u64, SiteStack>,
    mem: &dyn PhysMemory,
    t: &Target,
    f: &LinkedFunc,
) -> Result<EntrySite, PatchError> {
    let mut head = [0u8; 9];
    t.paging.read_virt(mem, f.old_addr, &mut head)?;
    let site = f.old_addr + site::site_offset(&head);
    entry_site_at(sites, mem, t, f, site, NOP5)
}

/// [`entry_site`] at `site`, whose bytes are `unpatched` when no patch of ours is there.
fn entry_site_at(
    sites: &BTreeMap<u64, SiteStack>,
    mem: &dyn PhysMemory,
    t: &Target,
    f: &LinkedFunc,
    site: u64,
    unpatched: [u8; 5],
) -> Result<EntrySite, PatchError> {
    let mut s = EntrySite {
        func: f.old_name.clone(),
        addr: f.old_addr,
        site,
        site_pa: t.paging.translate(mem, site)?,
        expect: unpatched,
        original: unpatched,
    };
    if t.paging.translate(mem, site + 4)? != s.site_pa + 4 {
        return Err(s.error("the 5-byte site crosses a page boundary".into()));
    }
    let mut cur = [0u8; 5];
    mem.read_phys(s.site_pa, &mut cur)
        .map_err(|e| PatchError::Memory(e.to_string()))?;
    if let Some(st) = sites.get(&site) {
        s.expect = st.current_bytes(site);
        s.original = st.original;
    }
    if cur != s.expect {
        let sym = |a: u64| {
            t.symbols
                .symbolize(a)
                .map(|(n, o)| format!("{n}+{o:#x}"))
                .or_else(|| ftrace_trampoline(mem, t, a))
        };
        let what = match site::classify(site, &cur, &sym) {
            SiteOwner::Unexpected if sites.contains_key(&site) => {
                format!("our jmp was overwritten: found {}", site::hex(&cur))
            }
            o => format!(
                "{o}; found {} where {} was expected",
                site::hex(&cur),
                site::hex(&s.expect)
            ),
        };
        return Err(s.error(what));
    }
    Ok(s)
}

/// The kernel modules `obj` names, read from the guest now: each must be loaded and live
/// (not being loaded or unloaded; `coming_ok`: or coming, at the module-load hook).
fn module_objects(
    mem: &dyn PhysMemory,
    t: &Target,
    obj: &PatchObject,
    coming_ok: bool,
) -> Result<BTreeMap<String, ModuleSyms>, PatchError> {
    let mut out = BTreeMap::new();
    for name in obj.modules() {
        let err = |what: String| PatchError::Module {
            patch: obj.name.clone(),
            module: name.clone(),
            what,
        };
        let m = t
            .symbols
            .module(mem, &name)
            .map_err(err)?
            .ok_or_else(|| err("is not loaded in the guest".into()))?;
        let coming = m.module.state == introspect::ModuleState::Coming;
        if let (Some(why), false) = (m.not_live(), coming && coming_ok) {
            return Err(err(why));
        }
        out.insert(name, m);
    }
    Ok(out)
}

/// Bytes reserved in the code part per prologue trampoline.
const TRAMP_SLOT: u64 = MAX_TRAMP_LEN as u64;

/// Whether the entry of the function at `addr` would need a prologue rewrite: its site holds
/// neither the ftrace NOP nor a jmp of ours (read errors: no; `entry_site` reports them).
fn wants_prologue(
    sites: &BTreeMap<u64, SiteStack>,
    mem: &dyn PhysMemory,
    t: &Target,
    addr: u64,
) -> bool {
    let mut head = [0u8; 9];
    if t.paging.read_virt(mem, addr, &mut head).is_err() {
        return false;
    }
    let off = site::site_offset(&head) as usize;
    let site = addr + off as u64;
    if fresh_rewrite(sites, site) || fresh_rewrite(sites, site + 5) {
        return true;
    }
    !(sites.contains_key(&site) || sites.contains_key(&(site + 5)) || head[off..off + 5] == NOP5)
}

/// Whether `site` holds a function stack of ours with no patch on it (a disabled patch keeps
/// it) whose original bytes are a prologue rewrite's moved instructions: a new load rewrites
/// the prologue afresh, with a trampoline of its own.
fn fresh_rewrite(sites: &BTreeMap<u64, SiteStack>, site: u64) -> bool {
    sites
        .get(&site)
        .is_some_and(|st| st.entries.is_empty() && st.during.is_none() && st.original != NOP5)
}

/// The entry of `f` when [`entry_site`] refused it with `first`: a prologue rewrite
/// ([`crate::prologue_plan::plan_entry`]) with the trampoline at `tramp_va` (`None`: no room
/// was reserved, `first` stands), or this patch
/// stacking on an after-ftrace rewrite of ours. `Err` adds the prologue refusal to `first`.
fn prologue_site(
    sites: &BTreeMap<u64, SiteStack>,
    mem: &dyn PhysMemory,
    t: &Target,
    f: &LinkedFunc,
    tramp_va: Option<u64>,
    first: PatchError,
) -> Result<(EntrySite, Method, Option<Prologue>), PatchError> {
    let mut head = [0u8; 9];
    t.paging.read_virt(mem, f.old_addr, &mut head)?;
    let after = f.old_addr + site::site_offset(&head) + 5;
    if sites.contains_key(&after) && !fresh_rewrite(sites, after) {
        return Ok((
            entry_site_at(sites, mem, t, f, after, NOP5)?,
            Method::AfterFtrace,
            None,
        ));
    }
    let add = |why: String| match &first {
        PatchError::Site {
            func,
            addr,
            site,
            what,
        } => PatchError::Site {
            func: func.clone(),
            addr: *addr,
            site: *site,
            what: format!("{what}; no prologue rewrite either: {why}"),
        },
        other => PatchError::Changed(format!("{other}; no prologue rewrite either: {why}")),
    };
    let Some(tramp_va) = tramp_va else {
        return Err(first);
    };
    // What the kernel rewrites or finds by address must not move.
    let guest = crate::prologue_plan::GuestSites::read(mem, t).map_err(|e| add(e.to_string()))?;
    let forbidden = guest.within(f.old_addr, f.old_addr + 128);
    let plan = crate::prologue_plan::plan_entry(mem, t, f.old_addr, tramp_va, &forbidden)
        .map_err(|e| add(e.to_string()))?;
    let Some(p) = plan.prologue else {
        return Err(first);
    };
    let mut unpatched = [0u8; 5];
    unpatched.copy_from_slice(&p.original()[..5]);
    let es = entry_site_at(sites, mem, t, f, p.site, unpatched)?;
    Ok((es, plan.method, Some(p)))
}

/// A load, computed: the patch, where it goes, what it replaces, and every byte to write.
#[derive(Debug)]
pub(crate) struct LoadPlan {
    /// The parsed patch.
    pub(crate) obj: PatchObject,
    /// The arena with this patch's pages marked, and mapped (`arena.mapping`; when this load
    /// creates the mapping, its page table and PMD entry are among the writes).
    pub(crate) arena: Arena,
    /// Code pages: (first page index, count).
    pub(crate) code_run: (usize, usize),
    /// Data pages: (first page index, count).
    pub(crate) data_run: (usize, usize),
    /// Kernel VA of the code.
    pub(crate) code_base: u64,
    /// Kernel VA of the data.
    pub(crate) data_base: u64,
    /// Return-thunk sites rewritten by the linker.
    pub(crate) return_sites: usize,
    /// The replaced functions (as [`crate::PatchInfo::functions`]).
    pub(crate) functions: Vec<FuncInfo>,
    /// Their entry sites, in the order of `functions`.
    pub(crate) sites: Vec<EntrySite>,
    /// The PTEs to write: (page index, value).
    pub(crate) pte_writes: Vec<(usize, u64)>,
    /// Arena pages this load takes (the page table too when it maps): verified still free
    /// inside the pause.
    pub(crate) low_mem_pages: Vec<u64>,
    /// Every write but the entry sites, in order: pages, page table / PTEs, PMD entry.
    pub(crate) writes: Vec<Write>,
    /// The entry sites' jmps to the new functions (an immediate switch), in the order of
    /// `functions`.
    pub(crate) site_writes: Vec<Write>,
    /// Offset in the data part of the room for the transition's stand-in `klp_patch`
    /// ([`ConsistentPlan::dummy_size`] bytes), when planned for the consistency model.
    pub(crate) dummy_off: Option<u64>,
    /// Bytes used in the code part (the object's code, then the stubs).
    pub(crate) code_len: u64,
    /// Bytes used in the data part (the object's data, then the stand-in `klp_patch`).
    pub(crate) data_len: u64,
    /// The prologue rewrites among the functions (name, relocation): no vCPU or task may be
    /// inside their moved bytes when the jmps are written.
    pub(crate) prologues: Vec<(String, Prologue)>,
}

/// What a load for the consistency model adds: a dispatcher stub per function after the code,
/// and room for a stand-in `struct klp_patch` after the data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConsistentPlan {
    /// Where the stubs find `current->patch_state`.
    pub(crate) layout: crate::dispatch::TaskStateLayout,
    /// sizeof(struct klp_patch).
    pub(crate) dummy_size: u64,
}

/// `n` rounded up to 64.
fn align64(n: u64) -> u64 {
    n.div_ceil(64) * 64
}

/// Computes a load of `object` (named `file_name` unless it has `HVPATCH_NAME`) into the
/// guest, reading but never writing it: release check, arena placement, linking, entry-site
/// checks and the writes. `prologue_ok`: functions without an ftrace site get a prologue
/// rewrite (else they are refused, with a hint when one would work).
pub(crate) fn plan_load(
    engine: &Engine,
    ctl: &mut dyn GuestControl,
    t: &Target,
    object: &[u8],
    file_name: &str,
    consistent: Option<ConsistentPlan>,
    prologue_ok: bool,
) -> Result<LoadPlan, PatchError> {
    let obj = PatchObject::parse(object, file_name).map_err(Box::new)?;
    plan_parsed_with(engine, ctl, t, obj, consistent, prologue_ok, false)
}

/// [`plan_load`] of a parsed object at a module's load (the guest stopped at the module-load
/// hook, [`crate::modwait`]): its modules may be coming, and a transition of another patch may
/// run (the module's functions are in none). Immediate, ftrace sites only.
pub(crate) fn plan_at_module_load(
    engine: &Engine,
    ctl: &mut dyn GuestControl,
    t: &Target,
    obj: PatchObject,
) -> Result<LoadPlan, PatchError> {
    plan_parsed_with(engine, ctl, t, obj, None, false, true)
}

/// Refuses while a transition runs: its dispatcher stubs jump to the versions on the function
/// stacks, which no other load or unload may change under it.
pub(crate) fn no_transition(engine: &Engine) -> Result<(), PatchError> {
    match &engine.transition {
        Some(t) => Err(PatchError::InTransition(t.patch.clone())),
        None => Ok(()),
    }
}

/// [`plan_load`] of a parsed object, for the consistency model (which has the kernel view the
/// prologue rewrite needs): functions without an ftrace site get a prologue rewrite, whose
/// trampoline is the dispatcher's old path. Stacking under the consistency model on another
/// patch's rewrite is refused (that trampoline is the other patch's).
pub(crate) fn plan_parsed(
    engine: &Engine,
    ctl: &mut dyn GuestControl,
    t: &Target,
    obj: PatchObject,
    consistent: Option<ConsistentPlan>,
) -> Result<LoadPlan, PatchError> {
    plan_parsed_with(engine, ctl, t, obj, consistent, true, false)
}

/// [`plan_parsed`]; `prologue_ok`: a function without an ftrace site gets a prologue rewrite
/// (immediate loads, [`crate::prologue`]).
fn plan_parsed_with(
    engine: &Engine,
    ctl: &mut dyn GuestControl,
    t: &Target,
    obj: PatchObject,
    consistent: Option<ConsistentPlan>,
    prologue_ok: bool,
    at_module_load: bool,
) -> Result<LoadPlan, PatchError> {
    if !at_module_load {
        no_transition(engine)?;
    }
    if engine
        .patches
        .iter()
        .any(|p| p.info.name == obj.name && p.info.state == PatchState::Enabled)
    {
        return Err(PatchError::AlreadyLoaded(obj.name));
    }
    if let Some(wanted) = &obj.kernel_release {
        let guest = guest_release(ctl.memory(), t)?;
        if &guest != wanted {
            return Err(PatchError::KernelMismatch {
                patch: obj.name,
                wanted: wanted.clone(),
                guest,
            });
        }
    }
    // The kernel modules the patch names: loaded and live now.
    let objects = module_objects(ctl.memory(), t, &obj, at_module_load)?;
    // Arena (discovered once, state kept on success only).
    let base = match &engine.arena {
        Some(a) => a.clone(),
        None => match ctl.patch_arena() {
            Some((s, l)) => Arena::host(s, l),
            None => Arena::low_memory(ctl.memory(), &t.paging, t.symbols)?,
        },
    };
    let mem = ctl.memory();
    let nfuncs = obj.funcs.len() as u64;
    let stub_off = align64(obj.layout.code_size);
    let mut dummy_off = align64(obj.layout.data_size);
    if let Some(c) = consistent {
        // The stand-in klp_patch stays on one page.
        if c.dummy_size > 0 && dummy_off / PAGE != (dummy_off + c.dummy_size - 1) / PAGE {
            dummy_off = dummy_off.div_ceil(PAGE) * PAGE;
        }
    }
    let (code_len, data_len) = match consistent {
        Some(c) => (
            stub_off + nfuncs * crate::dispatch::STUB_SIZE,
            dummy_off + c.dummy_size,
        ),
        None => (obj.layout.code_size, obj.layout.data_size),
    };
    // Room for a trampoline per function needing a prologue rewrite, after the code (and
    // stubs).
    let no_tramps = BTreeMap::new();
    let names = GuestResolver {
        t,
        mem,
        sites: &engine.sites,
        tramps: &no_tramps,
        objects: &objects,
    };
    let rewrites: Vec<(String, u64)> = if prologue_ok {
        obj.funcs
            .iter()
            // Module functions: no prologue rewrite (the module's own jump labels, static
            // calls and exception tables are not read), only their ftrace site.
            .filter(|f| f.object.is_none())
            .filter(|f| {
                names
                    .resolve_in(f.object.as_deref(), &f.old_name, f.sympos)
                    .is_ok_and(|a| wants_prologue(&engine.sites, mem, t, a))
            })
            .map(|f| (f.old_name.clone(), f.sympos))
            .collect()
    } else {
        Vec::new()
    };
    let ntramp = rewrites.len() as u64;
    let tramp_off = align64(code_len);
    let code_len = if ntramp > 0 {
        tramp_off + ntramp * TRAMP_SLOT
    } else {
        code_len
    };
    let ncode = code_len.div_ceil(PAGE) as usize;
    let ndata = data_len.div_ceil(PAGE) as usize;
    // Map (reusing the last slot with its old layout first; a fresh slot if the patch
    // does not fit that layout) and pick the code and data pages.
    let place = |reuse: bool| -> Result<_, PatchError> {
        let mut arena = base.clone();
        let new_mapping = match arena.mapping {
            Some(_) => None,
            None => {
                let m = arena.plan_mapping(mem, &t.paging, t.symbols, reuse)?;
                arena.set_mapped(m);
                Some(m)
            }
        };
        let code_start = arena.find_run(ncode, PageKind::Code)?;
        arena.mark(code_start, ncode, PageKind::Code);
        let data_start = arena.find_run(ndata, PageKind::Data)?;
        arena.mark(data_start, ndata, PageKind::Data);
        Ok((arena, new_mapping, code_start, data_start))
    };
    let (arena, new_mapping, code_start, data_start) = match place(true) {
        Err(PatchError::Arena(ArenaError::Full { .. })) if base.mapping.is_none() => place(false)?,
        r => r?,
    };
    let mapping = arena
        .mapping
        .ok_or_else(|| PatchError::Changed("no mapping".into()))?;
    let va_of = |i: usize| mapping.va + i as u64 * PAGE;
    let (code_base, data_base) = (va_of(code_start), va_of(data_start));

    let tramps: BTreeMap<(String, u64), u64> = rewrites
        .into_iter()
        .enumerate()
        .map(|(k, f)| (f, code_base + tramp_off + k as u64 * TRAMP_SLOT))
        .collect();
    let resolver = GuestResolver {
        t,
        mem,
        sites: &engine.sites,
        tramps: &tramps,
        objects: &objects,
    };
    let mut linked =
        link(&obj, &resolver, code_base, data_base).map_err(|source| PatchError::Link {
            patch: obj.name.clone(),
            source: Box::new(source),
        })?;
    if consistent.is_some() || ntramp > 0 {
        linked.code.resize(code_len as usize, 0xcc);
    }

    // Entry sites.
    let mut sites: Vec<EntrySite> = Vec::new();
    let mut site_writes = Vec::new();
    let mut functions = Vec::new();
    let mut prologues = Vec::new();
    for f in &linked.funcs {
        let (es, method, prologue) = match entry_site(&engine.sites, mem, t, f) {
            Ok(es) if prologue_ok && fresh_rewrite(&engine.sites, es.site) => {
                let at = tramps.get(&(f.old_name.clone(), f.sympos)).copied();
                let first = es.error("a prologue rewrite of ours, no patch on it now".into());
                prologue_site(&engine.sites, mem, t, f, at, first)?
            }
            Ok(es) => (es, Method::FtraceSite, None),
            Err(e) if prologue_ok && f.object.is_none() => {
                let at = tramps.get(&(f.old_name.clone(), f.sympos)).copied();
                prologue_site(&engine.sites, mem, t, f, at, e)?
            }
            Err(e @ PatchError::Site { .. })
                if !prologue_ok
                    && f.object.is_none()
                    && wants_prologue(&engine.sites, mem, t, f.old_addr) =>
            {
                let hint = match crate::prologue_plan::plan_entry(
                    mem,
                    t,
                    f.old_addr,
                    0xffff_ffff_c000_0000,
                    &[],
                ) {
                    Ok(p) if p.prologue.is_some() => format!(
                        " (a {} rewrite can patch it: an immediate load, `patch load --immediate`)",
                        p.method
                    ),
                    _ => String::new(),
                };
                return Err(match e {
                    PatchError::Site {
                        func,
                        addr,
                        site,
                        what,
                    } => PatchError::Site {
                        func,
                        addr,
                        site,
                        what: format!("{what}{hint}"),
                    },
                    other => other,
                });
            }
            Err(e) => return Err(e),
        };
        // Stacking on a rewrite of ours: its method, and the instructions it moved.
        let method = match engine.sites.get(&es.site) {
            Some(st) if method == Method::FtraceSite && st.original != NOP5 => Method::Prologue,
            _ => method,
        };
        let tramp = prologue.as_ref().map(|p| p.tramp_va);
        if method != Method::FtraceSite && tramp.is_none() && (consistent.is_some() || !prologue_ok)
        {
            // Its stubs and reversals would continue the original in the other patch's
            // trampoline, which goes with that patch.
            return Err(es.error(format!(
                "another patch of ours rewrote its prologue ({method}); only immediate patches \
                 can stack on it (`patch load --immediate`): the original runs in that patch's \
                 trampoline"
            )));
        }
        let moved: Vec<MovedInsn> = match &prologue {
            Some(p) => p.moved.clone(),
            None if method != Method::FtraceSite => engine
                .patches
                .iter()
                .flat_map(|p| &p.info.functions)
                .find(|g| g.site == es.site && !g.moved.is_empty())
                .map_or_else(Vec::new, |g| g.moved.clone()),
            None => Vec::new(),
        };
        if let Some(p) = prologue {
            let at = (p.tramp_va - code_base) as usize;
            linked.code[at..at + p.tramp.len()].copy_from_slice(&p.tramp);
            prologues.push((f.old_name.clone(), p));
        }
        if sites.iter().any(|p| p.site == es.site) {
            return Err(es.error("replaced twice by this patch".into()));
        }
        site_writes.push(es.write_jmp(f.new_addr)?);
        let stub = match consistent {
            Some(c) => {
                let at = stub_off + functions.len() as u64 * crate::dispatch::STUB_SIZE;
                let va = code_base + at;
                // The original: after the ftrace site, or this load's trampoline.
                let orig = tramp.unwrap_or(es.site + 5);
                let (old, _) = engine
                    .sites
                    .get(&es.site)
                    .map_or((orig, None), |st| st.top(orig));
                let b = crate::dispatch::stub(c.layout, va, old, f.new_addr)
                    .map_err(|e| es.error(e.to_string()))?;
                linked.code[at as usize..(at as usize + b.len())].copy_from_slice(&b);
                Some(va)
            }
            None => None,
        };
        let old_size = match &f.object {
            Some(o) => objects.get(o).and_then(|m| m.size_of(f.old_addr)),
            None => None,
        };
        functions.push(FuncInfo {
            object: f.object.clone(),
            old_size,
            new_size: f.new_size,
            stub,
            old_name: f.old_name.clone(),
            sympos: f.sympos,
            old_addr: f.old_addr,
            site: es.site,
            new_addr: f.new_addr,
            active: true,
            flags: f.flags,
            method,
            tramp,
            moved,
        });
        sites.push(es);
    }

    // Every byte to write, with what must be there now.
    let zero = vec![0u8; PAGE as usize];
    let mut writes = Vec::new();
    let mut pte_writes = Vec::new();
    // The pages are verified all-zero; only their non-zero prefix is written (fewer bytes
    // through slow backends such as the gdbstub).
    let page_chunks = |bytes: &[u8], start: usize, n: usize| -> Vec<(usize, Vec<u8>)> {
        (0..n)
            .map(|k| {
                let lo = (k * PAGE as usize).min(bytes.len());
                let hi = ((k + 1) * PAGE as usize).min(bytes.len());
                let chunk = &bytes[lo..hi];
                let used = chunk.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                (start + k, chunk[..used].to_vec())
            })
            .collect()
    };
    let table_pa = arena.pages[mapping.table];
    for (kind, chunks) in [
        (PageKind::Code, page_chunks(&linked.code, code_start, ncode)),
        (PageKind::Data, page_chunks(&linked.data, data_start, ndata)),
    ] {
        for (i, content) in chunks {
            let pa = arena.pages[i];
            writes.push(Write {
                pa,
                expect: Some(zero.clone()),
                old: vec![],
                new: content,
                what: format!("arena page {i}"),
            });
            pte_writes.push((i, pte(pa, kind, t.paging.nx)));
        }
    }
    let mut low_mem_pages: Vec<u64> = writes.iter().map(|w| w.pa).collect();
    if let Some(m) = new_mapping {
        let mut table = vec![0u8; PAGE as usize];
        for &(i, v) in &pte_writes {
            table[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        writes.push(Write {
            pa: table_pa,
            expect: Some(zero.clone()),
            old: vec![],
            new: table,
            what: "page table".into(),
        });
        writes.push(Write {
            pa: m.pmd_pa,
            expect: Some(m.pmd_old.to_le_bytes().to_vec()),
            old: vec![],
            new: m.pmd_new.to_le_bytes().to_vec(),
            what: format!("PMD entry for {:#x}", m.va),
        });
        low_mem_pages.push(table_pa);
    } else {
        for &(i, v) in &pte_writes {
            writes.push(Write {
                pa: table_pa + i as u64 * 8,
                expect: Some(vec![0; 8]),
                old: vec![],
                new: v.to_le_bytes().to_vec(),
                what: format!("PTE {i}"),
            });
        }
        writes.push(Write {
            pa: mapping.pmd_pa,
            expect: Some(mapping.pmd_new.to_le_bytes().to_vec()),
            old: vec![],
            new: mapping.pmd_new.to_le_bytes().to_vec(),
            what: "our PMD entry".into(),
        });
    }
    Ok(LoadPlan {
        site_writes,
        dummy_off: consistent.map(|_| dummy_off),
        code_len,
        data_len,
        obj,
        arena,
        code_run: (code_start, ncode),
        data_run: (data_start, ndata),
        code_base,
        data_base,
        return_sites: linked.return_sites,
        functions,
        sites,
        pte_writes,
        low_mem_pages,
        writes,
        prologues,
    })
}
