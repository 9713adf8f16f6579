//! The whole-guest (kpatch-style) transition, for kernels without `task_struct.patch_state`
//! (no CONFIG_LIVEPATCH), on booted-guest snapshots of 6.1 and 6.12 seen through a kernel view
//! that hides the livepatch fields:
//! - a patch no stack holds switches every site at once in its first check, and no task field
//!   or klp variable is written;
//! - a patch of `pipe_read`, which the snapshot's `pipewait` task sleeps in, holds: `status`
//!   says `WholeGuest` and names that task, the site keeps its original bytes (every task runs
//!   the old code) and later checks keep it so; disabling reverses at once and unloading
//!   leaves guest RAM byte for byte as it was.

mod common;

use common::{snap_6_1, snap_6_12, Snapshot};
use introspect::{PhysMemory, VcpuRegs};
use patcher::engine::Target;
use patcher::transition::Mode;
use patcher::view::{StackSnap, TaskSnap, TaskView};
use patcher::{KernelPaging, StepOutcome};

/// A kernel without CONFIG_LIVEPATCH, as the engine sees it: no `patch_state`.
struct NoLivepatch<'a>(&'a introspect::Kernel);

impl TaskView for NoLivepatch<'_> {
    fn task_state_layout(
        &self,
        _mem: &dyn PhysMemory,
    ) -> Option<patcher::dispatch::TaskStateLayout> {
        None
    }
    fn klp_patch_layout(&self, _mem: &dyn PhysMemory) -> Option<(u64, u64, u64)> {
        None
    }
    fn flags_offset(&self, mem: &dyn PhysMemory) -> u64 {
        self.0.flags_offset(mem)
    }
    fn tasks(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs]) -> Result<Vec<TaskSnap>, String> {
        let mut t = TaskView::tasks(self.0, mem, vcpus)?;
        t.iter_mut().for_each(|t| t.patch_state = -1);
        Ok(t)
    }
    fn current(
        &self,
        mem: &dyn PhysMemory,
        vcpus: &[VcpuRegs],
        vcpu: usize,
    ) -> Result<TaskSnap, String> {
        let mut t = self.0.current(mem, vcpus, vcpu)?;
        t.patch_state = -1;
        Ok(t)
    }
    fn stack(&self, mem: &dyn PhysMemory, vcpus: &[VcpuRegs], task: &TaskSnap) -> StackSnap {
        self.0.stack(mem, vcpus, task)
    }
    fn set_frame_pointer_text(&self, ranges: &[(u64, u64)]) {
        self.0.set_frame_pointer_text(ranges)
    }
    fn set_text_aliases(&self, aliases: &[(u64, u64)]) {
        self.0.set_text_aliases(aliases)
    }
    fn function_range(&self, addr: u64) -> Option<(u64, u64)> {
        self.0.function_range(addr)
    }
    fn symbol(&self, name: &str) -> Option<u64> {
        // No livepatch: no klp variables either.
        if name.starts_with("klp_") {
            return None;
        }
        TaskView::symbol(self.0, name)
    }
    fn translate(&self, mem: &dyn PhysMemory, va: u64) -> Option<u64> {
        TaskView::translate(self.0, mem, va)
    }
}

const PIPE_WRAP: &str = "struct kiocb; struct iov_iter;\n\
    HVPATCH_ORIG(ssize_t, pipe_read, (struct kiocb *iocb, struct iov_iter *to));\n\
    static ssize_t new_pipe_read(struct kiocb *iocb, struct iov_iter *to) { return hvpatch_orig_pipe_read(iocb, to); }\n\
    HVPATCH_FUNC(pipe_read, new_pipe_read);";

fn site_bytes(s: &Snapshot, ram: &[u8], va: u64) -> Vec<u8> {
    let p = KernelPaging::from_regs(&s.vcpus[0]);
    let mut b = vec![0u8; 5];
    p.read_virt(&introspect::SliceMemory::flat(ram), va, &mut b)
        .unwrap();
    b
}

/// (patch_state, flags) of every task, as the guest's own fields say.
fn task_fields(k: &introspect::Kernel, s: &Snapshot, ram: &[u8]) -> Vec<(i32, u64)> {
    TaskView::tasks(k, &introspect::SliceMemory::flat(ram), &s.vcpus)
        .unwrap()
        .iter()
        .map(|t| (t.patch_state, t.flags))
        .collect()
}

fn whole_guest(s: &Snapshot) {
    let kernel = common::kernel(s);
    let view = NoLivepatch(&kernel);
    let t = Target {
        symbols: &s.syms,
        paging: KernelPaging::from_regs(&s.vcpus[0]),
    };
    let mut g = s.guest();
    let before = g.ram.0.clone();
    let fields = task_fields(&kernel, s, &before);
    let mut e = patcher::Engine::new();

    // Nothing holds version_proc_show: every site switches in the first check.
    let obj = common::show_patch("free", "version_proc_show", "patched");
    let info = e
        .load_consistent(&mut g, &t, &view, &obj, "free.o", Default::default())
        .unwrap();
    assert!(!e.in_transition(), "{:?}", e.transition_status());
    let f = &info.functions[0];
    assert_eq!(
        site_bytes(s, &g.ram.0, f.site),
        patcher::site::jmp_bytes(f.site, f.new_addr).unwrap()
    );
    assert_eq!(
        task_fields(&kernel, s, &g.ram.0),
        fields,
        "a task field was written"
    );
    e.unload(&mut g, "free", &kernel, common::UNLOAD_WAIT)
        .unwrap();

    // pipewait sleeps in pipe_read: the transition holds, everyone keeps the old code.
    let obj = common::build_c("wg", PIPE_WRAP);
    let info = e
        .load_consistent(&mut g, &t, &view, &obj, "wg.o", Default::default())
        .unwrap();
    let site = info.functions[0].site;
    let st = e.transition_status().expect("in transition");
    assert_eq!(st.mode, Mode::WholeGuest);
    assert!(
        st.blocking
            .iter()
            .any(|b| b.stack.iter().any(|f| f.starts_with("pipe_read+"))),
        "no blocker in pipe_read: {:?}",
        st.blocking
    );
    assert_eq!(site_bytes(s, &g.ram.0, site), site_bytes(s, &before, site));
    for _ in 0..3 {
        assert_eq!(
            e.transition_step(&mut g, &view).unwrap(),
            StepOutcome::Pending
        );
        assert_eq!(site_bytes(s, &g.ram.0, site), site_bytes(s, &before, site));
    }
    assert_eq!(
        task_fields(&kernel, s, &g.ram.0),
        fields,
        "a task field was written"
    );
    // Disabling reverses; the next check completes it (nobody runs the new code).
    e.disable(&mut g, &view, "wg", Default::default()).unwrap();
    assert_eq!(
        e.transition_step(&mut g, &view).unwrap(),
        StepOutcome::Complete
    );
    assert!(!e.in_transition(), "{:?}", e.transition_status());
    e.unload(&mut g, "wg", &kernel, common::UNLOAD_WAIT)
        .unwrap();
    assert!(g.ram.0 == before, "guest RAM differs after unload");
}

#[test]
fn whole_guest_transition_6_1() {
    whole_guest(snap_6_1());
}

#[test]
fn whole_guest_transition_6_12() {
    whole_guest(snap_6_12());
}
