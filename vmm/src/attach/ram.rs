//! Guest RAM through QEMU's `memory-backend-file` (`share=on`), mapped read-only.
//!
//! QEMU places the RAM block of a `pc`/`q35` machine at guest-physical 0 up to the
//! below-4-GiB limit and the rest at 4 GiB. For guests up to 2.75 GiB both machines keep all
//! RAM below 4 GiB, so guest-physical `0..size` is file offset `0..size` ([`MemLayout::Flat`]).
//! Larger guests need [`MemLayout::Split`] with the machine's low-memory size (`pc`: 3 GiB if
//! RAM >= 3.5 GiB, `q35`: 2 GiB if RAM >= 2.75 GiB).

use std::fs::File;
use std::path::Path;

use introspect::{MemError, PhysMemory};
use memmap2::{Mmap, MmapOptions};

use super::AttachError;

/// Largest guest that [`MemLayout::Flat`] is valid for on both `pc` and `q35`.
pub const FLAT_MAX: u64 = 0xB000_0000;
const FOUR_GIB: u64 = 1 << 32;

/// How the RAM file maps onto guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemLayout {
    /// File offset = guest-physical address (guests up to 2.75 GiB).
    Flat,
    /// The first `low` bytes at guest-physical 0, the rest at 4 GiB.
    Split {
        /// Bytes of RAM below 4 GiB.
        low: u64,
    },
}

/// The mapped RAM file.
pub struct RamFile {
    map: Mmap,
    /// The file opened for writing, when this process may ([`RamFile::write_direct`]).
    writer: Option<File>,
    /// (guest-physical start, file offset, length), sorted by start.
    regions: Vec<(u64, u64, u64)>,
}

impl std::fmt::Debug for RamFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamFile").finish_non_exhaustive()
    }
}

impl RamFile {
    /// Maps `path` read-only. `expected_size` (if known) must equal the file size.
    pub fn open(
        path: &Path,
        layout: MemLayout,
        expected_size: Option<u64>,
    ) -> Result<RamFile, AttachError> {
        let file = File::open(path).map_err(|e| AttachError::MemFile {
            path: path.to_path_buf(),
            source: e,
        })?;
        let size = file
            .metadata()
            .map_err(|e| AttachError::MemFile {
                path: path.to_path_buf(),
                source: e,
            })?
            .len();
        if size == 0 || size % 4096 != 0 {
            return Err(AttachError::MemLayout(format!(
                "RAM file size {size:#x} is not a whole number of pages"
            )));
        }
        if let Some(want) = expected_size {
            if want != size {
                return Err(AttachError::MemLayout(format!(
                    "RAM file is {size:#x} bytes but the guest has {want:#x}"
                )));
            }
        }
        let regions = match layout {
            MemLayout::Flat if size > FLAT_MAX => {
                return Err(AttachError::MemLayout(format!(
                "RAM file is {size:#x} bytes: guests over 2.75 GiB split RAM below/above 4 GiB; \
                     give the low-memory size (--qemu-mem-layout)"
            )))
            }
            MemLayout::Flat => vec![(0, 0, size)],
            MemLayout::Split { low }
                if low == 0 || low > size || low > FOUR_GIB || low % 4096 != 0 =>
            {
                return Err(AttachError::MemLayout(format!(
                    "bad low-memory size {low:#x} for {size:#x} bytes"
                )))
            }
            MemLayout::Split { low } if low == size => vec![(0, 0, size)],
            MemLayout::Split { low } => vec![(0, 0, low), (FOUR_GIB, low, size - low)],
        };
        // SAFETY: a read-only shared mapping of a regular file of `size` bytes. QEMU writes
        // guest RAM concurrently: readers only copy bytes out and treat them as untrusted,
        // possibly torn values (the usual arrangement of mmap-based VMMs). Truncating the file
        // underneath would make accesses past the new end SIGBUS; QEMU never truncates its
        // RAM file while running.
        let map = unsafe { MmapOptions::new().len(size as usize).map(&file) }.map_err(|e| {
            AttachError::MemFile {
                path: path.to_path_buf(),
                source: e,
            }
        })?;
        let writer = std::fs::OpenOptions::new().write(true).open(path).ok();
        Ok(RamFile {
            map,
            writer,
            regions,
        })
    }

    /// Size of the RAM file.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Writes `data` at `pa` straight into the RAM file (QEMU sees it at once through its shared
    /// mapping; it does not know, so this is only for pages no vCPU executes). `Ok(false)`
    /// when the file is not writable by this process or the range is not in one RAM region.
    pub fn write_direct(&self, pa: u64, data: &[u8]) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        match (&self.writer, self.file_offset(pa, data.len() as u64)) {
            (Some(f), Some(off)) => f.write_all_at(data, off as u64).map(|()| true),
            _ => Ok(false),
        }
    }

    /// Whether `pa..pa+len` lies in one RAM region.
    pub fn contains(&self, pa: u64, len: u64) -> bool {
        self.file_offset(pa, len).is_some()
    }

    fn file_offset(&self, pa: u64, len: u64) -> Option<usize> {
        let end = pa.checked_add(len)?;
        self.regions
            .iter()
            .find(|(start, _, rlen)| pa >= *start && end <= start + rlen)
            .and_then(|(start, off, _)| usize::try_from(off + (pa - start)).ok())
    }
}

impl PhysMemory for RamFile {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let err = MemError::OutOfRange {
            pa,
            len: buf.len() as u64,
        };
        let off = self.file_offset(pa, buf.len() as u64).ok_or(err.clone())?;
        let src = self.map.get(off..off + buf.len()).ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|(s, _, l)| (*s, *l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(size: u64) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("hvpatch-ramtest-{}-{size}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn flat_and_split() {
        let p = temp_file(0x10000);
        std::fs::write(&p, {
            let mut v = vec![0u8; 0x10000];
            v[0x9000] = 7;
            v
        })
        .unwrap();
        let r = RamFile::open(&p, MemLayout::Flat, Some(0x10000)).unwrap();
        assert_eq!(r.regions(), vec![(0, 0x10000)]);
        let mut b = [0u8; 1];
        r.read_phys(0x9000, &mut b).unwrap();
        assert_eq!(b[0], 7);
        assert!(r.read_phys(0x10000, &mut b).is_err());
        assert!(r.read_phys(u64::MAX, &mut b).is_err());
        assert!(RamFile::open(&p, MemLayout::Flat, Some(0x20000)).is_err());
        let s = RamFile::open(&p, MemLayout::Split { low: 0x8000 }, None).unwrap();
        assert_eq!(s.regions(), vec![(0, 0x8000), (FOUR_GIB, 0x8000)]);
        s.read_phys(FOUR_GIB + 0x1000, &mut b).unwrap();
        assert_eq!(b[0], 7);
        assert!(s.read_phys(0x9000, &mut b).is_err());
        let mut two = [0u8; 2];
        assert!(
            s.read_phys(0x7fff, &mut two).is_err(),
            "no access across regions"
        );
        assert!(RamFile::open(&p, MemLayout::Split { low: 0x123 }, None).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
