//! Module symbols from guest memory, as `/proc/kallsyms` shows them.
//!
//! Each formed module points at its symbols through `mod->kallsyms` (`struct mod_kallsyms`:
//! `symtab` (an `Elf64_Sym` array), `num_symtab`, `strtab`, `typetab`). While the module's
//! init runs that is the full ELF symbol table in init data; after init the kernel switches it
//! to `mod->core_kallsyms`, a cut-down copy in core data. `/proc/kallsyms` walks the
//! `modules` list (newest first) and each table in order (`module_get_kallsym`), skips empty
//! names (`s_show`), and prints the `typetab` letter upper-cased when the symbol is in the
//! module's own export table `mod->syms` with the same value (`is_exported`; GPL-only
//! exports, `mod->gpl_syms`, are not looked at and so print lower-case), lower-cased
//! otherwise. This module mirrors exactly that.
//!
//! Everything read is guest data: pointers and counts are bounded, reads go through a
//! page-granular cache with a cap, and bad values are [`ModuleError`]s.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::btf::Btf;
use crate::model::GuestAccess;
use crate::modules::{module_addrs, Module, ModuleError, ModuleLayout};

/// Most symbols we accept in one module's table.
pub const MAX_MODULE_SYMS: u64 = 1 << 18;
/// Most exported symbols we accept in one module.
pub const MAX_MODULE_EXPORTS: u64 = 1 << 16;
/// `KSYM_NAME_LEN`: names are cut to `KSYM_NAME_LEN - 1` bytes, as `strscpy` does.
pub const KSYM_NAME_LEN: usize = 512;
/// Most distinct guest pages one module's symbols may make us read (16 MiB).
pub const MAX_PAGES: usize = 4096;
/// `SHN_UNDEF`.
const SHN_UNDEF: u16 = 0;
const PAGE: u64 = 0x1000;

/// Where the fields of an `Elf64_Sym` are (BTF `struct elf64_sym`, else the ELF ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfSymLayout {
    /// `sizeof(Elf64_Sym)` (24).
    pub size: u64,
    /// `st_name` (u32).
    pub name: u64,
    /// `st_shndx` (u16).
    pub shndx: u64,
    /// `st_value` (u64).
    pub value: u64,
}

impl ElfSymLayout {
    /// The ELF64 ABI layout.
    pub const ELF64: ElfSymLayout = ElfSymLayout {
        size: 24,
        name: 0,
        shndx: 6,
        value: 8,
    };
}

/// How `struct kernel_symbol` stores its value and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSymbolLayout {
    /// `CONFIG_HAVE_ARCH_PREL32_RELOCATIONS` (x86-64): `int value_offset, name_offset`,
    /// each relative to its own address.
    Relative {
        /// `sizeof(struct kernel_symbol)`.
        size: u64,
        /// `value_offset`.
        value: u64,
        /// `name_offset`.
        name: u64,
    },
    /// Plain pointers: `unsigned long value; const char *name`.
    Absolute {
        /// `sizeof(struct kernel_symbol)`.
        size: u64,
        /// `value`.
        value: u64,
        /// `name`.
        name: u64,
    },
}

/// BTF offsets needed to read module symbols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModKallsymsLayout {
    /// `module.kallsyms` (`struct mod_kallsyms *`).
    pub kallsyms: u64,
    /// `mod_kallsyms.symtab`.
    pub symtab: u64,
    /// `mod_kallsyms.num_symtab` (u32).
    pub num_symtab: u64,
    /// `mod_kallsyms.strtab`.
    pub strtab: u64,
    /// `mod_kallsyms.typetab`.
    pub typetab: u64,
    /// `module.syms` (`const struct kernel_symbol *`).
    pub syms: u64,
    /// `module.num_syms` (u32).
    pub num_syms: u64,
    /// `struct kernel_symbol`.
    pub ksym: KernelSymbolLayout,
    /// `Elf64_Sym`.
    pub sym: ElfSymLayout,
}

