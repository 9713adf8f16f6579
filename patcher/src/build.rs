//! `hvpatch build`: compile one patch C file into one relocatable object with the flags the
//! guest kernels are built with.
//!
//! Flags and why (both supported guests, Debian 6.1 and 6.12, gcc 12):
//! * `-mcmodel=kernel -fno-pic -fno-pie`: code lives in the top 2 GiB, addresses as 32S/PC32.
//! * `-mno-red-zone`: interrupts run on the same stack in ring 0.
//! * `-mno-sse … -mno-80387 -mno-fp-ret-in-387`: no FPU/SIMD state in the kernel.
//! * `-fno-stack-protector`: the canary lives at a per-kernel per-cpu offset we do not emulate.
//! * `-mindirect-branch=thunk-extern -mindirect-branch-register`: indirect calls go through the
//!   guest's `__x86_indirect_thunk_<reg>` (the linker resolves them in kallsyms).
//! * `-mfunction-return=thunk-extern`: returns become `jmp __x86_return_thunk`, which the linker
//!   rewrites the way the kernel's `apply_returns()` does (see [`crate::link`]).
//! * `-mharden-sls=all`: like CONFIG_SLS / MITIGATION_SLS (int3 after ret/jmp).
//! * `-fcf-protection=branch`: ENDBR64 at function entries. Needed on 6.12 (X86_KERNEL_IBT) if
//!   the new function is ever called indirectly with IBT enforced; a NOP on 6.1 and on CPUs
//!   without IBT, so it is used for every guest.
//! * `-fno-jump-tables`: no indirect jumps through tables (retpoline/IBT safety).
//! * `-fno-asynchronous-unwind-tables`: no .eh_frame (the kernel uses ORC; injected code has
//!   none — see KERNEL-FACTS §4.2 about unwinding).
//! * `-fno-omit-frame-pointer -mno-omit-leaf-frame-pointer`: every patch function keeps a
//!   frame pointer, so the stack checks of the consistency model unwind through patch code
//!   (the guest's ORC does not cover the arena); `-D__HVPATCH_FRAME_POINTERS` makes hvpatch.h
//!   mark the object so.
//! * `-fno-strict-aliasing -fno-delete-null-pointer-checks -fno-strict-overflow`: the kernel's
//!   C dialect.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// The authoring header, embedded so that `hvpatch build` works from any directory.
pub const HEADER: &str = include_str!("../include/hvpatch.h");

/// The compiler flags used for every patch (see the module documentation).
pub const KERNEL_CFLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-std=gnu11",
    "-ffreestanding",
    "-nostdinc",
    "-fno-pic",
    "-fno-pie",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-mno-sse",
    "-mno-mmx",
    "-mno-sse2",
    "-mno-3dnow",
    "-mno-avx",
    "-mno-80387",
    "-mno-fp-ret-in-387",
    "-mskip-rax-setup",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-jump-tables",
    "-fno-common",
    "-fno-strict-aliasing",
    "-fno-delete-null-pointer-checks",
    "-fno-strict-overflow",
    "-mindirect-branch=thunk-extern",
    "-mindirect-branch-register",
    "-mfunction-return=thunk-extern",
    "-mharden-sls=all",
    "-fcf-protection=branch",
    "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer",
    "-D__HVPATCH_FRAME_POINTERS",
];

/// Errors from [`compile`].
#[derive(Debug, Error)]
pub enum BuildError {
    /// Filesystem error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The compiler (or objcopy) failed.
    #[error("{tool} failed ({status}):\n{stderr}")]
    Tool {
        /// Tool command line.
        tool: String,
        /// Exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// The object names another kernel than `--kernel-release`.
    #[error(
        "the patch declares HVPATCH_KERNEL(\"{declared}\") but --kernel-release is {requested}"
    )]
    ReleaseMismatch {
        /// Declared in the source.
        declared: String,
        /// Requested on the command line.
        requested: String,
    },
    /// The produced object is not a valid patch.
    #[error("the compiled object is not a valid patch: {0}")]
    Object(#[from] crate::patchobj::ObjectError),
}

