//! Resolving and downloading Debian cloud kernel packages with apt.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::debver;
use crate::error::ImagesError;
use crate::fsutil::run;
use crate::series::KernelSeries;

/// The `apt-cache search` pattern for the unsigned cloud kernels.
const SEARCH_PATTERN: &str = "linux-image-.*-cloud-amd64-unsigned";
/// Package-name prefix and suffix around the ABI string.
const PREFIX: &str = "linux-image-";
/// See [`PREFIX`].
const SUFFIX: &str = "-cloud-amd64-unsigned";
/// apt lists older than this are refreshed before resolving.
const MAX_LIST_AGE: Duration = Duration::from_secs(24 * 3600);

/// A resolved kernel package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64-unsigned`.
    pub name: String,
    /// Package version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
}

impl KernelPackage {
    /// The file name `apt-get download` gives the package (`:` of an epoch becomes `%3a`).
    pub fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_amd64.deb",
            self.name,
            self.version.replace(':', "%3a")
        )
    }
}

/// apt's list directory.
const LISTS: &str = "/var/lib/apt/lists";
/// Our record of the last successful `apt-get update` (apt keeps server mtimes on lists).
const UPDATE_STAMP: &str = "/var/lib/apt/periodic/hvpatch-update-stamp";

/// Runs `apt-get update`.
pub fn update() -> Result<(), ImagesError> {
    eprintln!("hvpatch-images: apt-get update");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let stamp = Path::new(UPDATE_STAMP);
    if let Some(dir) = stamp.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let _ = fs::write(stamp, b"");
    Ok(())
}

/// Time since the apt lists were last refreshed (None if there are no lists).
fn lists_age() -> Option<Duration> {
    let lists = fs::read_dir(LISTS)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.contains("Packages") || name.ends_with("Release")
        });
    let mut have_lists = false;
    let mut newest = None;
    for e in lists {
        have_lists = true;
        newest = newest.max(e.metadata().ok().and_then(|m| m.modified().ok()));
    }
    if !have_lists {
        return None;
    }
    newest = newest.max(fs::metadata(UPDATE_STAMP).and_then(|m| m.modified()).ok());
    SystemTime::now().duration_since(newest?).ok()
}

/// `(package, version)` of every package matching the cloud kernel pattern, from one
/// `apt-cache search --full` (apt-cache calls cost ~1 s each without a pkgcache).
fn search() -> Result<Vec<(String, String)>, ImagesError> {
    let out =
        run(Command::new("apt-cache").args(["search", "--full", "--names-only", SEARCH_PATTERN]))?;
    Ok(parse_records(&String::from_utf8_lossy(&out.stdout)))
}

/// Extracts `(Package, Version)` pairs from apt records separated by blank lines.
fn parse_records(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let (mut name, mut version) = (None, None);
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let (Some(n), Some(v)) = (name.take(), version.take()) {
                found.push((n, v));
            }
            name = None;
            version = None;
        } else if let Some(n) = line.strip_prefix("Package:") {
            name = Some(n.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Version:") {
            version = Some(v.trim().to_string());
        }
    }
    found
}

/// Picks the package with the highest ABI for `series` from `names`; returns (name, ABI).
pub fn pick_newest(names: &[String], series: KernelSeries) -> Option<(String, String)> {
    names
        .iter()
        .filter_map(|n| {
            let abi = n.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
            series
                .matches_abi(abi)
                .then(|| (n.clone(), abi.to_string()))
        })
        .max_by(|a, b| debver::compare_abi(&a.1, &b.1))
}

/// The highest version apt lists for package `name`.
fn newest_version(records: &[(String, String)], name: &str) -> Option<String> {
    records
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .max_by(|a, b| debver::compare(a, b))
        .cloned()
}

