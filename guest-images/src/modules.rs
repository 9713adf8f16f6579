//! Stock kernel modules of a cached kernel package, for test guests.
//!
//! The modules come from the same Debian `linux-image-*` package as the kernel
//! (`debs/*.deb`, kept by `fetch`), under `/lib/modules/<release>/kernel/`. 6.1 ships plain
//! `.ko` files, 6.12 `.ko.xz`; both are returned decompressed (busybox `insmod` takes plain
//! ELF), with their dependencies from each module's `.modinfo` `depends=`, in load order.
//! Extracted modules are cached in `kernels/<series>/modules/<release>/`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::apt::KernelPackage;
use crate::error::ImagesError;
use crate::fsutil::{read, run, write_atomic};
use crate::kernels;
use crate::series::KernelSeries;

/// Most modules one request may pull in (dependencies included).
const MAX_MODULES: usize = 64;
/// Largest decompressed module accepted.
const MAX_KO: u64 = 64 << 20;

/// One kernel module, decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelModule {
    /// Module name (`isofs`; `-` in file names becomes `_` as the kernel does).
    pub name: String,
    /// Path in the package, e.g. `lib/modules/<release>/kernel/fs/isofs/isofs.ko.xz`.
    pub path: String,
    /// The ELF relocatable object.
    pub bytes: Vec<u8>,
    /// Modules it needs (`.modinfo` `depends=`).
    pub depends: Vec<String>,
}

/// The kernel's module name of a file name (`crc-itu-t.ko.xz` → `crc_itu_t`).
fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko.xz")
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko"))?;
    Some(stem.replace('-', "_"))
}

/// The `.modinfo` strings of an ELF64 relocatable object (`key=value`).
pub fn modinfo(elf: &[u8]) -> Option<Vec<String>> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let sh = |i: usize| -> Option<(u32, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(at)?,
            usize::try_from(u64_at(at + 0x18)?).ok()?,
            usize::try_from(u64_at(at + 0x20)?).ok()?,
        ))
    };
    let (_, stroff, strsize) = sh(shstrndx)?;
    let names = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (n, off, size) = sh(i)?;
        let name = names.get(n as usize..)?;
        let name = &name[..memchr::memchr(0, name)?];
        if name == b".modinfo" {
            let data = elf.get(off..off.checked_add(size)?)?;
            return Some(
                data.split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            );
        }
    }
    None
}

/// Decompresses a `.ko.xz` (or passes a `.ko` through).
fn decompress(path: &str, data: Vec<u8>) -> Result<Vec<u8>, String> {
    if !path.ends_with(".xz") {
        return Ok(data);
    }
    let mut out = Vec::new();
    lzma_rust2::XzReader::new(&data[..], false)
        .take(MAX_KO)
        .read_to_end(&mut out)
        .map_err(|e| format!("xz: {e}"))?;
    Ok(out)
}

/// The modules `names` of the cached kernel of `series` and everything they depend on, in
/// load order (dependencies first). Needs the kernel's `.deb` in `debs/` (kept by `fetch`),
/// `dpkg-deb` and `tar`.
pub fn kernel_modules(
    cache: &Path,
    series: KernelSeries,
    names: &[&str],
) -> Result<Vec<KernelModule>, ImagesError> {
    let stamp = kernels::validate(cache, series)?;
    let pkg = KernelPackage {
        name: stamp.package.clone(),
        version: stamp.version.clone(),
        release: stamp.release.clone(),
    };
    let deb = cache.join("debs").join(pkg.deb_file_name());
    if !deb.is_file() {
        return Err(ImagesError::missing(
            &deb,
            "the kernel package, which holds the stock modules",
        ));
    }
    // Keyed by release: a newer package of the series gets a directory of its own.
    let dir = kernels::dir(cache, series)
        .join("modules")
        .join(&stamp.release);
    fs::create_dir_all(&dir).map_err(|e| ImagesError::io("creating", &dir, e))?;
    let index = package_index(&deb, &dir, &stamp.release)?;
    prefetch(&index, &deb, &dir, names)?;
    let mut done: Vec<KernelModule> = Vec::new();
    let mut visiting: Vec<String> = Vec::new();
    for n in names {
        add(n, &index, &deb, &dir, &mut done, &mut visiting)?;
    }
    Ok(done)
}

/// Module name → path in the package (cached in `modules/index` after the first listing).
fn package_index(
    deb: &Path,
    dir: &Path,
    release: &str,
) -> Result<BTreeMap<String, String>, ImagesError> {
    let file = dir.join("index");
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(_) => {
            let out = run(Command::new("sh")
                .args(["-c", "dpkg-deb --fsys-tarfile \"$1\" | tar -t", "sh"])
                .arg(deb))?;
            let listing = String::from_utf8_lossy(&out.stdout).into_owned();
            let prefix = format!("./lib/modules/{release}/kernel/");
            let mut t = String::new();
            for l in listing.lines() {
                let l = l.trim();
                if !l.starts_with(&prefix) {
                    continue;
                }
                let Some(f) = l.rsplit('/').next() else {
                    continue;
                };
                if let Some(n) = module_name(f) {
                    t.push_str(&format!("{n} {}\n", l.trim_start_matches("./")));
                }
            }
            write_atomic(&file, t.as_bytes(), 0o644)?;
            t
        }
    };
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .collect())
}

