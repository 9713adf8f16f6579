//! File and process helpers: atomic writes, hashing, running host tools.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

use crate::error::ImagesError;

/// Writes `data` to `path` atomically: a temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ImagesError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| ImagesError::io("creating", dir, e))?;
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(ImagesError::io("writing", path, e));
    }
    Ok(())
}

/// A unique temporary path next to `path`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "tmp".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Reads a whole file.
pub fn read(path: &Path) -> Result<Vec<u8>, ImagesError> {
    fs::read(path).map_err(|e| ImagesError::io("reading", path, e))
}

/// Reads a file if it exists.
pub fn read_opt(path: &Path) -> Option<Vec<u8>> {
    fs::read(path).ok()
}

/// Lower-case hex SHA-256 of a sequence of byte slices (each length-prefixed).
pub fn sha256_hex<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Renders a command line for messages.
fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; errors with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output, ImagesError> {
    let command = render(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImagesError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(ImagesError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ),
        });
    }
    Ok(out)
}

/// Whether an executable is on `PATH` (or is an existing absolute path).
pub fn have_tool(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Makes sure `tool` exists (an executable name or absolute path), installing `package` with
/// `apt-get install -y` if not.
pub fn ensure_tool(tool: &str, package: &str) -> Result<(), ImagesError> {
    if have_tool(tool) {
        return Ok(());
    }
    eprintln!("hvpatch-images: `{tool}` not found; installing Debian package {package}");
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let result = install().or_else(|_| {
        // Stale lists are the usual cause; refresh once and retry.
        crate::apt::update()?;
        install()
    });
    match result {
        Ok(_) if have_tool(tool) => Ok(()),
        Ok(_) => Err(ImagesError::Install {
            tool: tool.into(),
            package: package.into(),
            detail: "the package installed but the tool is still missing".into(),
        }),
        Err(e) => Err(ImagesError::Install {
            tool: tool.into(),
            package: package.into(),
            detail: e.to_string(),
        }),
    }
}
