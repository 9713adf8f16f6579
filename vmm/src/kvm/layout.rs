//! Guest-physical memory layout of the VMM (addresses follow Firecracker's x86_64 layout).

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (an empty IDT: 8 zero bytes).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map (PVH boots only; overlaps the zero page, which only Linux boots use).
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// Identity page tables: PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// Identity page tables: first of [`IDENTITY_GIBS`] page directories (2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// GiBs identity-mapped by the boot page tables.
pub const IDENTITY_GIBS: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line including its NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Three pages for KVM's real-mode TSS (inside the 32-bit MMIO hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// One page for KVM's real-mode identity map.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Start of the 32-bit MMIO hole; RAM above it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Local APIC base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// I/O APIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Alignment of the patch arena.
pub const ARENA_ALIGN: u64 = 2 << 20;
/// Default patch-arena size.
pub const DEFAULT_ARENA_SIZE: u64 = 2 << 20;
/// Smallest RAM for a Linux boot.
pub const MIN_LINUX_MEMORY: u64 = 64 << 20;
/// Smallest RAM for a raw guest (the boot page tables live below 1 MiB).
pub const MIN_RAW_MEMORY: u64 = 1 << 20;
/// Most vCPUs (the MP table must fit the 1 KiB EBDA).
pub const MAX_VCPUS: u8 = 32;
/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port (command/status is +4).
pub const I8042_PORT: u16 = 0x60;
