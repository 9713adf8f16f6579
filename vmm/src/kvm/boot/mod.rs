//! Loading a Linux kernel (bzImage, or ELF vmlinux with or without the Xen PVH note) with its
//! initrd and command line, and the boot data the kernel reads: zero page or PVH start info,
//! e820 map, MP table, identity page tables, GDT.

pub mod acpi;
pub mod e820;
pub mod gdt;
pub mod mptable;
pub mod paging;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use self::e820::{E820Entry, E820_RAM};
use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
    ZERO_PAGE_ADDR,
};

/// Errors loading the kernel, initrd and command line and writing the boot data.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file is missing or unreadable.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// Path given.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither a bzImage nor an x86-64 ELF vmlinux.
    #[error("{path} is not a kernel (neither a bzImage nor an x86-64 ELF vmlinux): {reason}")]
    NotAKernel {
        /// Path given.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// The initrd file is missing, unreadable or does not fit.
    #[error("initrd {path}: {reason}")]
    Initrd {
        /// Path given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Boot data could not be written to guest memory.
    #[error("writing boot data: {0}")]
    GuestMemory(String),
    /// Boot data does not fit where it must go.
    #[error("boot data does not fit: {0}")]
    DoesNotFit(String),
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Which boot protocol the vCPU 0 entry state follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// bzImage, Linux 64-bit boot protocol (entry at load address + 0x200, rsi = zero page).
    BzImage64,
    /// ELF vmlinux, 64-bit entry at `e_entry` with rsi = zero page.
    Elf64,
    /// ELF vmlinux with a Xen PVH note: 32-bit protected mode, ebx = `hvm_start_info`.
    Pvh,
}

/// Where and how vCPU 0 starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Protocol.
    pub protocol: BootProtocol,
    /// Entry point (guest-physical).
    pub rip: u64,
}

/// What [`load_linux`] needs besides guest memory.
pub struct LinuxBoot<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Optional initrd.
    pub initrd: Option<&'a Path>,
    /// Command line.
    pub cmdline: &'a str,
    /// e820 map to hand over.
    pub e820: &'a [E820Entry],
    /// Address of the ACPI RSDP (0 = none).
    pub rsdp: u64,
}

impl std::fmt::Debug for LinuxBoot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxBoot").finish_non_exhaustive()
    }
}

/// Validates a command line and turns it into linux-loader's [`Cmdline`].
pub fn make_cmdline(s: &str) -> Result<Cmdline, BootError> {
    if s.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes; at most {} fit",
            s.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(BootError::Cmdline(format!("contains the character {c:?}")));
    }
    Cmdline::try_from(s, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

fn kernel_kind(path: &Path, f: &mut File) -> Result<bool, BootError> {
    // true = ELF, false = bzImage
    let io = |source| BootError::KernelFile {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x210];
    let n = read_up_to(f, &mut head).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let not = |reason: &str| BootError::NotAKernel {
        path: path.to_owned(),
        reason: reason.into(),
    };
    if n >= 20 && head[..4] == *b"\x7fELF" {
        if head[4] != 2 || head[5] != 1 || u16::from_le_bytes([head[18], head[19]]) != 62 {
            return Err(not("ELF file is not x86-64 little-endian 64-bit"));
        }
        return Ok(true);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(false);
    }
    Err(not("no ELF magic and no bzImage 'HdrS' header"))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads kernel, initrd and command line and writes the zero page or PVH start info. Returns
/// the boot entry of vCPU 0.
pub fn load_linux(mem: &GuestMemoryMmap, boot: &LinuxBoot<'_>) -> Result<BootEntry, BootError> {
    let cmdline = make_cmdline(boot.cmdline)?;
    let kpath = boot.kernel;
    let mut f = File::open(kpath).map_err(|source| BootError::KernelFile {
        path: kpath.to_owned(),
        source,
    })?;
    let is_elf = kernel_kind(kpath, &mut f)?;
    let not = |e: linux_loader::loader::Error| BootError::NotAKernel {
        path: kpath.to_owned(),
        reason: e.to_string(),
    };
    let loaded = if is_elf {
        Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(not)?
    } else {
        BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(not)?
    };
    let hdr = loaded.setup_header;
    if let Some(h) = &hdr {
        if h.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::NotAKernel {
                path: kpath.to_owned(),
                reason: "bzImage lacks the 64-bit entry point (XLF_KERNEL_64)".into(),
            });
        }
        let max = h.cmdline_size as usize;
        if max != 0 && boot.cmdline.len() > max {
            return Err(BootError::Cmdline(format!(
                "{} bytes; this kernel takes at most {max}",
                boot.cmdline.len()
            )));
        }
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let initrd_max = hdr
        .as_ref()
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd = match boot.initrd {
        Some(p) => Some(load_initrd(
            mem,
            p,
            boot.e820,
            loaded.kernel_end,
            initrd_max,
        )?),
        None => None,
    };

    match (is_elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_info(mem, boot.e820, initrd, boot.rsdp)?;
            Ok(BootEntry {
                protocol: BootProtocol::Pvh,
                rip: entry.0,
            })
        }
        (true, _) => {
            write_zero_page(mem, None, boot, initrd)?;
            Ok(BootEntry {
                protocol: BootProtocol::Elf64,
                rip: loaded.kernel_load.0,
            })
        }
        (false, _) => {
            write_zero_page(mem, hdr, boot, initrd)?;
            Ok(BootEntry {
                protocol: BootProtocol::BzImage64,
                rip: loaded.kernel_load.0 + 0x200,
            })
        }
    }
}

/// Places the initrd page-aligned at the top of the highest usable RAM below `max_addr`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    e820: &[E820Entry],
    kernel_end: u64,
    max_addr: u64,
) -> Result<(u64, u64), BootError> {
    let err = |reason: String| BootError::Initrd {
        path: path.to_owned(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let size = data.len() as u64;
    let limit = max_addr.saturating_add(1);
    let mut best = None;
    for e in e820.iter().filter(|e| e.kind == E820_RAM) {
        let end = (e.addr + e.size).min(limit);
        if end < size {
            continue;
        }
        let start = (end - size) & !0xfff;
        if start >= e.addr.max(kernel_end).max(HIMEM_START) {
            best = best.max(Some(start));
        }
    }
    let addr = best.ok_or_else(|| err(format!("{size} bytes do not fit in guest RAM")))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| err(e.to_string()))?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: Option<setup_header>,
    boot: &LinuxBoot<'_>,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let (e820, cmdline_len) = (boot.e820, boot.cmdline.len());
    let mut params = boot_params {
        acpi_rsdp_addr: boot.rsdp,
        ..Default::default()
    };
    if let Some(h) = hdr {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::DoesNotFit("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::GuestMemory(format!("zero page: {e}")))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        modules.push(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
    }
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::GuestMemory(format!("PVH start info: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_checks() {
        assert!(make_cmdline("console=ttyS0 quiet").is_ok());
        assert!(matches!(
            make_cmdline(&"x".repeat(5000)),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(make_cmdline("a\nb"), Err(BootError::Cmdline(_))));
    }
}