/// Extracts the modules `names` that are not cached yet with one pass over the package,
/// decompressed, into `dir/<name>.ko`.
fn extract(
    index: &BTreeMap<String, String>,
    deb: &Path,
    dir: &Path,
    names: &[String],
) -> Result<(), ImagesError> {
    let bad = |why: String| ImagesError::BadPackage {
        deb: deb.to_path_buf(),
        why,
    };
    let mut paths = Vec::new();
    for n in names {
        if dir.join(format!("{n}.ko")).is_file() {
            continue;
        }
        let p = index
            .get(n)
            .ok_or_else(|| bad(format!("no module {n} in the package")))?;
        paths.push((n.clone(), p.clone()));
    }
    if paths.is_empty() {
        return Ok(());
    }
    let tmp = dir.join(format!(
        ".x.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| ImagesError::io("creating", &tmp, e))?;
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "deb=$1; out=$2; shift 2; dpkg-deb --fsys-tarfile \"$deb\" | tar -x -C \"$out\" \"$@\"",
        "sh",
    ])
    .arg(deb)
    .arg(&tmp);
    for (_, p) in &paths {
        cmd.arg(format!("./{p}"));
    }
    let result = run(&mut cmd).and_then(|_| {
        for (n, p) in &paths {
            let raw = decompress(p, read(&tmp.join(p))?).map_err(|e| bad(format!("{p}: {e}")))?;
            write_atomic(&dir.join(format!("{n}.ko")), &raw, 0o644)?;
        }
        Ok(())
    });
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// The `depends=` of a module file.
fn depends_of(bytes: &[u8]) -> Option<Vec<String>> {
    let info = modinfo(bytes)?;
    Some(
        info.iter()
            .find_map(|s| s.strip_prefix("depends="))
            .map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_"))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Extracts `names` and everything they depend on, one package pass per level of
/// dependencies.
fn prefetch(
    index: &BTreeMap<String, String>,
    deb: &Path,
    dir: &Path,
    names: &[&str],
) -> Result<(), ImagesError> {
    let mut seen: Vec<String> = Vec::new();
    let mut level: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
    while !level.is_empty() && seen.len() < MAX_MODULES {
        extract(index, deb, dir, &level)?;
        seen.extend(level.iter().cloned());
        let mut next = Vec::new();
        for n in &level {
            let Ok(bytes) = read(&dir.join(format!("{n}.ko"))) else {
                continue;
            };
            for d in depends_of(&bytes).unwrap_or_default() {
                if !seen.contains(&d) && !next.contains(&d) {
                    next.push(d);
                }
            }
        }
        level = next;
    }
    Ok(())
}

/// Adds `name` after its dependencies (depth-first, loop-checked).
fn add(
    name: &str,
    index: &BTreeMap<String, String>,
    deb: &Path,
    dir: &Path,
    done: &mut Vec<KernelModule>,
    visiting: &mut Vec<String>,
) -> Result<(), ImagesError> {
    let name = name.replace('-', "_");
    if done.iter().any(|m| m.name == name) {
        return Ok(());
    }
    let bad = |why: String| ImagesError::BadPackage {
        deb: deb.to_path_buf(),
        why,
    };
    if visiting.contains(&name) || done.len() + visiting.len() >= MAX_MODULES {
        return Err(bad(format!(
            "module dependencies loop or exceed {MAX_MODULES} at {name}"
        )));
    }
    let path = index
        .get(&name)
        .ok_or_else(|| bad(format!("no module {name} in the package")))?
        .clone();
    let ko = dir.join(format!("{name}.ko"));
    if !ko.is_file() {
        extract(index, deb, dir, std::slice::from_ref(&name))?;
    }
    let bytes = read(&ko)?;
    let depends = depends_of(&bytes).ok_or_else(|| bad(format!("{path}: no .modinfo section")))?;
    visiting.push(name.clone());
    for d in &depends {
        add(d, index, deb, dir, done, visiting)?;
    }
    visiting.retain(|v| *v != name);
    done.push(KernelModule {
        name,
        path,
        bytes,
        depends,
    });
    Ok(())
}

/// [`kernel_modules`] in the default cache.
pub fn existing_modules(
    series: KernelSeries,
    names: &[&str],
) -> Result<Vec<KernelModule>, ImagesError> {
    kernel_modules(&crate::cache_dir(), series, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_like_the_kernel() {
        assert_eq!(module_name("crc-itu-t.ko.xz").as_deref(), Some("crc_itu_t"));
        assert_eq!(module_name("isofs.ko").as_deref(), Some("isofs"));
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn modinfo_of_garbage_is_none() {
        assert_eq!(modinfo(b"not an elf"), None);
        assert_eq!(modinfo(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"), None);
    }
}
