//! A minimal cpio "newc" (SVR4, `070701`) writer and parser, as the kernel's initramfs unpacker
//! reads it (Documentation/driver-api/early-userspace/buffer-format.rst).

/// Magic of a newc header.
const MAGIC: &[u8; 6] = b"070701";
/// Length of a newc header.
const HEADER_LEN: usize = 110;
/// Name of the end-of-archive entry.
pub const TRAILER: &str = "TRAILER!!!";
/// File type bits.
const S_IFMT: u32 = 0o170000;
/// Directory.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Maximum entries the parser accepts.
const MAX_ENTRIES: usize = 100_000;

/// Errors of the cpio writer and parser.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    /// A name is empty, absolute, has a NUL or a `..` component.
    #[error("invalid entry name {0:?}")]
    BadName(String),
    /// A field does not fit into the 32-bit header field.
    #[error("entry {0:?} is too large for cpio newc")]
    TooLarge(String),
    /// The same path was added twice.
    #[error("duplicate entry {0:?}")]
    Duplicate(String),
    /// The archive ends inside an entry.
    #[error("truncated archive at offset {0:#x}")]
    Truncated(usize),
    /// A header is malformed.
    #[error("bad header at offset {offset:#x}: {why}")]
    BadHeader {
        /// The header's offset.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// No trailer entry.
    #[error("archive has no {TRAILER} entry")]
    NoTrailer,
    /// Too many entries.
    #[error("archive has more than {MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading slash (e.g. `bin/busybox`).
    pub name: String,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// Device number (major, minor) of a device node, else (0, 0).
    pub rdev: (u32, u32),
    /// File contents, or the target of a symlink.
    pub data: Vec<u8>,
}

impl Entry {
    /// The file type bits of `mode`.
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
}

/// Builds a newc archive in memory. Entries are written in insertion order; timestamps and
/// owners are zero so the output is reproducible.
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    names: std::collections::BTreeSet<String>,
    next_ino: u32,
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            names: Default::default(),
            next_ino: 1,
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// Adds a symbolic link `name -> target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer's name is fixed and valid; header fields are all small.
        self.write_header(0, 0, 0, (0, 0), TRAILER);
        self.out
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<&mut Self, CpioError> {
        let valid = !name.is_empty()
            && !name.starts_with('/')
            && !name.contains('\0')
            && name != TRAILER
            && name.split('/').all(|c| !c.is_empty() && c != "..");
        if !valid {
            return Err(CpioError::BadName(name.to_string()));
        }
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        if !self.names.insert(name.to_string()) {
            return Err(CpioError::Duplicate(name.to_string()));
        }
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.write_header(ino, mode, size, rdev, name);
        self.out.extend_from_slice(data);
        self.pad();
        Ok(self)
    }

    fn write_header(&mut self, ino: u32, mode: u32, size: u32, rdev: (u32, u32), name: &str) {
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.out.extend_from_slice(MAGIC);
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

/// Rounds up to a multiple of 4.
fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|v| v & !3)
}

/// Parses a newc archive up to its trailer.
pub fn parse(archive: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    loop {
        if entries.len() > MAX_ENTRIES {
            return Err(CpioError::TooManyEntries);
        }
        let header = off
            .checked_add(HEADER_LEN)
            .and_then(|end| archive.get(off..end))
            .ok_or(if off >= archive.len() {
                CpioError::NoTrailer
            } else {
                CpioError::Truncated(off)
            })?;
        if &header[..6] != MAGIC {
            return Err(CpioError::BadHeader {
                offset: off,
                why: "bad magic",
            });
        }
        let field = |i: usize| -> Result<u32, CpioError> {
            let s = header
                .get(6 + i * 8..14 + i * 8)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or(CpioError::BadHeader {
                    offset: off,
                    why: "non-ASCII field",
                })?;
            u32::from_str_radix(s, 16).map_err(|_| CpioError::BadHeader {
                offset: off,
                why: "non-hex field",
            })
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        if namesize == 0 {
            return Err(CpioError::BadHeader {
                offset: off,
                why: "empty name",
            });
        }
        let name_start = off + HEADER_LEN;
        let name_bytes = name_start
            .checked_add(namesize)
            .and_then(|end| archive.get(name_start..end))
            .ok_or(CpioError::Truncated(name_start))?;
        let (last, name_bytes) = name_bytes
            .split_last()
            .ok_or(CpioError::Truncated(name_start))?;
        if *last != 0 {
            return Err(CpioError::BadHeader {
                offset: off,
                why: "name not NUL-terminated",
            });
        }
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let data_start = align4(name_start + namesize).ok_or(CpioError::Truncated(off))?;
        if name == TRAILER {
            return Ok(entries);
        }
        let data = data_start
            .checked_add(size)
            .and_then(|end| archive.get(data_start..end))
            .ok_or(CpioError::Truncated(data_start))?;
        entries.push(Entry {
            name,
            mode,
            rdev,
            data: data.to_vec(),
        });
        off = align4(data_start + size).ok_or(CpioError::Truncated(data_start))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new();
        w.dir("bin", 0o755).unwrap();
        w.file("bin/a", 0o755, b"hello").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let archive = w.finish();
        assert_eq!(archive.len() % 4, 0);
        let entries = parse(&archive).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/a", "init", "bin/sh", "console", "empty"]
        );
        assert_eq!(entries[0].file_type(), S_IFDIR);
        assert_eq!(entries[1].data, b"hello");
        assert_eq!(entries[1].mode, S_IFREG | 0o755);
        assert_eq!(entries[3].file_type(), S_IFLNK);
        assert_eq!(entries[3].data, b"busybox");
        assert_eq!(entries[4].rdev, (5, 1));
        assert_eq!(entries[4].file_type(), S_IFCHR);
    }

    #[test]
    fn system_cpio_reads_our_archive() {
        let mut w = CpioWriter::new();
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o644, b"abc").unwrap();
        w.symlink("d/l", "f").unwrap();
        let archive = w.finish();
        let mut child = std::process::Command::new("cpio")
            .arg("-t")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cpio(1) is needed for this test: apt-get install -y cpio");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "d\nd/f\nd/l\n");
    }

    #[test]
    fn bad_names_and_duplicates_are_rejected() {
        let mut w = CpioWriter::new();
        for bad in ["", "/abs", "a/../b", "a//b", TRAILER, "nul\0"] {
            assert!(
                matches!(w.file(bad, 0o644, b""), Err(CpioError::BadName(_))),
                "{bad:?}"
            );
        }
        w.file("x", 0o644, b"").unwrap();
        assert!(matches!(
            w.file("x", 0o644, b""),
            Err(CpioError::Duplicate(_))
        ));
    }

    #[test]
    fn malformed_archives_give_errors() {
        let mut w = CpioWriter::new();
        w.file("f", 0o644, b"0123456789").unwrap();
        let archive = w.finish();
        // Every cut before the end of the trailer's name is an error (its padding is optional).
        for cut in 0..archive.len() - 3 {
            assert!(parse(&archive[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse(&archive[..archive.len() - 3]).is_ok());
        let mut bad = archive.clone();
        bad[0] = b'x';
        assert!(parse(&bad).is_err());
        let mut bad = archive.clone();
        bad[6 + 6 * 8] = b'z'; // filesize field
        assert!(parse(&bad).is_err());
        let mut bad = archive;
        bad[6 + 6 * 8..6 + 7 * 8].copy_from_slice(b"ffffffff");
        assert!(parse(&bad).is_err());
    }
}
