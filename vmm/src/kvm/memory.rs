//! Guest RAM: layout (regions, patch arena), creation, KVM memory slots and the
//! [`PhysMemory`] view the introspection layer reads through.

use std::sync::Arc;

use introspect::{MemError, PhysMemory};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::error::VmError;
use super::layout::{ARENA_ALIGN, MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest RAM regions `(start, len)` for `size` bytes of RAM: below the 32-bit MMIO hole and,
/// for larger guests, the rest from 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// The patch arena: `size` bytes at a 2 MiB-aligned address at the top of the highest RAM
/// region. `None` when `size` is 0.
pub fn arena_range(size: u64, regions: &[(u64, u64)]) -> Result<Option<(u64, u64)>, VmError> {
    if size == 0 {
        return Ok(None);
    }
    if !size.is_multiple_of(4096) {
        return Err(VmError::Config(format!(
            "patch arena size {size:#x} is not a multiple of 4 KiB"
        )));
    }
    let &(start, len) = regions
        .last()
        .ok_or(VmError::Config("no guest RAM".into()))?;
    if size > len / 2 {
        return Err(VmError::Config(format!(
            "patch arena ({} KiB) must be at most half of the top RAM region ({} KiB)",
            size >> 10,
            len >> 10
        )));
    }
    let end = start + len;
    let base = (end - size) & !(ARENA_ALIGN - 1);
    if base < start.max(super::layout::HIMEM_START) {
        return Err(VmError::Config("patch arena does not fit".into()));
    }
    Ok(Some((base, size)))
}

/// Allocates anonymous host memory for `regions`.
pub fn create_guest_memory(regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, VmError> {
    let ranges = regions
        .iter()
        .map(|&(s, l)| {
            usize::try_from(l)
                .map(|l| (GuestAddress(s), l))
                .map_err(|_| VmError::Memory(format!("region size {l:#x} too large")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(e.to_string()))?;
    for region in mem.iter() {
        if let Ok(host) = mem.get_host_address(region.start_addr()) {
            // SAFETY: advisory only, on a mapping `mem` owns: `host` and `region.len()` describe
            // exactly that mapping.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(mem)
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory(e.to_string()))?;
        let slot_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by `mem`,
        // which the VM keeps alive (in an Arc) for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(slot_desc) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Guest RAM as the introspection layer sees it.
#[derive(Clone, Debug)]
pub struct KvmMemory {
    mem: Arc<GuestMemoryMmap>,
}

impl KvmMemory {
    /// Wraps the VM's guest memory.
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        Self { mem }
    }

    /// The underlying guest memory.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Writes `data` at guest-physical `pa`; the whole range must be RAM.
    pub fn write(&self, pa: u64, data: &[u8]) -> Result<(), MemError> {
        let oor = MemError::OutOfRange {
            pa,
            len: data.len() as u64,
        };
        if !self.covers(pa, data.len() as u64) {
            return Err(oor);
        }
        self.mem
            .write_slice(data, GuestAddress(pa))
            .map_err(|_| oor)
    }

    fn covers(&self, pa: u64, len: u64) -> bool {
        let Some(end) = pa.checked_add(len) else {
            return false;
        };
        // Ranges may span adjacent regions only if they are contiguous; our regions never are.
        self.mem.iter().any(|r| {
            let s = r.start_addr().0;
            pa >= s && end <= s + r.len()
        })
    }
}

impl PhysMemory for KvmMemory {
    fn read_phys(&self, pa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let oor = MemError::OutOfRange {
            pa,
            len: buf.len() as u64,
        };
        if !self.covers(pa, buf.len() as u64) {
            return Err(oor);
        }
        self.mem.read_slice(buf, GuestAddress(pa)).map_err(|_| oor)
    }

    fn regions(&self) -> Vec<(u64, u64)> {
        self.mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_arena() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(
            arena_range(2 << 20, &r).unwrap(),
            Some(((5 << 30) - (2 << 20), 2 << 20))
        );
        let r = ram_regions((512 << 20) + 4096);
        assert_eq!(
            arena_range(2 << 20, &r).unwrap(),
            Some(((510 << 20), 2 << 20))
        );
        assert!(arena_range(123, &r).is_err());
        assert_eq!(arena_range(0, &r).unwrap(), None);
    }

    #[test]
    fn memory_bounds() {
        let mem = Arc::new(create_guest_memory(&[(0, 0x10000)]).unwrap());
        let m = KvmMemory::new(mem);
        m.write(0x100, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        m.read_phys(0x100, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(m.read_phys(0xfffe, &mut b).is_err());
        assert!(m.write(u64::MAX - 1, &b).is_err());
    }
}
