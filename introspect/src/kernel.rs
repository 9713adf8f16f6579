//! [`Kernel`]: the model of one guest kernel, built once from memory + registers (drgn's
//! `Program` for a live guest). It holds only derived data; methods that read live memory take
//! the guest's [`PhysMemory`] per call.

use serde::{Deserialize, Serialize};

use crate::error::{KallsymsError, KernelError, PagingError, SymbolError};
use crate::kallsyms::{self, KallsymsLayout};
use crate::memory::PhysMemory;
use crate::paging::{self, PageRoot, VirtReadError, Walk};
use crate::regs::VcpuRegs;
use crate::slide::{self, SlideReport};
use crate::symbols::{SymbolRef, Symbols};

/// CR0.PG.
const CR0_PG: u64 = 1 << 31;
/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;
/// KERNEL_IMAGE_SIZE with KASLR: the kernel image lives in `START_KERNEL_MAP + [0, 1 GiB)`.
const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
/// Longest banner read.
const BANNER_MAX: usize = 512;

/// Summary facts about the guest kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `uname -r`, from `linux_banner` (`"Linux version <release> ..."`).
    pub release: Option<String>,
    /// The whole `linux_banner` line.
    pub banner: Option<String>,
    /// Runtime `_text`.
    #[serde(with = "crate::hex")]
    pub text: u64,
    /// KASLR slide (`text - 0xffffffff81000000`).
    #[serde(with = "crate::hex")]
    pub slide: u64,
    /// Guest-physical address of `_text`.
    #[serde(with = "crate::hex")]
    pub text_pa: u64,
    /// The kernel's `phys_base`.
    #[serde(with = "crate::hex")]
    pub phys_base: u64,
    /// Paging levels (4 or 5).
    pub paging_levels: u8,
    /// Kernel PGD used for translations: `init_top_pgt` (swapper_pg_dir) when it translates
    /// the kernel like the vCPU's CR3 did, so that it never goes stale.
    #[serde(with = "crate::hex")]
    pub pgd_pa: u64,
    /// Page-table isolation active (the user half of the PGD pair maps the kernel entry text).
    pub pti: bool,
    /// Number of core-kernel symbols.
    pub num_syms: usize,
    /// Where the kallsyms tables are.
    pub kallsyms: KallsymsLayout,
    /// The slide and its cross-checks.
    pub slide_report: SlideReport,
}

/// Lazily computed parts owned by other modules of this crate.
///
/// NOTE for the BTF/ORC/tasks modules (btf.rs, orc.rs, tasks.rs, unwind.rs, stack.rs): add
/// your fields here, e.g. `pub(crate) btf: OnceLock<Result<Btf, BtfError>>` and
/// `pub(crate) orc: OnceLock<Result<Orc, OrcError>>`, fill them on first use from your own
/// `impl Kernel { pub fn btf(&self, mem: &dyn PhysMemory) -> ... }` block in your file (use
/// [`Kernel::extras`]); keep `Default` derivable. Do not store guest memory here, only derived
/// data.
#[derive(Debug, Default)]
pub struct Extras {
    /// BTF/ORC/per-CPU layout model (model.rs), built on first use.
    pub(crate) model: std::sync::OnceLock<crate::model::Model>,
    /// Frame-pointer code outside the kernel's ORC (hvpatch's patch functions), set by the
    /// patcher: unwinds go through it.
    pub(crate) fp_text: std::sync::RwLock<Vec<(u64, u64)>>,
    /// Return addresses in code that runs a kernel function's instructions elsewhere
    /// (hvpatch's prologue trampolines), with the return address in the function each stands
    /// for; set by the patcher.
    pub(crate) text_aliases: std::sync::RwLock<Vec<(u64, u64)>>,
    /// Unwinds of switched-out tasks by task address, each with the fingerprint of what it
    /// was computed from (stack.rs); reused while the fingerprint holds.
    pub(crate) stack_cache:
        std::sync::Mutex<std::collections::HashMap<u64, (u64, crate::stack::Stack)>>,
}

/// A guest kernel: symbols, KASLR, paging root. Build with [`Kernel::open`].
#[derive(Debug)]
pub struct Kernel {
    info: KernelInfo,
    symbols: Symbols,
    root: PageRoot,
    extras: Extras,
}

