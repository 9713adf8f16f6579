//! Where the guest kernels and the initramfs are: `guest_images::existing()` (the image cache,
//! `~/.cache/hvpatch` or `$HVPATCH_IMAGES`; no network, no builds).

use std::path::PathBuf;

use crate::HarnessError;

/// Guest kernel series the tests run (the harness's own copy of
/// `guest_images::KernelSeries`, with harness helpers; convert with `into()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSeries {
    /// Debian 12 cloud kernel 6.1 (booted with `-cpu max,la57=off`: 4-level paging).
    V6_1,
    /// Debian 12 backports cloud kernel 6.12 (booted with `-cpu max`: 5-level paging).
    V6_12,
}

impl KernelSeries {
    /// Both series.
    pub const ALL: [KernelSeries; 2] = [KernelSeries::V6_1, KernelSeries::V6_12];

    /// Cache directory name and display form (`6.1`, `6.12`).
    pub fn dir_name(self) -> &'static str {
        guest_images::KernelSeries::from(self).as_str()
    }

    /// QEMU `-cpu` model for this series under TCG.
    pub fn qemu_cpu(self) -> &'static str {
        guest_images::KernelSeries::from(self).qemu_cpu()
    }

    /// Whether the harness boots this series with 5-level paging.
    pub fn la57(self) -> bool {
        !self.qemu_cpu().contains("la57=off")
    }
}

impl From<KernelSeries> for guest_images::KernelSeries {
    fn from(s: KernelSeries) -> Self {
        match s {
            KernelSeries::V6_1 => guest_images::KernelSeries::V6_1,
            KernelSeries::V6_12 => guest_images::KernelSeries::V6_12,
        }
    }
}

impl From<guest_images::KernelSeries> for KernelSeries {
    fn from(s: guest_images::KernelSeries) -> Self {
        match s {
            guest_images::KernelSeries::V6_1 => KernelSeries::V6_1,
            guest_images::KernelSeries::V6_12 => KernelSeries::V6_12,
        }
    }
}

impl std::fmt::Display for KernelSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
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
    /// The uncompressed ELF vmlinux.
    pub vmlinux: Option<PathBuf>,
    /// The test initramfs.
    pub initramfs: PathBuf,
}

/// Finds the boot files of `series` in the image cache.
pub fn find_kernel(series: KernelSeries) -> Result<KernelFiles, HarnessError> {
    // The error message says to run `cargo run -p hvpatch-guest-images -- fetch`.
    let images = guest_images::existing().map_err(HarnessError::Images)?;
    let k = images
        .kernel(series.into())
        .ok_or_else(|| HarnessError::ImageMissing {
            what: format!("kernel {series}"),
            path: images.cache.join("kernels").join(series.dir_name()),
        })?;
    Ok(KernelFiles {
        series,
        release: k.release.clone(),
        bzimage: k.bzimage.clone(),
        vmlinux: Some(k.vmlinux.clone()),
        initramfs: images.initramfs.clone(),
    })
}
