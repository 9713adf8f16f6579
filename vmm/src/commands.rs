//! The server and build commands: `hvpatch run`, `hvpatch attach`, `hvpatch build`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use patcher::build::{compile, BuildOptions};
use patcher::GuestControl;

use crate::api::{Server, Session};
use crate::attach::{AttachOptions, QemuAttach};
use crate::cli::{AttachArgs, BuildArgs, CliError, RunArgs};
use crate::kvm::{SerialOut, Vm, VmConfig};

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::Other(e.to_string())
}

/// Serves the API for `control` on a background thread; returns its stop flag and handle.
fn serve_in_background(
    server: Server,
    control: Box<dyn GuestControl>,
    host: &'static str,
    state_file: Option<PathBuf>,
    journal_key: Option<patcher::journal::JournalKey>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = server.stop_flag();
    let handle = std::thread::spawn(move || {
        let mut session = Session::new(control, host);
        if let Some(p) = state_file {
            session.keep_state_in(p, journal_key);
        }
        if let Err(e) = server.serve(&mut session) {
            tracing::error!("API server: {e}");
        }
    });
    (stop, handle)
}

/// `hvpatch run`: boot a guest in the KVM VMM and serve the API until the guest ends.
/// Returns the process exit code (0 when the guest reset or shut down).
pub fn run(args: &RunArgs) -> Result<i32, CliError> {
    let serial = match args.serial.as_str() {
        "stdio" => SerialOut::Stdio,
        "null" => SerialOut::Null,
        path => SerialOut::File(PathBuf::from(path)),
    };
    let cfg = VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        memory: args.memory,
        serial,
        patch_arena: args.patch_arena,
    };
    let mut vm = Vm::create(&cfg).map_err(other)?;
    let server = Server::bind(&args.api_socket).map_err(other)?;
    vm.start().map_err(other)?;
    let (stop, api) = serve_in_background(server, Box::new(vm.control()), "kvm", None, None);
    let result = vm.wait_exit();
    stop.store(true, Ordering::Relaxed);
    let _ = api.join();
    let reason = result.map_err(other)?;
    tracing::info!("guest ended: {reason:?}");
    Ok(reason.exit_code())
}

/// Set by SIGINT/SIGTERM: the attach server stops, detaches and leaves the guest running.
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set [`TERMINATE`].
fn install_terminate_handler() -> Result<(), CliError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_terminate` only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised (zeroed, then the handler set).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_terminate as *const () as usize;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(other(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// `hvpatch attach`: attach to QEMU and serve the API until SIGINT/SIGTERM; then detach,
/// leaving the guest running.
pub fn attach(args: &AttachArgs) -> Result<i32, CliError> {
    install_terminate_handler()?;
    // Claim the API socket first: a second server fails before touching QEMU's gdbstub.
    let server = Server::bind(&args.api_socket).map_err(other)?;
    let journal_key = if args.no_journal {
        None
    } else {
        let path = args
            .journal_key
            .clone()
            .unwrap_or_else(crate::journal_key::default_path);
        Some(crate::journal_key::load_or_create(&path).map_err(|e| {
            CliError::Other(format!(
                "{e} (--journal-key FILE picks another, --no-journal keeps no journal)"
            ))
        })?)
    };
    let opts = AttachOptions {
        mem_layout: args.qemu_mem_layout,
        ..AttachOptions::default()
    };
    // The guard resumes the guest if this process dies without detaching (e.g. SIGKILL while
    // the guest is paused).
    let guard = vmm_guard(&args.qemu_gdb)?;
    let control = QemuAttach::connect_with(&args.qemu_gdb, &args.qemu_mem, opts).map_err(other)?;
    let state = args
        .state_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.state", args.api_socket.display())));
    let (stop, api) = serve_in_background(
        server,
        Box::new(control),
        "qemu-attach",
        Some(state),
        journal_key,
    );
    while !TERMINATE.load(Ordering::Relaxed) && !api.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = api.join();
    // The server thread dropped the backend. If it detached (QEMU said OK), the guard is not
    // needed; otherwise exiting without releasing it lets the guard detach for us.
    if crate::attach::DETACHED.load(Ordering::SeqCst) {
        guard.release();
    } else {
        tracing::warn!("detach not confirmed by QEMU; the guard process detaches instead");
    }
    Ok(0)
}

fn vmm_guard(gdb: &std::path::Path) -> Result<crate::attach::guard::Guard, CliError> {
    crate::attach::guard::Guard::spawn(gdb).map_err(other)
}

/// `hvpatch build`: compile a patch source into a patch object.
pub fn build(args: &BuildArgs) -> Result<i32, CliError> {
    let mut opts = BuildOptions::new(&args.source, &args.output);
    opts.kernel_release = args.kernel_release.clone();
    opts.cc = args.cc.clone();
    opts.include_dirs = args.include.clone();
    let name = compile(&opts).map_err(other)?;
    println!("built patch {name}: {}", args.output.display());
    Ok(0)
}