/// Candidate kernel roots from the vCPUs (distinct, long-mode vCPUs only).
fn roots(vcpus: &[VcpuRegs]) -> Vec<PageRoot> {
    let mut out = Vec::new();
    for v in vcpus {
        if v.cr0 & CR0_PG == 0 || v.efer & EFER_LMA == 0 {
            continue;
        }
        let r = PageRoot::from_regs(v);
        if !out.contains(&r) {
            out.push(r);
        }
    }
    // Kernels built without page-table isolation may have a PGD on an odd page: also try the
    // CR3 with only PCID bits cleared, after all the PTI-style roots.
    for v in vcpus {
        if v.cr0 & CR0_PG == 0 || v.efer & EFER_LMA == 0 {
            continue;
        }
        let r = PageRoot {
            pgd_pa: v.cr3 & paging::ENTRY_ADDR_MASK,
            levels: if v.la57() { 5 } else { 4 },
        };
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// Switches from a vCPU's (process) PGD to `init_top_pgt` (swapper_pg_dir), which lives as
/// long as the kernel, if it translates `_text` identically.
fn stable_root(mem: &dyn PhysMemory, root: PageRoot, symbols: &Symbols, text: u64) -> PageRoot {
    let Ok(pgt) = symbols
        .lookup("init_top_pgt", None)
        .or_else(|_| symbols.lookup("swapper_pg_dir", None))
    else {
        return root;
    };
    let Ok(pa) = paging::translate(mem, root, pgt) else {
        return root;
    };
    let swapper = PageRoot {
        pgd_pa: pa & paging::ENTRY_ADDR_MASK,
        levels: root.levels,
    };
    match (
        paging::translate(mem, root, text),
        paging::translate(mem, swapper, text),
    ) {
        (Ok(a), Ok(b)) if a == b => swapper,
        _ => root,
    }
}

/// The release (`uname -r`) in a `linux_banner` text: the word after `"Linux version "`
/// (`"Linux version 6.1.0-18-amd64 (debian-kernel@...) ..."` → `"6.1.0-18-amd64"`). `None`
/// when the text is not a banner.
pub fn release_from_banner(banner: &str) -> Option<&str> {
    banner
        .strip_prefix("Linux version ")?
        .split_whitespace()
        .next()
}

impl Kernel {
    /// Finds the kernel: locates kallsyms in guest RAM, decodes it, and accepts the first
    /// candidate whose KASLR slide agrees with the page tables (and LSTAR / IDT when available)
    /// of a kernel-mode paging root taken from the vCPUs.
    ///
    /// Fast path: only the frames backing the kernel-image mapping
    /// (`0xffffffff80000000 + [0, 1 GiB)` in the page tables) are scanned. Fallback: all RAM.
    pub fn open(mem: &dyn PhysMemory, vcpus: &[VcpuRegs]) -> Result<Kernel, KernelError> {
        let roots = roots(vcpus);
        if roots.is_empty() {
            return Err(KernelError::NoLongModeVcpu);
        }
        let mut tried: Vec<u64> = Vec::new();
        let mut last: Option<KernelError> = None;
        for &root in &roots {
            let image: Vec<(u64, u64)> = paging::mapped_ranges(
                mem,
                root,
                slide::START_KERNEL_MAP,
                slide::START_KERNEL_MAP + KERNEL_IMAGE_SIZE,
            )
            .iter()
            .map(|m| (m.pa, m.len))
            .collect();
            for tt in kallsyms::scan_token_tables_in(mem, &image) {
                if tried.contains(&tt) {
                    continue;
                }
                tried.push(tt);
                match Self::try_candidate(mem, &roots, vcpus, tt) {
                    Ok(k) => return Ok(k),
                    Err(e) => last = Some(e),
                }
            }
        }
        tracing::debug!("kallsyms not found in the kernel-image mapping; scanning all guest RAM");
        for tt in kallsyms::scan_token_tables(mem) {
            if tried.contains(&tt) {
                continue;
            }
            tried.push(tt);
            match Self::try_candidate(mem, &roots, vcpus, tt) {
                Ok(k) => return Ok(k),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(KallsymsError::NoTokenTable.into()))
    }

    fn try_candidate(
        mem: &dyn PhysMemory,
        roots: &[PageRoot],
        vcpus: &[VcpuRegs],
        tt: u64,
    ) -> Result<Kernel, KernelError> {
        let ks = kallsyms::decode_at(mem, tt).inspect_err(|e| {
            tracing::debug!("kallsyms candidate at {tt:#x} rejected: {e}");
        })?;
        // Report the most telling failure: a disagreement found through a root that maps the
        // kernel beats "this root does not map _text" (e.g. a PTI user PGD).
        let mut best: Option<crate::error::SlideError> = None;
        for &root in roots {
            match slide::compute(mem, root, &ks.layout, &ks.symbols, vcpus) {
                Ok(report) => return Ok(Self::build(mem, root, ks.layout, ks.symbols, report)),
                Err(e) => {
                    tracing::debug!(
                        "kallsyms candidate at {tt:#x}, root {:#x}: {e}",
                        root.pgd_pa
                    );
                    let paging = |e: &crate::error::SlideError| {
                        matches!(e, crate::error::SlideError::Paging { .. })
                    };
                    if best.as_ref().is_none_or(|b| paging(b) && !paging(&e)) {
                        best = Some(e);
                    }
                }
            }
        }
        Err(best.map_or(KernelError::NoLongModeVcpu, KernelError::from))
    }

    fn build(
        mem: &dyn PhysMemory,
        root: PageRoot,
        layout: KallsymsLayout,
        symbols: Symbols,
        report: SlideReport,
    ) -> Kernel {
        let root = stable_root(mem, root, &symbols, report.text);
        let banner = symbols
            .lookup("linux_banner", None)
            .ok()
            .and_then(|va| read_cstr(mem, root, va, BANNER_MAX));
        let release = banner
            .as_deref()
            .and_then(release_from_banner)
            .map(str::to_string);
        let pti = detect_pti(mem, root, report.text);
        let info = KernelInfo {
            release,
            banner,
            text: report.text,
            slide: report.slide,
            text_pa: report.text_pa,
            phys_base: report.phys_base,
            paging_levels: root.levels,
            pgd_pa: root.pgd_pa,
            pti,
            num_syms: symbols.len(),
            kallsyms: layout,
            slide_report: report,
        };
        Kernel {
            info,
            symbols,
            root,
            extras: Extras::default(),
        }
    }

    /// Cheap check that the model still describes the guest's kernel (e.g. after the guest ran
    /// or rebooted): `kallsyms_relative_base` still holds `_text` and `_text` still translates
    /// to the same physical address.
    pub fn refresh(&self, mem: &dyn PhysMemory) -> Result<(), KernelError> {
        let rb = mem.read_u64(self.info.kallsyms.relative_base_pa)?;
        if rb != self.info.text {
            return Err(KernelError::Stale {
                what: "kallsyms_relative_base",
                expected: self.info.text,
                found: rb,
            });
        }
        let pa = self.translate(mem, self.info.text)?;
        if pa != self.info.text_pa {
            return Err(KernelError::Stale {
                what: "physical address of _text",
                expected: self.info.text_pa,
                found: pa,
            });
        }
        Ok(())
    }

    /// Summary facts.
    pub fn info(&self) -> &KernelInfo {
        &self.info
    }

    /// The symbol table.
    pub fn symbols(&self) -> &Symbols {
        &self.symbols
    }

    /// Address of a symbol (livepatch `sympos` semantics, see [`Symbols::lookup`]).
    pub fn lookup(&self, name: &str, sympos: Option<u32>) -> Result<u64, SymbolError> {
        self.symbols.lookup(name, sympos)
    }

    /// `name+off/size` for an address in the kernel image (see [`Symbols::symbolize`]).
    pub fn symbolize(&self, addr: u64) -> Option<SymbolRef<'_>> {
        self.symbols.symbolize(addr)
    }

    /// The kernel paging root used for translations.
    pub fn page_root(&self) -> PageRoot {
        self.root
    }

    /// Runtime `_text`.
    pub fn text(&self) -> u64 {
        self.info.text
    }

    /// Guest-physical address of a kernel-image VA by the linear `phys_base` formula (no walk).
    /// `None` outside `[_text, _end)`.
    pub fn image_pa(&self, va: u64) -> Option<u64> {
        let (_, end) = self.symbols.ksym_range();
        if va < self.info.text || va >= end {
            return None;
        }
        Some(
            va.wrapping_sub(slide::START_KERNEL_MAP)
                .wrapping_add(self.info.phys_base),
        )
    }

    /// Translates a virtual address through the kernel page tables.
    pub fn translate(&self, mem: &dyn PhysMemory, va: u64) -> Result<u64, PagingError> {
        paging::translate(mem, self.root, va)
    }

    /// The full page walk of `va` (entries, leaf size, permissions).
    pub fn walk(&self, mem: &dyn PhysMemory, va: u64) -> Result<Walk, PagingError> {
        paging::walk(mem, self.root, va)
    }

    /// The page walk of `va`, or where it stops at a non-present entry (for linking new
    /// page-table entries: each [`paging::WalkEntry`] has its guest-physical `entry_pa`).
    pub fn walk_or_hole(
        &self,
        mem: &dyn PhysMemory,
        va: u64,
    ) -> Result<paging::WalkOutcome, PagingError> {
        paging::walk_or_hole(mem, self.root, va)
    }

    /// Mapped parts of `[va_start, va_end)` (e.g. the kernel-image window, to find a free 2 MiB
    /// slot after `_end`).
    pub fn mapped_ranges(
        &self,
        mem: &dyn PhysMemory,
        va_start: u64,
        va_end: u64,
    ) -> Vec<paging::Mapping> {
        paging::mapped_ranges(mem, self.root, va_start, va_end)
    }

    /// Reads kernel virtual memory (may cross pages).
    pub fn read_virt(
        &self,
        mem: &dyn PhysMemory,
        va: u64,
        buf: &mut [u8],
    ) -> Result<(), KernelError> {
        paging::read_virt(mem, self.root, va, buf).map_err(|e| match e {
            VirtReadError::Paging(p) => KernelError::Paging(p),
            VirtReadError::Mem(m) => KernelError::Mem(m),
        })
    }

    /// Reads a little-endian u64 at a kernel VA.
    pub fn read_u64_virt(&self, mem: &dyn PhysMemory, va: u64) -> Result<u64, KernelError> {
        let mut b = [0u8; 8];
        self.read_virt(mem, va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u32 at a kernel VA.
    pub fn read_u32_virt(&self, mem: &dyn PhysMemory, va: u64) -> Result<u32, KernelError> {
        let mut b = [0u8; 4];
        self.read_virt(mem, va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a NUL-terminated string of at most `max` bytes at a kernel VA (lossy UTF-8).
    pub fn read_cstr(&self, mem: &dyn PhysMemory, va: u64, max: usize) -> Option<String> {
        read_cstr(mem, self.root, va, max)
    }

    /// Declares code outside the kernel's ORC that keeps frame pointers (the functions of
    /// loaded patches; `[start, end)` ranges): stack unwinds go through it at return addresses
    /// and call an interrupted ip in it unreliable. Replaces earlier ranges.
    pub fn set_frame_pointer_text(&self, ranges: &[(u64, u64)]) {
        if let Ok(mut v) = self.extras.fp_text.write() {
            *v = ranges.to_vec();
        }
    }

    /// Declares return addresses that stand for others: `(at, as_if)`, a return address `at`
    /// in code outside the kernel's text that runs a kernel function's instructions (a call
    /// moved into hvpatch's prologue trampoline) is unwound, and reported, as the return
    /// address `as_if` in that function. Replaces earlier aliases.
    pub fn set_text_aliases(&self, aliases: &[(u64, u64)]) {
        if let Ok(mut v) = self.extras.text_aliases.write() {
            *v = aliases.to_vec();
        }
    }

    /// The aliases of [`Kernel::set_text_aliases`].
    pub fn text_aliases(&self) -> Vec<(u64, u64)> {
        self.extras
            .text_aliases
            .read()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// The ranges of [`Kernel::set_frame_pointer_text`].
    pub fn frame_pointer_text(&self) -> Vec<(u64, u64)> {
        self.extras
            .fp_text
            .read()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Lazily computed parts owned by the BTF/ORC/tasks modules (see [`Extras`]).
    pub fn extras(&self) -> &Extras {
        &self.extras
    }
}

/// Reads a C string, page by page, stopping at NUL or `max` bytes.
fn read_cstr(mem: &dyn PhysMemory, root: PageRoot, va: u64, max: usize) -> Option<String> {
    let mut out = Vec::new();
    let mut cur = va;
    while out.len() < max {
        let in_page = (0x1000 - (cur & 0xfff)) as usize;
        let n = in_page.min(max - out.len());
        let mut buf = vec![0u8; n];
        if paging::read_virt(mem, root, cur, &mut buf).is_err() {
            break;
        }
        if let Some(z) = memchr::memchr(0, &buf) {
            out.extend_from_slice(&buf[..z]);
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
        out.extend_from_slice(&buf);
        cur = cur.wrapping_add(n as u64);
    }
    if out.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(&out).into_owned())
    }
}

/// PTI is active when the user PGD of the kernel PGD pair maps the kernel image's top-level
/// slot (the entry text must stay reachable from user CR3). Without PTI that page is unused.
fn detect_pti(mem: &dyn PhysMemory, root: PageRoot, text: u64) -> bool {
    let user = PageRoot {
        pgd_pa: root.user_pgd_pa(),
        levels: root.levels,
    };
    let idx = paging::table_index(text, root.levels) as u64;
    matches!(mem.read_u64(user.pgd_pa + 8 * idx), Ok(v) if v & paging::PTE_PRESENT != 0)
}

impl From<VirtReadError> for KernelError {
    fn from(e: VirtReadError) -> Self {
        match e {
            VirtReadError::Paging(p) => KernelError::Paging(p),
            VirtReadError::Mem(m) => KernelError::Mem(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::release_from_banner;

    #[test]
    fn release_is_the_word_after_linux_version() {
        let b = "Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org) (gcc-12) #1 SMP";
        assert_eq!(release_from_banner(b), Some("6.1.0-18-amd64"));
        assert_eq!(
            release_from_banner("Linux version 5.10.0\0\0"),
            Some("5.10.0\0\0")
        );
        assert_eq!(release_from_banner("Linux version "), None);
        assert_eq!(release_from_banner("Linux 6.1"), None);
    }
}
