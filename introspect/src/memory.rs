//! Guest-physical memory access.
//!
//! Everything in this crate reads the guest through [`PhysMemory`]. Guest memory is hostile:
//! every read is bounds-checked and fails with [`MemError`] rather than panicking.

use thiserror::Error;

/// Errors reading guest-physical memory.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MemError {
    /// The range is not (entirely) backed by guest RAM.
    #[error("guest-physical range {pa:#x}+{len:#x} is outside guest RAM")]
    OutOfRange {
        /// First guest-physical address of the access.
        pa: u64,
        /// Length of the access.
        len: u64,
    },
}

/// Read access to guest-physical memory.
pub trait PhysMemory: Send + Sync {
    /// Copies `buf.len()` bytes starting at guest-physical `pa` into `buf`.
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Guest RAM regions as `(guest-physical start, length)`, sorted by start.
    fn regions(&self) -> Vec<(u64, u64)>;

    /// Reads a little-endian `u64`.
    fn read_u64(&self, pa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read_phys(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, pa: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read_phys(pa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// One contiguous guest-physical RAM region backed by a host byte slice.
#[derive(Debug, Clone, Copy)]
pub struct SliceRegion<'a> {
    /// Guest-physical address of `bytes[0]`.
    pub gpa: u64,
    /// The backing bytes.
    pub bytes: &'a [u8],
}

/// Guest memory made of host byte slices (a mapped RAM file, a dump, a test buffer).
#[derive(Debug, Clone, Default)]
pub struct SliceMemory<'a> {
    regions: Vec<SliceRegion<'a>>,
}

impl<'a> SliceMemory<'a> {
    /// Memory with a single region starting at guest-physical 0.
    pub fn flat(bytes: &'a [u8]) -> Self {
        Self {
            regions: vec![SliceRegion { gpa: 0, bytes }],
        }
    }

    /// Memory made of several regions (they must not overlap).
    pub fn new(mut regions: Vec<SliceRegion<'a>>) -> Self {
        regions.sort_by_key(|r| r.gpa);
        Self { regions }
    }

    /// The region containing `pa`, if any.
    pub fn region_of(&self, pa: u64) -> Option<&SliceRegion<'a>> {
        self.regions
            .iter()
            .find(|r| pa >= r.gpa && pa - r.gpa < r.bytes.len() as u64)
    }

    /// A zero-copy view of `len` bytes at `pa`, if they lie within one region.
    pub fn slice(&self, pa: u64, len: usize) -> Option<&'a [u8]> {
        let r = self.region_of(pa)?;
        let off = usize::try_from(pa - r.gpa).ok()?;
        r.bytes.get(off..off.checked_add(len)?)
    }
}

impl PhysMemory for SliceMemory<'_> {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let src = self.slice(pa, buf.len()).ok_or(MemError::OutOfRange {
            pa,
            len: buf.len() as u64,
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.gpa, r.bytes.len() as u64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_memory_bounds() {
        let data = vec![1u8; 4096];
        let m = SliceMemory::new(vec![SliceRegion {
            gpa: 0x1000,
            bytes: &data,
        }]);
        let mut b = [0u8; 8];
        assert!(m.read_phys(0x1000, &mut b).is_ok());
        assert!(m.read_phys(0x1ff8, &mut b).is_ok());
        assert!(m.read_phys(0x1ff9, &mut b).is_err());
        assert!(m.read_phys(0xfff, &mut b).is_err());
        assert!(m.read_phys(u64::MAX - 3, &mut b).is_err());
    }
}
