//! Errors of the image cache.

use std::path::PathBuf;

use crate::bzimage::BzImageError;
use crate::cpio::CpioError;
use crate::series::KernelSeries;

/// How to populate the cache; quoted by every "missing" error.
pub const FETCH_HINT: &str = "run `cargo run -p hvpatch-guest-images -- fetch`";

/// Errors of [`crate::ensure`] and [`crate::existing`].
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// A cached file is missing or invalid and [`crate::existing`] may not build it.
    #[error("guest image {path} is missing or stale ({why}); {FETCH_HINT}")]
    Missing {
        /// The file that is missing.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A host tool could not be started or failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// A host tool is missing and installing its Debian package failed.
    #[error("`{tool}` is missing and `apt-get install -y {package}` failed: {detail}")]
    Install {
        /// The missing executable.
        tool: String,
        /// The Debian package providing it.
        package: String,
        /// Why the install failed.
        detail: String,
    },
    /// apt knows no package for a kernel series.
    #[error(
        "no linux-image-*-cloud-amd64-unsigned package for the {0} series in the apt lists \
         (after `apt-get update`); is a Debian bookworm source configured?"
    )]
    NoKernelPackage(KernelSeries),
    /// The downloaded package does not hold the expected files.
    #[error("package {deb}: {why}")]
    BadPackage {
        /// The .deb file.
        deb: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The bzImage could not be decompressed.
    #[error("decompressing {path}: {source}")]
    BzImage {
        /// The bzImage.
        path: PathBuf,
        /// The decoder error.
        #[source]
        source: BzImageError,
    },
    /// The initramfs archive could not be built.
    #[error("building the initramfs: {0}")]
    Cpio(#[from] CpioError),
    /// The environment is unusable (e.g. no home directory).
    #[error("{0}")]
    Environment(String),
}

impl ImagesError {
    /// Wraps an I/O error with the operation and the path.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// A "missing" error for `path`.
    pub(crate) fn missing(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Self::Missing {
            path: path.into(),
            why: why.into(),
        }
    }
}
