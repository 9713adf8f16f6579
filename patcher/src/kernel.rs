//! [`SymbolSource`] for `introspect::Kernel` (kallsyms decoded from guest memory, BTF).

use introspect::{Kernel, PhysMemory, VcpuRegs};

use introspect::live::{Owner, Reference};

use crate::paging::KernelPaging;
use crate::reach::Reachability;
use crate::symbols::SymbolSource;

/// A guest kernel found by `introspect::Kernel::open`. The BTF facts the engine needs are read
/// once at construction, so the value holds no borrow of guest memory (the engine needs the
/// guest control mutably while using it).
pub struct KernelSymbols<'a> {
    /// The kernel.
    pub kernel: &'a Kernel,
    /// `sizeof(struct page)` from BTF, if available.
    page_size: Option<u64>,
    /// `PG_reserved` from BTF (`enum pageflags`), if available.
    pg_reserved: Option<i64>,
    /// The ftrace record layout and flags from BTF ([`crate::ftrace_recs`]): sizes, offsets
    /// and enumerators found.
    ftrace: Vec<(&'static str, &'static str, i64)>,
}

/// The BTF facts [`crate::ftrace_recs`] asks for: (struct, member) offsets, `dyn_ftrace`'s size
/// and the `FTRACE_FL_*` enumerators.
fn ftrace_facts(b: &introspect::btf::Btf) -> Vec<(&'static str, &'static str, i64)> {
    let mut v = Vec::new();
    for (st, m) in [
        ("ftrace_page", "next"),
        ("ftrace_page", "records"),
        ("ftrace_page", "index"),
        ("dyn_ftrace", "flags"),
    ] {
        if let Ok(o) = b.member_offset(st, m) {
            v.push((st, m, o as i64));
        }
    }
    if let Ok(sz) = b.struct_size("dyn_ftrace") {
        v.push(("dyn_ftrace", "", sz as i64));
    }
    for e in ["FTRACE_FL_IPMODIFY", "FTRACE_FL_DIRECT"] {
        if let Some(x) = b.enum_value(e) {
            v.push(("ftrace", e, x));
        }
    }
    v
}

impl std::fmt::Debug for KernelSymbols<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSymbols").finish_non_exhaustive()
    }
}

impl<'a> KernelSymbols<'a> {
    /// Wraps `kernel`; `mem` is read for BTF now and not kept.
    pub fn new(kernel: &'a Kernel, mem: &dyn PhysMemory) -> Self {
        let btf = kernel.btf(mem).ok();
        let page_size = btf.and_then(|b| b.struct_size("page").ok());
        let pg_reserved = btf.and_then(|b| b.enum_value("PG_reserved"));
        let ftrace = btf.map(ftrace_facts).unwrap_or_default();
        Self {
            kernel,
            page_size,
            pg_reserved,
            ftrace,
        }
    }

    fn fact(&self, a: &str, b: &str) -> Option<i64> {
        self.ftrace
            .iter()
            .find(|(x, y, _)| *x == a && *y == b)
            .map(|f| f.2)
    }

    /// The kernel's paging root; `nx` from a vCPU's EFER.NXE.
    pub fn paging(&self, nx: bool) -> KernelPaging {
        let r = self.kernel.page_root();
        KernelPaging {
            pgd_pa: r.pgd_pa,
            la57: r.levels == 5,
            nx,
        }
    }
}

