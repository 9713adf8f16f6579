//! Per-series kernel cache: `kernels/<series>/{vmlinuz,vmlinux,config,release,stamp}`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::apt::{self, KernelPackage};
use crate::bzimage::{check_x86_64_elf, decompress_bzimage};
use crate::error::ImagesError;
use crate::fsutil::{read, read_opt, sha256_hex, write_atomic};
use crate::series::KernelSeries;
use crate::KernelImage;

/// What a completed kernel directory records (`stamp`, written last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// Debian package name.
    pub package: String,
    /// Debian package version.
    pub version: String,
    /// `uname -r`.
    pub release: String,
    /// SHA-256 of `vmlinuz`.
    pub vmlinuz_sha256: String,
    /// Length of `vmlinux`.
    pub vmlinux_len: u64,
}

impl Stamp {
    fn render(&self) -> String {
        format!(
            "package={}\nversion={}\nrelease={}\nvmlinuz_sha256={}\nvmlinux_len={}\n",
            self.package, self.version, self.release, self.vmlinuz_sha256, self.vmlinux_len
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        Some(Self {
            package: get("package")?,
            version: get("version")?,
            release: get("release")?,
            vmlinuz_sha256: get("vmlinuz_sha256")?,
            vmlinux_len: get("vmlinux_len")?.parse().ok()?,
        })
    }
}

/// The directory of one series.
pub fn dir(cache: &Path, series: KernelSeries) -> PathBuf {
    cache.join("kernels").join(series.as_str())
}

/// The image paths of a series (whether or not they exist).
pub fn image(cache: &Path, series: KernelSeries, release: String) -> KernelImage {
    let d = dir(cache, series);
    KernelImage {
        series,
        release,
        bzimage: d.join("vmlinuz"),
        vmlinux: d.join("vmlinux"),
        config: d.join("config"),
    }
}

/// Checks a series directory without network or rebuilds; returns its stamp.
pub fn validate(cache: &Path, series: KernelSeries) -> Result<Stamp, ImagesError> {
    let d = dir(cache, series);
    let stamp_path = d.join("stamp");
    let stamp = read_opt(&stamp_path)
        .and_then(|t| Stamp::parse(&String::from_utf8_lossy(&t)))
        .ok_or_else(|| ImagesError::missing(&stamp_path, "no complete kernel download recorded"))?;
    let release_path = d.join("release");
    let release = read_opt(&release_path).map(|r| String::from_utf8_lossy(&r).trim().to_string());
    if release.as_deref() != Some(stamp.release.as_str()) {
        return Err(ImagesError::missing(
            release_path,
            "release does not match the stamp",
        ));
    }
    let config = d.join("config");
    if !config.is_file() {
        return Err(ImagesError::missing(config, "no kernel config"));
    }
    let vmlinuz = d.join("vmlinuz");
    let bz = read_opt(&vmlinuz).ok_or_else(|| ImagesError::missing(&vmlinuz, "no bzImage"))?;
    if sha256_hex([bz.as_slice()]) != stamp.vmlinuz_sha256 {
        return Err(ImagesError::missing(
            vmlinuz,
            "bzImage does not match the stamp",
        ));
    }
    let vmlinux = d.join("vmlinux");
    let len = fs::metadata(&vmlinux).map(|m| m.len()).ok();
    let mut head = [0u8; 64];
    let head_ok = fs::File::open(&vmlinux)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok();
    if len != Some(stamp.vmlinux_len) || !head_ok || check_x86_64_elf(&head).is_err() {
        return Err(ImagesError::missing(
            vmlinux,
            "vmlinux missing or not the decompressed bzImage",
        ));
    }
    Ok(stamp)
}

/// Makes the series directory hold `pkg`, downloading and extracting as needed.
pub fn install(
    cache: &Path,
    series: KernelSeries,
    pkg: &KernelPackage,
) -> Result<Stamp, ImagesError> {
    let d = dir(cache, series);
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(|e| ImagesError::io("creating", &debs, e))?;
    let mut deb = apt::download(pkg, &debs)?;
    let work = cache.join(format!(".extract.{series}.{}", std::process::id()));
    let extracted = match apt::extract_boot(&deb, &pkg.release, &work) {
        Ok(x) => x,
        Err(e) => {
            // A corrupt cached .deb: fetch it again once.
            eprintln!("hvpatch-images: {e}; downloading again");
            let _ = fs::remove_file(&deb);
            deb = apt::download(pkg, &debs)?;
            apt::extract_boot(&deb, &pkg.release, &work)?
        }
    };
    let result = install_files(&d, pkg, &extracted.0, &extracted.1);
    let _ = fs::remove_dir_all(&work);
    let stamp = result?;
    // Drop older packages of this series.
    if let Ok(entries) = fs::read_dir(&debs) {
        let keep = deb.file_name().map(|n| n.to_os_string());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix("linux-image-")
                .and_then(|rest| rest.split_once("-cloud-amd64-unsigned_"))
                .is_some_and(|(abi, _)| series.matches_abi(abi));
            if ours && Some(e.file_name()) != keep {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(stamp)
}

/// Decompresses, checks and writes the series files; the stamp goes last.
fn install_files(
    d: &Path,
    pkg: &KernelPackage,
    vmlinuz: &Path,
    config: &Path,
) -> Result<Stamp, ImagesError> {
    let bz = read(vmlinuz)?;
    let vmlinux = decompress_bzimage(&bz).map_err(|source| ImagesError::BzImage {
        path: vmlinuz.to_path_buf(),
        source,
    })?;
    let banner = format!("Linux version {} ", pkg.release);
    if memchr::memmem::find(&vmlinux, banner.as_bytes()).is_none() {
        return Err(ImagesError::BadPackage {
            deb: vmlinuz.to_path_buf(),
            why: format!("vmlinux has no `{banner}` banner"),
        });
    }
    // Drop a stale stamp first so a crash mid-way never looks complete.
    let _ = fs::remove_file(d.join("stamp"));
    write_atomic(&d.join("vmlinuz"), &bz, 0o644)?;
    write_atomic(&d.join("config"), &read(config)?, 0o644)?;
    write_atomic(&d.join("vmlinux"), &vmlinux, 0o644)?;
    write_atomic(
        &d.join("release"),
        format!("{}\n", pkg.release).as_bytes(),
        0o644,
    )?;
    let stamp = Stamp {
        package: pkg.name.clone(),
        version: pkg.version.clone(),
        release: pkg.release.clone(),
        vmlinuz_sha256: sha256_hex([bz.as_slice()]),
        vmlinux_len: vmlinux.len() as u64,
    };
    write_atomic(&d.join("stamp"), stamp.render().as_bytes(), 0o644)?;
    Ok(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            package: "linux-image-6.1.0-56-cloud-amd64-unsigned".into(),
            version: "6.1.192-2".into(),
            release: "6.1.0-56-cloud-amd64".into(),
            vmlinuz_sha256: "ab".into(),
            vmlinux_len: 42,
        };
        assert_eq!(Stamp::parse(&s.render()), Some(s));
        assert_eq!(Stamp::parse("package=x\n"), None);
    }
}
