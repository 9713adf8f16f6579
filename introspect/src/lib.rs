//! hvpatch-introspect: know a running x86-64 Linux guest kernel from guest-physical memory and
//! vCPU registers alone — no System.map, no vmlinux, no debuginfo, no agent.
//!
//! The crate is pure: it never touches KVM or QEMU. Hosts hand it a [`PhysMemory`] and
//! [`VcpuRegs`]; [`Kernel::open`] finds kallsyms, the KASLR slide and the kernel paging root.
//!
//! ```no_run
//! use introspect::{Kernel, SliceMemory, VcpuRegs};
//!
//! # fn demo(ram: &[u8], vcpus: &[VcpuRegs]) -> Result<(), Box<dyn std::error::Error>> {
//! let mem = SliceMemory::flat(ram);
//! let k = Kernel::open(&mem, vcpus)?; // kallsyms scan + decode, slide cross-checks
//! println!("{:?} slide {:#x}", k.info().release, k.info().slide);
//! let f = k.lookup("cmdline_proc_show", None)?; // klp sympos semantics
//! let pa = k.translate(&mem, f)?; // kernel page walk
//! let here = k.symbolize(f + 5).map(|s| s.to_string()); // "cmdline_proc_show+0x5/0x..."
//! # let _ = (pa, here); Ok(())
//! # }
//! ```

pub mod bpfsyms;
pub mod btf;
pub mod error;
pub mod hex;
pub mod kallsyms;
pub mod kernel;
pub mod live;
pub mod memory;
pub mod model;
pub mod modsyms;
pub mod modules;
pub mod orc;
pub mod paging;
pub mod regs;
pub mod slide;
pub mod stack;
pub mod symbols;
pub mod tasks;
pub mod unwind;

pub use error::{KallsymsError, KernelError, PagingError, SlideError, SymbolError};
pub use kernel::{Kernel, KernelInfo};
pub use memory::{MemError, PhysMemory, SliceMemory, SliceRegion};
pub use modsyms::ModuleSymbol;
pub use modules::{Module, ModuleError, ModuleRegion, ModuleState, RegionKind};
pub use paging::{PageRoot, Walk, WalkEntry};
pub use regs::VcpuRegs;
pub use symbols::{pick_sympos, Symbol, SymbolRef, Symbols};