impl SymbolSource for KernelSymbols<'_> {
    fn addresses(&self, name: &str) -> Vec<u64> {
        let mut v: Vec<(usize, u64)> = self
            .kernel
            .symbols()
            .lookup_all(name)
            .map(|s| (s.index, s.addr))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, a)| a).collect()
    }

    fn symbolize(&self, addr: u64) -> Option<(String, u64)> {
        self.kernel
            .symbolize(addr)
            .map(|s| (s.name.to_string(), s.offset))
    }

    fn size_of(&self, addr: u64) -> Option<u64> {
        self.kernel
            .symbolize(addr)
            .filter(|s| s.offset == 0)
            .map(|s| s.size)
    }

    fn enum_value(&self, enum_name: &str, enumerator: &str) -> Option<i64> {
        if enum_name == "pageflags" && enumerator == "PG_reserved" {
            return self.pg_reserved;
        }
        self.fact(enum_name, enumerator)
    }

    fn type_size(&self, struct_name: &str) -> Option<u64> {
        if struct_name == "page" {
            return self.page_size;
        }
        self.fact(struct_name, "")
            .and_then(|v| u64::try_from(v).ok())
    }

    fn member_offset(&self, struct_name: &str, member: &str) -> Option<u64> {
        self.fact(struct_name, member)
            .filter(|_| !member.is_empty())
            .and_then(|v| u64::try_from(v).ok())
    }

    fn module(
        &self,
        mem: &dyn PhysMemory,
        name: &str,
    ) -> Result<Option<crate::symbols::ModuleSyms>, String> {
        let modules = self
            .kernel
            .modules(mem)
            .map_err(|e| format!("reading the module list: {e}"))?;
        let Some(module) = modules.into_iter().find(|m| m.name == name) else {
            return Ok(None);
        };
        let symbols = self
            .kernel
            .symbols_of_module(mem, &module)
            .map_err(|e| format!("reading the symbols of module {name}: {e}"))?;
        Ok(Some(crate::symbols::ModuleSyms { module, symbols }))
    }
}

/// The guest kernel answers reachability questions from its live contexts
/// ([`Kernel::find_references`]) and unwinds holders for reports.
impl Reachability for Kernel {
    fn references(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Reference>, String> {
        self.find_references(mem, vcpus, ranges)
            .map_err(|e| e.to_string())
    }

    fn stack_of(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs], owner: &Owner) -> Vec<String> {
        let stack = match owner {
            Owner::Vcpu { vcpu, .. } => self.vcpu_stack(mem, vcpus, *vcpu),
            // A switched-out task: read it alone (it runs on no vCPU), not the whole list.
            Owner::Task(t) => match self.task_at(mem, t.addr) {
                Ok(task) => self.task_stack(mem, &task),
                Err(_) => return vec![],
            },
        };
        stack
            .map(|s| s.frames.iter().map(|f| f.render()).collect())
            .unwrap_or_default()
    }
}

/// The guest kernel's tasks and stacks for the consistency model.
impl crate::view::TaskView for Kernel {
    fn task_state_layout(&self, mem: &dyn PhysMemory) -> Option<crate::dispatch::TaskStateLayout> {
        let m = self.model(mem).ok()?;
        Some(crate::dispatch::TaskStateLayout {
            current_task: m.percpu.current_task,
            patch_state: m.task.patch_state?,
        })
    }

    fn klp_patch_layout(&self, mem: &dyn PhysMemory) -> Option<(u64, u64, u64)> {
        let b = self.btf(mem).ok()?;
        Some((
            b.struct_size("klp_patch").ok()?,
            b.member_offset("klp_patch", "list").ok()?,
            b.member_offset("klp_patch", "obj_list").ok()?,
        ))
    }

    fn flags_offset(&self, mem: &dyn PhysMemory) -> u64 {
        self.btf(mem)
            .ok()
            .and_then(|b| b.member_offset("task_struct", "thread_info.flags").ok())
            .unwrap_or(0)
    }

    fn tasks(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
    ) -> Result<Vec<crate::view::TaskSnap>, String> {
        let flags_off = crate::view::TaskView::flags_offset(self, mem);
        let tasks = Kernel::tasks(self, mem, vcpus).map_err(|e| e.to_string())?;
        tasks
            .into_iter()
            .map(|t| {
                let flags = self
                    .read_u64_virt(mem, t.addr.wrapping_add(flags_off))
                    .map_err(|e| format!("flags of pid {}: {e}", t.pid))?;
                let user_mode = t
                    .running_on_vcpu
                    .and_then(|v| vcpus.get(v))
                    .is_some_and(|r| r.cpl() == 3);
                Ok(crate::view::TaskSnap {
                    addr: t.addr,
                    pid: t.pid,
                    tgid: t.tgid,
                    comm: t.comm.clone(),
                    patch_state: t.patch_state.unwrap_or(-1),
                    flags,
                    vcpu: t.running_on_vcpu,
                    user_mode,
                    is_idle: t.is_idle,
                    raw: Some(Box::new(t)),
                })
            })
            .collect()
    }

