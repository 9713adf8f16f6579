//! The host key that authenticates the journal `hvpatch attach` keeps in guest memory
//! ([`patcher::journal`]): 32 random bytes in a file of mode 0600, made on first use.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use patcher::journal::JournalKey;
use thiserror::Error;

/// Errors reading or making the key file.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The file could not be read, made or linked into place.
    #[error("journal key {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not 32 bytes.
    #[error("journal key {path}: {len} bytes, expected 32 (remove it to make a new key)")]
    Length {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Others may read it.
    #[error("journal key {path}: mode {mode:o} lets others read it; chmod 600 it")]
    Mode {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// The default key file: `$XDG_STATE_HOME/hvpatch/journal.key`, else
/// `~/.local/state/hvpatch/journal.key`.
pub fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    base.join("hvpatch/journal.key")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<JournalKey, KeyError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| KeyError::Length {
        path: path.to_path_buf(),
        len: bytes.len(),
    })?;
    Ok(JournalKey(key))
}

/// Reads the key at `path`, or makes it (random, mode 0600, its directory 0700). Concurrent
/// callers agree on one key: a new key is written to a private file first and then linked into
/// place, which fails if another process was first.
pub fn load_or_create(path: &Path) -> Result<JournalKey, KeyError> {
    if path.exists() {
        return read(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(io(Path::new("/dev/urandom")))?;
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &key));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(JournalKey(key)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_read_back_and_checked() {
        let dir = std::env::temp_dir().join(format!("hvpatch-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/journal.key");
        let a = load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.0, b.0);
        // Concurrent makers agree.
        let other = dir.join("race.key");
        let keys: Vec<[u8; 32]> = (0..8)
            .map(|_| {
                let p = other.clone();
                std::thread::spawn(move || load_or_create(&p).unwrap().0)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        // A readable-by-others or short key is refused, naming the problem.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_or_create(&path), Err(KeyError::Mode { .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(e.to_string().contains("5 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
