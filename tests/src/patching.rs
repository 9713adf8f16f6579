//! Shared steps of the end-to-end patch tests and benchmarks: attach the QEMU backend to a
//! harness guest, open its kernel, and compile patch sources.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use introspect::{Kernel, VcpuRegs};
use patcher::build::{compile, BuildOptions};
use patcher::GuestControl;
use vmm::attach::QemuAttach;

use crate::Guest;

/// The attach backend on `g`, and the guest kernel as found from memory plus the registers
/// of one short pause (also returned; `regs[0].efer` gives NX).
pub fn attach_and_open(g: &Guest) -> (QemuAttach, Kernel, Vec<VcpuRegs>) {
    let mut ctl = QemuAttach::connect(&g.gdb_socket(), &g.mem_file())
        .unwrap_or_else(|e| panic!("QemuAttach::connect: {e}\n{}", g.tail()));
    ctl.pause().expect("pause");
    let regs: Vec<VcpuRegs> = (0..ctl.vcpu_count())
        .map(|v| ctl.regs(v).expect("vCPU registers"))
        .collect();
    let kernel = Kernel::open(ctl.memory(), &regs).expect("Kernel::open");
    ctl.resume().expect("resume");
    (ctl, kernel, regs)
}

/// The first 16 bytes of each function in `funcs` (at the addresses in `like`, when given: a
/// previous result), through a short attach of our own (no other attach may be connected).
pub fn entry_bytes(
    g: &Guest,
    funcs: &[&str],
    like: Option<&[(String, u64, Vec<u8>)]>,
) -> Vec<(String, u64, Vec<u8>)> {
    let (ctl, k, _) = attach_and_open(g);
    funcs
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let addr = match like.and_then(|l| l.get(i)) {
                Some(l) => l.1,
                None => k.lookup(f, None).unwrap_or_else(|e| panic!("{f}: {e}")),
            };
            let mut b = vec![0u8; 16];
            k.read_virt(ctl.memory(), addr, &mut b)
                .unwrap_or_else(|e| panic!("reading {f}: {e}"));
            (f.to_string(), addr, b)
        })
        .collect()
}

/// A `pipe_read` wrapper counting the reads that returned (a reader blocked in it has the new
/// function on its stack), and `/proc/cmdline` printing the count (`pipe patched N`).
pub const PIPE_COUNT_PATCH: &str = "struct kiocb; struct iov_iter;\n\
    HVPATCH_ORIG(ssize_t, pipe_read, (struct kiocb *iocb, struct iov_iter *to));\n\
    static unsigned long reads;\n\
    static ssize_t new_pipe_read(struct kiocb *iocb, struct iov_iter *to)\n\
    { ssize_t r = hvpatch_orig_pipe_read(iocb, to); __atomic_fetch_add(&reads, 1, __ATOMIC_RELAXED); return r; }\n\
    static int show(struct seq_file *m, void *v) { seq_printf(m, \"pipe patched %lu\\n\", reads); return 0; }\n\
    HVPATCH_FUNC(pipe_read, new_pipe_read);\n\
    HVPATCH_FUNC(cmdline_proc_show, show);";

/// Builds the patch `name` (`HVPATCH_NAME(name)` + `body`) into a temporary file; its path.
pub fn patch_file(name: &str, body: &str) -> String {
    let obj = build_patch(name, &format!("HVPATCH_NAME(\"{name}\");\n{body}"));
    let p = std::env::temp_dir().join(format!("hvpatch-{}-{name}.o", std::process::id()));
    std::fs::write(&p, obj).expect("write patch object");
    p.display().to_string()
}

/// Compiles a patch whose C source is `body` after `#include <hvpatch.h>`; `tag` names the
/// files. Each call gets its own directory (tests build the same tags concurrently).
pub fn build_patch(tag: &str, body: &str) -> Vec<u8> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("hvpatch-e2e-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    let c: PathBuf = d.join(format!("{tag}.c"));
    std::fs::write(&c, format!("#include <hvpatch.h>\n{body}\n")).expect("write source");
    let o = d.join(format!("{tag}.o"));
    compile(&BuildOptions::new(&c, &o))
        .unwrap_or_else(|e| panic!("building {tag} (needs gcc): {e}"));
    std::fs::read(&o).expect("read object")
}

/// Asserts that `ours` (lines in `/proc/kallsyms` format, from hvpatch) equals the guest's own
/// `/proc/kallsyms` text `proc` line for line; `what` names our side in messages.
pub fn assert_kallsyms_equal(proc: &str, ours: &[String], what: &str) {
    let p: Vec<&str> = proc.lines().map(str::trim_end).collect();
    assert!(
        p.len() > 80_000,
        "/proc/kallsyms has only {} lines",
        p.len()
    );
    assert!(
        !p.iter().any(|l| l.starts_with("0000000000000000 T")),
        "/proc/kallsyms shows zeroed addresses: not read as root?"
    );
    for (i, (a, b)) in p.iter().zip(ours).enumerate() {
        assert_eq!(a, b, "line {} differs: /proc/kallsyms vs {what}", i + 1);
    }
    assert_eq!(p.len(), ours.len(), "line count: /proc/kallsyms vs {what}");
}
