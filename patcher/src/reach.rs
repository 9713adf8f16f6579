//! Whether anything in the guest can still reach a patch's code or data: the question every
//! free of arena pages must ask first (see [`crate::Engine::unload_wait`]).
//!
//! The answer comes from the kernel view ([`introspect::live`]): every register of every
//! kernel-mode vCPU and every live stack slot of every CPU and task, following IRQ and
//! exception stack switches down to the interrupted task stack.

use introspect::live::{Owner, Place, Reference};
use introspect::{PhysMemory, VcpuRegs};
use serde::{Deserialize, Serialize};

/// The guest's kernel, asked whether anything holds an address in some ranges.
pub trait Reachability {
    /// Every register and live stack slot holding an address in one of `ranges`
    /// (`[start, end)`), and every context whose contents cannot be told. Empty means nothing
    /// can reach the ranges. Called with all vCPUs paused.
    fn references(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Reference>, String>;

    /// The symbolized kernel stack of `owner` (innermost first), for reports.
    fn stack_of(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs], owner: &Owner) -> Vec<String>;
}

/// Why a disabled patch's pages are still kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The first reference, in words ("pid 73 (hvhammer) running on vCPU 1: 0x… at 0x… on
    /// its task stack (1 stack switch(es) below the vCPU's RSP)").
    pub by: String,
    /// The holder's pid, when a task holds it.
    pub pid: Option<i32>,
    /// The holder's comm, when a task holds it.
    pub comm: Option<String>,
    /// How many references were found in all.
    pub references: usize,
    /// The holder's kernel stack, symbolized (patch frames show as bare addresses).
    pub stack: Vec<String>,
    /// What kinds of references were found, e.g. `code in task stack behind 1 switch`,
    /// `data in register`, `unknown` (for reports and the soak benchmark's tallies).
    pub kinds: Vec<String>,
}

impl Hold {
    /// Summarizes `refs` (non-empty); `code` is the patch's code range (the rest is data).
    pub fn from_refs(
        refs: &[Reference],
        code: (u64, u64),
        stack: impl FnOnce(&Owner) -> Vec<String>,
    ) -> Option<Hold> {
        // Report a task or vCPU reference before an "unknown" one: it says more.
        let first = refs
            .iter()
            .find(|r| !matches!(r.place, Place::Unknown(_)))
            .or(refs.first())?;
        let task = match &first.owner {
            Owner::Task(t) => Some(t),
            Owner::Vcpu { task, .. } => task.as_ref(),
        };
        let mut kinds: Vec<String> = refs.iter().map(|r| kind(r, code)).collect();
        kinds.sort();
        kinds.dedup();
        let extra = refs.len() - 1;
        Some(Hold {
            by: if extra > 0 {
                format!("{first} (and {extra} more)")
            } else {
                first.to_string()
            },
            pid: task.map(|t| t.pid),
            comm: task.map(|t| t.comm.clone()),
            references: refs.len(),
            stack: stack(&first.owner),
            kinds,
        })
    }
}

fn kind(r: &Reference, code: (u64, u64)) -> String {
    let what = if r.value >= code.0 && r.value < code.1 {
        "code"
    } else {
        "data"
    };
    match &r.place {
        Place::Register(n) if *n == "rip" => format!("{what} in rip"),
        Place::Register(_) => format!("{what} in register"),
        Place::Stack { ty, hops, .. } => {
            let ty = introspect::live::stack_type_name(*ty);
            if *hops > 0 {
                format!("{what} in {ty} stack behind {hops} switch")
            } else {
                format!("{what} in {ty} stack")
            }
        }
        Place::Unknown(why) => format!("unknown: {}", without_numbers(why)),
    }
}

/// `why` with hex numbers elided, so that reasons of one kind compare equal.
fn without_numbers(why: &str) -> String {
    why.split(' ')
        .map(|w| if w.contains("0x") { "…" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`Reachability`] for a guest that is not a Linux kernel (the assembled test guests of the
/// KVM tests, synthetic guests): every register of every vCPU, and each kernel-mode vCPU's stack
/// from RSP to the end of its 16 KiB-aligned block (or to the first unmapped page), read
/// through `paging`. There are no tasks and no stack bounds to look at, so it must not be used
/// for Linux guests.
#[derive(Debug, Clone, Copy)]
pub struct BareVcpus {
    /// The page tables the vCPUs run on.
    pub paging: crate::paging::KernelPaging,
}

/// Stack size [`BareVcpus`] assumes.
const BARE_STACK: u64 = 16 << 10;

impl Reachability for BareVcpus {
    fn references(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Reference>, String> {
        use introspect::live::{find_references, LiveContext, Segment};
        use introspect::unwind::StackType;
        struct View<'a>(&'a dyn PhysMemory, crate::paging::KernelPaging);
        impl introspect::model::GuestAccess for View<'_> {
            fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
                self.1.read_virt(self.0, va, buf).map_err(|e| e.to_string())
            }
            fn symbol(&self, _: &str) -> Option<u64> {
                None
            }
            fn symbolize(&self, _: u64) -> Option<(String, u64, u64)> {
                None
            }
        }
        let contexts: Vec<LiveContext> = vcpus
            .iter()
            .enumerate()
            .map(|(v, r)| {
                let mut regs: Vec<(&'static str, u64)> = vec![("rip", r.rip)];
                regs.extend(
                    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"]
                        .into_iter()
                        .zip(r.gprs),
                );
                regs.extend(
                    ["r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
                        .into_iter()
                        .zip(r.gprs[8..].iter().copied()),
                );
                // The stack: from RSP up to the 16 KiB boundary or the first unmapped page,
                // whichever comes first (a bare guest's stack bounds are not known; an
                // unmapped RSP means the vCPU uses no stack there).
                let sp = r.rsp() & !7;
                let mut end = sp;
                if let Some(limit) = (sp | (BARE_STACK - 1)).checked_add(1) {
                    while end < limit && self.paging.translate(mem, end).is_ok() {
                        end = (end | 0xfff) + 1;
                    }
                    end = end.min(limit);
                }
                let segments = if r.cpl() == 0 && end > sp {
                    vec![Segment {
                        start: sp,
                        end,
                        ty: StackType::Task,
                        hops: 0,
                    }]
                } else {
                    vec![]
                };
                LiveContext {
                    owner: Owner::Vcpu {
                        vcpu: v,
                        task: None,
                    },
                    regs,
                    segments,
                    unknown: None,
                }
            })
            .collect();
        Ok(find_references(&View(mem, self.paging), &contexts, ranges))
    }

    fn stack_of(&self, _: &dyn PhysMemory, _: &[VcpuRegs], _: &Owner) -> Vec<String> {
        vec![]
    }
}