/// What to compile and how.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The patch source (one C file = one patch).
    pub source: PathBuf,
    /// Output object path.
    pub output: PathBuf,
    /// Target guest release (`uname -r`); recorded as `.hvpatch.kernel` if the source has no
    /// `HVPATCH_KERNEL`, and checked against it if it has.
    pub kernel_release: Option<String>,
    /// C compiler (default `gcc`).
    pub cc: String,
    /// Extra include directories.
    pub include_dirs: Vec<PathBuf>,
    /// Extra compiler flags (appended last).
    pub extra_cflags: Vec<String>,
}

impl BuildOptions {
    /// Options with the defaults (`gcc`, no release, no extra includes).
    pub fn new(source: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            output: output.into(),
            kernel_release: None,
            cc: "gcc".into(),
            include_dirs: Vec::new(),
            extra_cflags: Vec::new(),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

fn run(cmd: &mut Command) -> Result<(), BuildError> {
    let tool = format!("{cmd:?}");
    let out = cmd.output().map_err(io(format!("running {tool}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BuildError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Writes the embedded `hvpatch.h` into a fresh directory and returns that directory.
fn header_dir() -> Result<PathBuf, BuildError> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hvpatch-include-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join("hvpatch.h");
    std::fs::write(&path, HEADER).map_err(io(format!("writing {}", path.display())))?;
    Ok(dir)
}

/// The full compiler command line for `opts` (for display and for [`compile`]).
pub fn command_line(opts: &BuildOptions, header_dir: &Path) -> Vec<String> {
    let mut v = vec![opts.cc.clone()];
    v.extend(KERNEL_CFLAGS.iter().map(|s| s.to_string()));
    v.push(format!("-I{}", header_dir.display()));
    for d in &opts.include_dirs {
        v.push(format!("-I{}", d.display()));
    }
    v.extend(opts.extra_cflags.iter().cloned());
    v.push("-o".into());
    v.push(opts.output.display().to_string());
    v.push(opts.source.display().to_string());
    v
}

/// Compiles `opts.source` into `opts.output` and validates the result as a patch object.
/// Returns the parsed patch's name.
pub fn compile(opts: &BuildOptions) -> Result<String, BuildError> {
    let hdir = header_dir()?;
    let r = compile_in(opts, &hdir);
    let _ = std::fs::remove_dir_all(&hdir);
    r
}

fn compile_in(opts: &BuildOptions, hdir: &Path) -> Result<String, BuildError> {
    let hdir = hdir.to_path_buf();
    let argv = command_line(opts, &hdir);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    run(&mut cmd)?;
    let bytes =
        std::fs::read(&opts.output).map_err(io(format!("reading {}", opts.output.display())))?;
    let file_name = opts
        .output
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let obj = crate::patchobj::PatchObject::parse(&bytes, &file_name)?;
    if let Some(req) = &opts.kernel_release {
        match &obj.kernel_release {
            Some(decl) if decl != req => {
                return Err(BuildError::ReleaseMismatch {
                    declared: decl.clone(),
                    requested: req.clone(),
                })
            }
            Some(_) => {}
            None => {
                let f = hdir.join("release");
                std::fs::write(&f, req.as_bytes()).map_err(io("writing release section"))?;
                let mut oc = Command::new("objcopy");
                oc.arg(format!("--add-section=.hvpatch.kernel={}", f.display()))
                    .arg("--set-section-flags=.hvpatch.kernel=readonly,data")
                    .arg(&opts.output);
                run(&mut oc)?;
                let bytes = std::fs::read(&opts.output)
                    .map_err(io(format!("reading {}", opts.output.display())))?;
                crate::patchobj::PatchObject::parse(&bytes, &file_name)?;
            }
        }
    }
    Ok(obj.name)
}