/// Resolves the newest package of every series, running `apt-get update` first when the lists
/// are missing or more than a day old, or when a series has no package.
pub fn resolve_all() -> Result<Vec<(KernelSeries, KernelPackage)>, ImagesError> {
    let stale = match lists_age() {
        Some(age) => age > MAX_LIST_AGE,
        None => true,
    };
    let mut updated = false;
    if stale {
        // Best effort: offline hosts can still resolve from old lists.
        match update() {
            Ok(()) => updated = true,
            Err(e) => eprintln!("hvpatch-images: warning: {e}"),
        }
    }
    let mut records = search()?;
    let missing = |records: &[(String, String)]| {
        let names: Vec<String> = records.iter().map(|(n, _)| n.clone()).collect();
        KernelSeries::all()
            .into_iter()
            .any(|s| pick_newest(&names, s).is_none())
    };
    if missing(&records) && !updated {
        update()?;
        records = search()?;
    }
    let names: Vec<String> = records.iter().map(|(n, _)| n.clone()).collect();
    KernelSeries::all()
        .into_iter()
        .map(|series| {
            let (name, abi) =
                pick_newest(&names, series).ok_or(ImagesError::NoKernelPackage(series))?;
            let version = newest_version(&records, &name).ok_or_else(|| ImagesError::Command {
                command: format!("apt-cache search --full {SEARCH_PATTERN}"),
                detail: format!("no Version field for {name}"),
            })?;
            Ok((
                series,
                KernelPackage {
                    name,
                    version,
                    release: format!("{abi}-cloud-amd64"),
                },
            ))
        })
        .collect()
}

/// Downloads `pkg` into `debs` unless it is already there; returns the .deb path.
pub fn download(pkg: &KernelPackage, debs: &Path) -> Result<PathBuf, ImagesError> {
    let dest = debs.join(pkg.deb_file_name());
    if dest.is_file() {
        return Ok(dest);
    }
    // Download into a private directory, then rename: a partial file never has the final name.
    let tmp = debs.join(format!(".download.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| ImagesError::io("creating", &tmp, e))?;
    eprintln!("hvpatch-images: downloading {}={}", pkg.name, pkg.version);
    let result = run(Command::new("apt-get")
        .args(["download", "-q", &format!("{}={}", pkg.name, pkg.version)])
        .current_dir(&tmp))
    .and_then(|_| {
        let got = tmp.join(pkg.deb_file_name());
        fs::rename(&got, &dest).map_err(|e| ImagesError::io("moving", got, e))
    });
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| dest)
}

/// Extracts `boot/vmlinuz-<release>` and `boot/config-<release>` of a kernel package into
/// `out`; returns (vmlinuz, config) paths.
pub fn extract_boot(
    deb: &Path,
    release: &str,
    out: &Path,
) -> Result<(PathBuf, PathBuf), ImagesError> {
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).map_err(|e| ImagesError::io("creating", out, e))?;
    let script = "dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards './boot/*'";
    run(Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(deb)
        .arg(out))?;
    let vmlinuz = out.join(format!("boot/vmlinuz-{release}"));
    let config = out.join(format!("boot/config-{release}"));
    for p in [&vmlinuz, &config] {
        if !p.is_file() {
            return Err(ImagesError::BadPackage {
                deb: deb.to_path_buf(),
                why: format!("no {}", p.strip_prefix(out).unwrap_or(p).display()),
            });
        }
    }
    Ok((vmlinuz, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_per_series_by_version_order() {
        let names: Vec<String> = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-100-cloud-amd64-unsigned",
            "linux-image-6.1.0-100-cloud-amd64-dbg",
            "linux-image-6.12.9+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.38+deb12-cloud-amd64-unsigned",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            pick_newest(&names, KernelSeries::V6_1).unwrap().1,
            "6.1.0-100"
        );
        assert_eq!(
            pick_newest(&names, KernelSeries::V6_12).unwrap(),
            (
                "linux-image-6.12.117+deb12-cloud-amd64-unsigned".to_string(),
                "6.12.117+deb12".to_string()
            )
        );
        assert_eq!(pick_newest(&names[..1], KernelSeries::V6_12), None);
    }

    #[test]
    fn records_are_parsed_and_newest_version_wins() {
        let text = "Package: a\nVersion: 1.0-2\nDescription: x\n\nPackage: a\nVersion: 1.0-10\n\nPackage: b\nArchitecture: amd64\nVersion: 2\n";
        let r = parse_records(text);
        assert_eq!(r.len(), 3);
        assert_eq!(newest_version(&r, "a").as_deref(), Some("1.0-10"));
        assert_eq!(newest_version(&r, "b").as_deref(), Some("2"));
        assert_eq!(newest_version(&r, "c"), None);
    }

    #[test]
    fn deb_file_name_escapes_epoch() {
        let p = KernelPackage {
            name: "x".into(),
            version: "1:2-3".into(),
            release: String::new(),
        };
        assert_eq!(p.deb_file_name(), "x_1%3a2-3_amd64.deb");
    }
}