    fn current(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        vcpu: usize,
    ) -> Result<crate::view::TaskSnap, String> {
        let cpus = self.vcpu_cpus(mem, vcpus).map_err(|e| e.to_string())?;
        let addr = cpus
            .get(vcpu)
            .and_then(|c| c.current)
            .ok_or_else(|| format!("no current task found on vCPU {vcpu}"))?;
        let t = self.task_at(mem, addr).map_err(|e| e.to_string())?;
        let flags_off = crate::view::TaskView::flags_offset(self, mem);
        let flags = self
            .read_u64_virt(mem, addr.wrapping_add(flags_off))
            .map_err(|e| format!("flags of pid {}: {e}", t.pid))?;
        Ok(crate::view::TaskSnap {
            addr,
            pid: t.pid,
            tgid: t.tgid,
            comm: t.comm,
            patch_state: t.patch_state.unwrap_or(-1),
            flags,
            vcpu: Some(vcpu),
            user_mode: vcpus.get(vcpu).is_some_and(|r| r.cpl() == 3),
            is_idle: t.is_idle,
            raw: None,
        })
    }

    fn stack(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        task: &crate::view::TaskSnap,
    ) -> crate::view::StackSnap {
        stack_snap(self, mem, vcpus, task, true)
    }

    fn stack_frames(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        task: &crate::view::TaskSnap,
    ) -> crate::view::StackSnap {
        stack_snap(self, mem, vcpus, task, false)
    }

    fn set_frame_pointer_text(&self, ranges: &[(u64, u64)]) {
        Kernel::set_frame_pointer_text(self, ranges)
    }

    fn set_text_aliases(&self, aliases: &[(u64, u64)]) {
        Kernel::set_text_aliases(self, aliases)
    }

    fn live_references(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        ranges: &[(u64, u64)],
    ) -> Option<Result<Vec<Reference>, String>> {
        Some(Reachability::references(self, mem, vcpus, ranges))
    }

    fn function_range(&self, addr: u64) -> Option<(u64, u64)> {
        let s = self.symbolize(addr)?;
        let start = addr - s.offset;
        Some((start, start + s.size.max(1)))
    }

    fn symbol(&self, name: &str) -> Option<u64> {
        self.lookup(name, None).ok()
    }

    fn translate(&self, mem: &dyn PhysMemory, va: u64) -> Option<u64> {
        Kernel::translate(self, mem, va).ok()
    }

    fn module_function(
        &self,
        mem: &dyn PhysMemory,
        module: &str,
        name: &str,
        sympos: u64,
    ) -> Result<u64, String> {
        let ks = KernelSymbols {
            kernel: self,
            page_size: None,
            pg_reserved: None,
            ftrace: Vec::new(),
        };
        let m = ks
            .module(mem, module)?
            .ok_or_else(|| format!("module {module} is not loaded"))?;
        if let Some(why) = m.not_live() {
            return Err(format!("module {module} {why}"));
        }
        crate::link::pick_sympos(name, &m.addresses(name), sympos)
            .map_err(|e| format!("module {module}: {e}"))
    }
}

/// The stack of `task` (the one read by [`TaskView::tasks`] in this pause when it kept it, else
/// read again), with its frames symbolized when `render`.
fn stack_snap(
    k: &Kernel,
    mem: &dyn PhysMemory,
    vcpus: &[VcpuRegs],
    task: &crate::view::TaskSnap,
    render: bool,
) -> crate::view::StackSnap {
    let st = match (task.vcpu, &task.raw) {
        (Some(v), _) => k.vcpu_stack(mem, vcpus, v),
        (None, Some(t)) => k.task_stack(mem, t),
        (None, None) => match k.task_at(mem, task.addr) {
            Ok(t) => k.task_stack(mem, &t),
            Err(e) => {
                return crate::view::StackSnap {
                    reason: Some(e.to_string()),
                    ..Default::default()
                }
            }
        },
    };
    match st {
        Ok(s) => crate::view::StackSnap {
            frames: s.frames.iter().map(|f| f.addr).collect(),
            first_exact: task.vcpu.is_some(),
            rendered: if render {
                s.frames.iter().map(|f| f.render()).collect()
            } else {
                Vec::new()
            },
            reliable: s.reliable,
            reason: s.reason,
        },
        Err(e) => crate::view::StackSnap {
            reason: Some(e.to_string()),
            ..Default::default()
        },
    }
}
