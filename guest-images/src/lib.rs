//! Guest images for hvpatch's tests and demo.
//!
//! One idempotent entry point, [`ensure`], caches outside git everything the tests boot:
//! the newest Debian bookworm cloud kernels of the 6.1 and 6.12 series (bzImage, decompressed
//! `vmlinux`, config, release), a busybox initramfs and static C test programs. [`existing`]
//! returns the same paths without network access or builds, failing with a how-to message.
//!
//! Cache layout (`$HVPATCH_IMAGES`, default `~/.cache/hvpatch`):
//! ```text
//! kernels/<6.1|6.12>/{vmlinuz,vmlinux,config,release,stamp}
//! initramfs.cpio.gz      .initramfs.key
//! progs/<name>           progs/.<name>.key
//! kernels/<6.1|6.12>/modules/<release>/{index,<name>.ko}   (stock modules, extracted on demand)
//! debs/*.deb
//! ```

#![warn(missing_docs)]

mod apt;
pub mod bzimage;
pub mod cpio;
mod debver;
mod error;
mod fsutil;
pub mod initramfs;
mod kernels;
pub mod modules;
pub mod progs;
mod series;

use std::path::{Path, PathBuf};

pub use bzimage::{decompress_bzimage, BzImageError, Compression};
pub use error::{ImagesError, FETCH_HINT};
pub use initramfs::READY_LINE;
pub use series::{KernelSeries, ParseSeriesError};

/// Environment variable overriding the cache directory.
pub const CACHE_ENV: &str = "HVPATCH_IMAGES";

/// One cached guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    /// Its series.
    pub series: KernelSeries,
    /// `uname -r`, e.g. `6.12.117+deb12-cloud-amd64`.
    pub release: String,
    /// The bzImage to boot (`kernels/<series>/vmlinuz`).
    pub bzimage: PathBuf,
    /// The decompressed ELF kernel (`kernels/<series>/vmlinux`).
    pub vmlinux: PathBuf,
    /// The kernel's build config (`kernels/<series>/config`).
    pub config: PathBuf,
}

/// Everything cached for tests and the demo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// The cache directory.
    pub cache: PathBuf,
    /// The kernels, in [`KernelSeries::all`] order.
    pub kernels: Vec<KernelImage>,
    /// The gzip-compressed newc initramfs.
    pub initramfs: PathBuf,
    /// Directory of the host copies of the guest's test programs (`/bin/<name>` in the guest).
    pub progs: PathBuf,
}

impl Images {
    /// The kernel of `series`.
    pub fn kernel(&self, series: KernelSeries) -> Option<&KernelImage> {
        self.kernels.iter().find(|k| k.series == series)
    }
}

/// The cache directory: `$HVPATCH_IMAGES`, else `~/.cache/hvpatch`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("hvpatch")
}

/// Environment variable that overrides the guest-snapshot root directory.
pub const DUMPS_ENV: &str = "HVPATCH_DUMPS";

/// Root of the guest RAM snapshots the offline tests read (written by the test harness):
/// `$HVPATCH_DUMPS`, else `<cache_dir>/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    match std::env::var_os(DUMPS_ENV).filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => cache_dir().join("snapshots"),
    }
}

/// Paths of the initramfs and the program directory in `cache`.
fn initramfs_paths(cache: &Path) -> (PathBuf, PathBuf) {
    (cache.join("initramfs.cpio.gz"), cache.join("progs"))
}

/// Fetches and builds whatever is missing or stale in [`cache_dir`]; cheap when all is current.
///
/// Resolves the newest `linux-image-*-cloud-amd64-unsigned` of each series with apt (refreshing
/// lists older than a day), downloads it if its version changed, extracts `vmlinuz` and
/// `config`, decompresses `vmlinux`; builds the test programs and the initramfs when a source,
/// the compiler or busybox changed. Missing host tools (gcc, busybox-static, qemu-system-x86,
/// dpkg, tar) are installed with `apt-get install -y`. Safe to call from parallel threads and
/// processes (a lock file serialises builders).
/// If apt cannot resolve packages (offline) but a valid kernel is cached, that kernel is kept.
pub fn ensure() -> Result<Images, ImagesError> {
    ensure_in(&cache_dir())
}

