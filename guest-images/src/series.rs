//! The kernel series hvpatch tests against.

use std::fmt;
use std::str::FromStr;

/// A Debian bookworm cloud kernel series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelSeries {
    /// Debian bookworm's own kernel, `linux-image-6.1.0-*-cloud-amd64`.
    V6_1,
    /// bookworm's 6.12 kernel, `linux-image-6.12.*+deb12-cloud-amd64`.
    V6_12,
}

impl KernelSeries {
    /// Every series, oldest first.
    pub fn all() -> [Self; 2] {
        [Self::V6_1, Self::V6_12]
    }

    /// The series as a string: `"6.1"` or `"6.12"` (also its cache directory name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// Whether a kernel ABI string such as `6.1.0-56` or `6.12.117+deb12` belongs to this series.
    pub fn matches_abi(self, abi: &str) -> bool {
        abi.strip_prefix(self.as_str())
            .is_some_and(|rest| rest.starts_with('.'))
    }

    /// The QEMU `-cpu` model these kernels boot with under TCG.
    ///
    /// 6.1 mis-handles 5-level paging under QEMU 7.2 TCG, so LA57 is switched off there.
    pub fn qemu_cpu(self) -> &'static str {
        match self {
            Self::V6_1 => "max,la57=off",
            Self::V6_12 => "max",
        }
    }
}

impl fmt::Display for KernelSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error parsing a [`KernelSeries`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kernel series `{0}` (expected 6.1 or 6.12)")]
pub struct ParseSeriesError(pub String);

impl FromStr for KernelSeries {
    type Err = ParseSeriesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "6.1" | "v6.1" => Ok(Self::V6_1),
            "6.12" | "v6.12" => Ok(Self::V6_12),
            other => Err(ParseSeriesError(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for s in KernelSeries::all() {
            assert_eq!(s.to_string().parse::<KernelSeries>(), Ok(s));
        }
        assert_eq!(KernelSeries::V6_12.to_string(), "6.12");
        assert!("6.2".parse::<KernelSeries>().is_err());
    }

    #[test]
    fn abi_matching_does_not_confuse_6_1_and_6_12() {
        assert!(KernelSeries::V6_1.matches_abi("6.1.0-56"));
        assert!(!KernelSeries::V6_1.matches_abi("6.12.117+deb12"));
        assert!(KernelSeries::V6_12.matches_abi("6.12.117+deb12"));
        assert!(!KernelSeries::V6_12.matches_abi("6.1.0-56"));
        assert!(!KernelSeries::V6_1.matches_abi("6.10.1"));
    }
}
