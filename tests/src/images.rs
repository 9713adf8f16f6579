//! Where the guest kernels and the initramfs are.
//!
//! Resolves images through `guest_images` (the image cache, `~/.cache/hvpatch` or
//! `$HVPATCH_IMAGES`): `kernels/<series>/{vmlinuz,release}` and `initramfs.cpio.gz`.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// Guest kernel series the tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSeries {
    /// Debian 12 cloud kernel 6.1 (4-level paging; booted with `-cpu max,la57=off`).
    V6_1,
    /// Debian 12 backports cloud kernel 6.12 (5-level paging; booted with `-cpu max`).
    V6_12,
}

impl KernelSeries {
    /// Both series.
    pub const ALL: [KernelSeries; 2] = [KernelSeries::V6_1, KernelSeries::V6_12];

    /// Directory name in the cache (`6.1`, `6.12`).
    pub fn dir_name(self) -> &'static str {
        match self {
            KernelSeries::V6_1 => "6.1",
            KernelSeries::V6_12 => "6.12",
        }
    }

    /// Whether the harness boots this series with 5-level paging.
    pub fn la57(self) -> bool {
        matches!(self, KernelSeries::V6_12)
    }
}

/// Files needed to boot one kernel.
#[derive(Debug, Clone)]
pub struct KernelFiles {
    /// Series.
    pub series: KernelSeries,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The bzImage.
    pub bzimage: PathBuf,
    /// The uncompressed ELF vmlinux, when the cache has it.
    pub vmlinux: Option<PathBuf>,
    /// The test initramfs.
    pub initramfs: PathBuf,
}

fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HVPATCH_IMAGES") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/hvpatch")
}

fn need(path: PathBuf, what: &str) -> Result<PathBuf, HarnessError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::ImageMissing {
            what: what.to_string(),
            path,
        })
    }
}

/// Finds the boot files of `series` in the image cache.
pub fn find_kernel(series: KernelSeries) -> Result<KernelFiles, HarnessError> {
    let cache = cache_dir();
    let kdir = cache.join("kernels").join(series.dir_name());
    let bzimage = need(kdir.join("vmlinuz"), "kernel bzImage")?;
    let release_path = need(kdir.join("release"), "kernel release file")?;
    let release = std::fs::read_to_string(&release_path)
        .map_err(|e| HarnessError::io(format!("reading {}", release_path.display()), e))?
        .trim()
        .to_string();
    let initramfs = need(cache.join("initramfs.cpio.gz"), "test initramfs")?;
    let vmlinux = Some(kdir.join("vmlinux")).filter(|p| p.is_file());
    Ok(KernelFiles {
        series,
        release,
        bzimage,
        vmlinux,
        initramfs,
    })
}