/// [`ensure`] for an explicit cache directory.
pub fn ensure_in(cache: &Path) -> Result<Images, ImagesError> {
    std::fs::create_dir_all(cache).map_err(|e| ImagesError::io("creating", cache, e))?;
    // One builder at a time, across threads and processes (tests call this in parallel).
    static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let lock_path = cache.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| ImagesError::io("creating", &lock_path, e))?;
    lock.lock()
        .map_err(|e| ImagesError::io("locking", &lock_path, e))?;
    // The builder's tools, and QEMU, which the tests and the demo boot these images with.
    for (tool, package) in [
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("tar", "tar"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ] {
        fsutil::ensure_tool(tool, package)?;
    }
    let resolved = apt::resolve_all();
    let mut images = Vec::new();
    for series in KernelSeries::all() {
        let current = kernels::validate(cache, series);
        let stamp = match (&resolved, current) {
            (Ok(pkgs), current) => {
                let pkg = pkgs
                    .iter()
                    .find(|(s, _)| *s == series)
                    .map(|(_, p)| p)
                    .ok_or(ImagesError::NoKernelPackage(series))?;
                match current {
                    Ok(stamp) if stamp.package == pkg.name && stamp.version == pkg.version => stamp,
                    _ => kernels::install(cache, series, pkg)?,
                }
            }
            (Err(e), Ok(stamp)) => {
                eprintln!(
                    "hvpatch-images: warning: cannot resolve the newest {series} kernel ({e}); \
                     keeping cached {}",
                    stamp.release
                );
                stamp
            }
            (Err(e), Err(_)) => {
                return Err(ImagesError::Environment(format!(
                    "cannot resolve the {series} kernel package: {e}"
                )))
            }
        };
        images.push(kernels::image(cache, series, stamp.release));
    }
    let (initramfs, progs) = initramfs_paths(cache);
    progs::ensure(&progs)?;
    initramfs::ensure(&initramfs, &progs)?;
    Ok(Images {
        cache: cache.to_path_buf(),
        kernels: images,
        initramfs,
        progs,
    })
}

/// The cached images, without network access or builds. Fails with a message saying to run
/// `cargo run -p hvpatch-guest-images -- fetch` when anything is missing or stale.
pub fn existing() -> Result<Images, ImagesError> {
    existing_in(&cache_dir())
}

/// The cached kernel of `series` alone, validated like [`existing`] does, without requiring
/// the initramfs and test programs (for tests that only read the kernel image).
pub fn existing_kernel(series: KernelSeries) -> Result<KernelImage, ImagesError> {
    let cache = cache_dir();
    kernels::validate(&cache, series).map(|stamp| kernels::image(&cache, series, stamp.release))
}

/// [`existing`] for an explicit cache directory.
pub fn existing_in(cache: &Path) -> Result<Images, ImagesError> {
    let kernels = KernelSeries::all()
        .into_iter()
        .map(|series| {
            kernels::validate(cache, series)
                .map(|stamp| kernels::image(cache, series, stamp.release))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (initramfs, progs_dir) = initramfs_paths(cache);
    // Stale programs are detectable only with the compiler at hand; missing ones always.
    let gcc = progs::gcc_version().ok();
    for prog in progs::PROGS {
        let path = progs_dir.join(prog.name);
        let ok = match &gcc {
            Some(gcc) => progs::is_current(&progs_dir, prog, gcc),
            None => path.is_file(),
        };
        if !ok {
            return Err(ImagesError::missing(
                path,
                "test program missing or built from an older source",
            ));
        }
    }
    let current =
        initramfs::is_current(&initramfs, &progs_dir).unwrap_or_else(|_| initramfs.is_file());
    if !current {
        return Err(ImagesError::missing(
            &initramfs,
            "initramfs missing or built from older inputs",
        ));
    }
    Ok(Images {
        cache: cache.to_path_buf(),
        kernels,
        initramfs,
        progs: progs_dir,
    })
}