impl ModKallsymsLayout {
    /// Reads the layout from BTF; `None` if a needed member is missing or not of the expected
    /// size.
    pub fn from_btf(btf: &Btf) -> Option<ModKallsymsLayout> {
        let sized = |st: &str, m: &str, size: u64| -> Option<u64> {
            let mm = btf.member(st, m).ok()?;
            (mm.size == size).then_some(mm.offset)
        };
        let ksize = btf.struct_size("kernel_symbol").ok()?;
        let ksym = match (
            sized("kernel_symbol", "value_offset", 4),
            sized("kernel_symbol", "name_offset", 4),
        ) {
            (Some(value), Some(name)) => KernelSymbolLayout::Relative {
                size: ksize,
                value,
                name,
            },
            _ => KernelSymbolLayout::Absolute {
                size: ksize,
                value: sized("kernel_symbol", "value", 8)?,
                name: sized("kernel_symbol", "name", 8)?,
            },
        };
        let sym = match (
            btf.struct_size("elf64_sym").ok(),
            sized("elf64_sym", "st_name", 4),
            sized("elf64_sym", "st_shndx", 2),
            sized("elf64_sym", "st_value", 8),
        ) {
            (Some(size), Some(name), Some(shndx), Some(value)) => ElfSymLayout {
                size,
                name,
                shndx,
                value,
            },
            _ => ElfSymLayout::ELF64,
        };
        if sym.size < 16 || ksize == 0 {
            return None;
        }
        Some(ModKallsymsLayout {
            kallsyms: sized("module", "kallsyms", 8)?,
            symtab: sized("mod_kallsyms", "symtab", 8)?,
            num_symtab: sized("mod_kallsyms", "num_symtab", 4)?,
            strtab: sized("mod_kallsyms", "strtab", 8)?,
            typetab: sized("mod_kallsyms", "typetab", 8)?,
            syms: sized("module", "syms", 8)?,
            num_syms: sized("module", "num_syms", 4)?,
            ksym,
            sym,
        })
    }
}

/// One module symbol, as a `/proc/kallsyms` module line shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSymbol {
    /// `st_value`.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// The type letter as `/proc/kallsyms` prints it: the `typetab` letter, upper-case when
    /// exported, lower-case otherwise.
    #[serde(rename = "type")]
    pub kind: char,
    /// Name (at most `KSYM_NAME_LEN - 1` bytes, lossy UTF-8).
    pub name: String,
    /// Module name.
    pub module: String,
    /// In the module's export table (`mod->syms`) with this value.
    pub exported: bool,
    /// Defined in the module (`st_shndx != SHN_UNDEF`); only these resolve by name.
    pub defined: bool,
}

/// Reads guest memory one page at a time and keeps the pages: names in a string table are
/// close together, so each page is translated once. At most [`MAX_PAGES`] pages.
struct PageReader<'a> {
    g: &'a dyn GuestAccess,
    pages: HashMap<u64, Box<[u8]>>,
    module: &'a str,
}

impl<'a> PageReader<'a> {
    fn new(g: &'a dyn GuestAccess, module: &'a str) -> Self {
        PageReader {
            g,
            pages: HashMap::new(),
            module,
        }
    }

    fn page(&mut self, va: u64, what: &'static str) -> Result<&[u8], ModuleError> {
        let base = va & !(PAGE - 1);
        if !self.pages.contains_key(&base) {
            if self.pages.len() >= MAX_PAGES {
                return Err(ModuleError::TooMany {
                    module: self.module.to_string(),
                    what: "guest pages read for symbols",
                    count: self.pages.len() as u64 + 1,
                    max: MAX_PAGES as u64,
                });
            }
            let mut b = vec![0u8; PAGE as usize].into_boxed_slice();
            self.g
                .read_virt(base, &mut b)
                .map_err(|err| ModuleError::Read {
                    module: self.module.to_string(),
                    what,
                    addr: va,
                    err,
                })?;
            self.pages.insert(base, b);
        }
        Ok(self.pages.get(&base).map(|b| &b[..]).unwrap_or(&[]))
    }

    /// Reads `len` bytes at `va` (bounded by the page cap).
    fn read(&mut self, va: u64, len: u64, what: &'static str) -> Result<Vec<u8>, ModuleError> {
        let end = va.checked_add(len).ok_or_else(|| ModuleError::Corrupt {
            module: self.module.to_string(),
            what: format!("{what} {va:#x}+{len:#x} wraps around"),
        })?;
        let mut out = Vec::with_capacity(len.min(MAX_PAGES as u64 * PAGE) as usize);
        let mut cur = va;
        while cur < end {
            let off = (cur & (PAGE - 1)) as usize;
            let n = ((PAGE - off as u64).min(end - cur)) as usize;
            let p = self.page(cur, what)?;
            out.extend_from_slice(p.get(off..off + n).unwrap_or(&[]));
            cur += n as u64;
        }
        Ok(out)
    }

    /// A NUL-terminated string at `va`, cut at `max` bytes like `strscpy`.
    fn cstr(&mut self, va: u64, max: usize, what: &'static str) -> Result<String, ModuleError> {
        let mut out = Vec::new();
        let mut cur = va;
        while out.len() < max {
            let off = (cur & (PAGE - 1)) as usize;
            let p = self.page(cur, what)?;
            let rest = p.get(off..).unwrap_or(&[]);
            let take = rest.len().min(max - out.len());
            if let Some(z) = memchr::memchr(0, &rest[..take]) {
                out.extend_from_slice(&rest[..z]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&rest[..take]);
            cur = cur
                .checked_add(take as u64)
                .ok_or_else(|| ModuleError::Corrupt {
                    module: self.module.to_string(),
                    what: format!("{what} at {va:#x} runs past the end of memory"),
                })?;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// One `Elf64_Sym` of a symtab slice (zero-copy over the bytes read from the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSym {
    /// `st_name`: offset in the string table.
    pub name: u32,
    /// `st_shndx`.
    pub shndx: u16,
    /// `st_value`.
    pub value: u64,
}

/// The `i`-th symbol of a symtab in `bytes`; `None` past its end.
pub fn raw_sym(bytes: &[u8], l: &ElfSymLayout, i: usize) -> Option<RawSym> {
    let at = (i as u64).checked_mul(l.size)?;
    let field = |off: u64, n: usize| -> Option<&[u8]> {
        let s = usize::try_from(at.checked_add(off)?).ok()?;
        bytes.get(s..s.checked_add(n)?)
    };
    let name = field(l.name, 4)?;
    let shndx = field(l.shndx, 2)?;
    let value = field(l.value, 8)?;
    Some(RawSym {
        name: u32::from_le_bytes(name.try_into().ok()?),
        shndx: u16::from_le_bytes(shndx.try_into().ok()?),
        value: u64::from_le_bytes(value.try_into().ok()?),
    })
}

fn kernel_ptr(module: &str, what: &str, v: u64) -> Result<u64, ModuleError> {
    if v >> 63 == 1 {
        Ok(v)
    } else {
        Err(ModuleError::Corrupt {
            module: module.to_string(),
            what: format!("{what} {v:#x} is not a kernel address"),
        })
    }
}

/// The module's exports: `(name, value)` of each `mod->syms` entry.
fn exports(
    r: &mut PageReader<'_>,
    g: &dyn GuestAccess,
    l: &ModKallsymsLayout,
    m: u64,
) -> Result<HashSet<(String, u64)>, ModuleError> {
    let module = r.module;
    let na = m.wrapping_add(l.num_syms);
    let n = g.read_u32(na).map_err(|err| ModuleError::Read {
        module: module.to_string(),
        what: "num_syms",
        addr: na,
        err,
    })? as u64;
    let mut out = HashSet::new();
    if n == 0 {
        return Ok(out);
    }
    if n > MAX_MODULE_EXPORTS {
        return Err(ModuleError::TooMany {
            module: module.to_string(),
            what: "num_syms",
            count: n,
            max: MAX_MODULE_EXPORTS,
        });
    }
    let sa = m.wrapping_add(l.syms);
    let syms = g.read_u64(sa).map_err(|err| ModuleError::Read {
        module: module.to_string(),
        what: "syms",
        addr: sa,
        err,
    })?;
    let syms = kernel_ptr(module, "syms", syms)?;
    let (size, voff, noff, relative) = match l.ksym {
        KernelSymbolLayout::Relative { size, value, name } => (size, value, name, true),
        KernelSymbolLayout::Absolute { size, value, name } => (size, value, name, false),
    };
    let bytes = r.read(syms, n * size, "export table")?;
    for i in 0..n {
        let at = i * size;
        let get = |off: u64, len: usize| -> Option<&[u8]> {
            let s = usize::try_from(at + off).ok()?;
            bytes.get(s..s + len)
        };
        let entry = syms + at;
        let (value, name_ptr) = if relative {
            let v = get(voff, 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            let s = get(noff, 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match (v, s) {
                (Some(v), Some(s)) => (
                    (entry + voff).wrapping_add(v as i64 as u64),
                    (entry + noff).wrapping_add(s as i64 as u64),
                ),
                _ => continue,
            }
        } else {
            let rd8 = |off| {
                get(off, 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
            };
            match (rd8(voff), rd8(noff)) {
                (Some(v), Some(s)) => (v, s),
                _ => continue,
            }
        };
        let name = r.cstr(name_ptr, KSYM_NAME_LEN - 1, "export name")?;
        out.insert((name, value));
    }
    Ok(out)
}

/// The symbols of the module at `struct module *m` named `module`, in table order, empty
/// names dropped (what `/proc/kallsyms` prints for it).
pub fn read_symbols_of(
    g: &dyn GuestAccess,
    l: &ModKallsymsLayout,
    m: u64,
    module: &str,
) -> Result<Vec<ModuleSymbol>, ModuleError> {
    let mut r = PageReader::new(g, module);
    let read_err = |what: &'static str, addr: u64| {
        move |err| ModuleError::Read {
            module: module.to_string(),
            what,
            addr,
            err,
        }
    };
    let ka = m.wrapping_add(l.kallsyms);
    let ks = g.read_u64(ka).map_err(read_err("kallsyms", ka))?;
    let ks = kernel_ptr(module, "kallsyms", ks)?;
    let f = |off: u64| ks.wrapping_add(off);
    let symtab = g
        .read_u64(f(l.symtab))
        .map_err(read_err("kallsyms->symtab", f(l.symtab)))?;
    let n = g
        .read_u32(f(l.num_symtab))
        .map_err(read_err("kallsyms->num_symtab", f(l.num_symtab)))? as u64;
    let strtab = g
        .read_u64(f(l.strtab))
        .map_err(read_err("kallsyms->strtab", f(l.strtab)))?;
    let typetab = g
        .read_u64(f(l.typetab))
        .map_err(read_err("kallsyms->typetab", f(l.typetab)))?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_MODULE_SYMS {
        return Err(ModuleError::TooMany {
            module: module.to_string(),
            what: "kallsyms->num_symtab",
            count: n,
            max: MAX_MODULE_SYMS,
        });
    }
    let symtab = kernel_ptr(module, "kallsyms->symtab", symtab)?;
    let strtab = kernel_ptr(module, "kallsyms->strtab", strtab)?;
    let typetab = kernel_ptr(module, "kallsyms->typetab", typetab)?;
    let syms = r.read(symtab, n * l.sym.size, "symtab")?;
    let types = r.read(typetab, n, "typetab")?;
    let exported = exports(&mut r, g, l, m)?;
    let mut out = Vec::new();
    for i in 0..n as usize {
        let (Some(s), Some(&t)) = (raw_sym(&syms, &l.sym, i), types.get(i)) else {
            break;
        };
        let na = strtab
            .checked_add(u64::from(s.name))
            .ok_or_else(|| ModuleError::Corrupt {
                module: module.to_string(),
                what: format!("symbol {i}: name offset {:#x} wraps around", s.name),
            })?;
        let name = r.cstr(na, KSYM_NAME_LEN - 1, "symbol name")?;
        if name.is_empty() {
            continue;
        }
        let is_exp = exported.contains(&(name.clone(), s.value));
        let t = t as char;
        out.push(ModuleSymbol {
            addr: s.value,
            kind: if is_exp {
                t.to_ascii_uppercase()
            } else {
                t.to_ascii_lowercase()
            },
            name,
            module: module.to_string(),
            exported: is_exp,
            defined: s.shndx != SHN_UNDEF,
        });
    }
    Ok(out)
}

/// The symbols of every formed module, in `/proc/kallsyms` order.
pub fn read_module_symbols(
    g: &dyn GuestAccess,
    l: &ModuleLayout,
) -> Result<Vec<ModuleSymbol>, ModuleError> {
    let kl = l.kallsyms.as_ref().ok_or(ModuleError::NoKallsymsLayout)?;
    let mut out = Vec::new();
    for m in module_addrs(g, l)? {
        let mo = crate::modules::read_module_name(g, l, m)?;
        out.extend(read_symbols_of(g, kl, m, &mo)?);
    }
    Ok(out)
}

/// Address of `name` among the defined symbols of one module's table, with klp's `sympos`
/// rule ([`crate::pick_sympos`]: 0 or `None` requires a unique name).
pub fn lookup_in(
    syms: &[ModuleSymbol],
    module: &str,
    name: &str,
    sympos: Option<u32>,
) -> Result<u64, ModuleError> {
    let addrs: Vec<u64> = syms
        .iter()
        .filter(|s| s.defined && s.name == name)
        .map(|s| s.addr)
        .collect();
    let i = crate::pick_sympos(name, &addrs, u64::from(sympos.unwrap_or(0))).map_err(|source| {
        ModuleError::Symbol {
            module: module.to_string(),
            source,
        }
    })?;
    Ok(addrs[i])
}

/// The size of the defined symbol at `addr` in one module's table, the way
/// `find_kallsyms_symbol` bounds it: the distance to the next higher defined, named symbol
/// of that module, or to the end of the module region holding `addr`. `None` when `addr` is
/// in none of the module's regions.
pub fn symbol_size(syms: &[ModuleSymbol], module: &Module, addr: u64) -> Option<u64> {
    let region = module.region_of(addr)?;
    let next = syms
        .iter()
        .filter(|s| s.defined && s.module == module.name && s.addr > addr && s.addr < region.end)
        .map(|s| s.addr)
        .min()
        .unwrap_or(region.end);
    Some(next - addr)
}

impl crate::Kernel {
    /// The symbols of every loaded module, read now from the guest, exactly as the module
    /// lines of `/proc/kallsyms` list them (`addr type name [module]`).
    pub fn module_symbols(
        &self,
        mem: &dyn crate::PhysMemory,
    ) -> Result<Vec<ModuleSymbol>, ModuleError> {
        let l = self.module_layout(mem)?;
        read_module_symbols(&crate::model::KernelGuest { kernel: self, mem }, l)
    }

    /// The symbols of one loaded module (`/proc/kallsyms` order).
    pub fn symbols_of_module(
        &self,
        mem: &dyn crate::PhysMemory,
        module: &Module,
    ) -> Result<Vec<ModuleSymbol>, ModuleError> {
        let l = self.module_layout(mem)?;
        let kl = l.kallsyms.as_ref().ok_or(ModuleError::NoKallsymsLayout)?;
        let g = crate::model::KernelGuest { kernel: self, mem };
        read_symbols_of(&g, kl, module.addr, &module.name)
    }

    /// Address of symbol `name` defined in module `module` (klp `sympos` semantics, counted
    /// within that module only), like `find_kallsyms_symbol_value` / `klp_find_object_symbol`.
    pub fn lookup_in_module(
        &self,
        mem: &dyn crate::PhysMemory,
        module: &str,
        name: &str,
        sympos: Option<u32>,
    ) -> Result<u64, ModuleError> {
        let m = self
            .modules(mem)?
            .into_iter()
            .find(|m| m.name == module)
            .ok_or_else(|| ModuleError::NoModule(module.to_string()))?;
        let syms = self.symbols_of_module(mem, &m)?;
        lookup_in(&syms, module, name, sympos)
    }
}
