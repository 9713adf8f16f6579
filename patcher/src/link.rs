//! The patch linker: applies the relocations of a [`PatchObject`] for given code/data base
//! addresses, resolving undefined symbols in the guest through a [`Resolver`].
//!
//! Return thunks: with `-mfunction-return=thunk-extern` every return is
//! `jmp __x86_return_thunk`. On 6.12 `__x86_return_thunk` itself is a WARN stub at runtime
//! (KERNEL-FACTS §4.1), so, like the kernel's `apply_returns()`, the linker asks the resolver
//! for the runtime return thunk (the guest's `x86_return_thunk` variable): `None` (no
//! mitigation) → the 5-byte jmp becomes `ret; int3; int3; int3; int3`; `Some(t)` → `jmp t`.

use object::elf;
use object::read::elf::ElfFile64;
use object::{
    Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SymbolSection,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use introspect::SymbolError;

use crate::patchobj::{is_got_reloc, Part, PatchObject, SUPPORTED_RELOCS};

/// Name of the kernel's compile-time return thunk.
pub const RETURN_THUNK: &str = "__x86_return_thunk";

/// Errors linking a patch.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// A symbol cannot be resolved in the guest's kallsyms: unknown, ambiguous without a
    /// sympos, or its sympos out of range ([`introspect::pick_sympos`]).
    #[error("guest kallsyms: {0}{hint}", hint = sympos_hint(.0))]
    Symbol(#[from] SymbolError),
    /// An unsupported relocation type.
    #[error("unsupported relocation type {r_type} at {section}+{offset:#x} (symbol {symbol})")]
    UnsupportedRelocation {
        /// ELF r_type.
        r_type: u32,
        /// Section name.
        section: String,
        /// Offset in the section.
        offset: u64,
        /// Symbol.
        symbol: String,
    },
    /// The value does not fit the relocation field.
    #[error("relocation {kind} at {section}+{offset:#x} against {symbol}: value {value:#x} out of range")]
    OutOfRange {
        /// Relocation kind.
        kind: &'static str,
        /// Section name.
        section: String,
        /// Offset.
        offset: u64,
        /// Symbol.
        symbol: String,
        /// Computed value.
        value: i128,
    },
    /// A relocation we cannot apply for another reason.
    #[error("relocation at {section}+{offset:#x} against {symbol}: {what}")]
    BadRelocation {
        /// Section name.
        section: String,
        /// Offset.
        offset: u64,
        /// Symbol.
        symbol: String,
        /// Why.
        what: String,
    },
    /// The object is malformed (it parsed before, so this is unexpected).
    #[error("malformed object: {0}")]
    Malformed(String),
    /// Reading the guest failed while resolving.
    #[error("reading the guest: {0}")]
    Guest(String),
    /// A symbol cannot be resolved in a kernel module the patch names: unknown there,
    /// ambiguous without a sympos, or its sympos out of range (counted within the module).
    #[error("module {module}: {source}{hint}", hint = sympos_hint(source))]
    ModuleSymbol {
        /// The module.
        module: String,
        /// The error.
        source: SymbolError,
    },
    /// A name is defined in more than one of the patch's modules.
    #[error("{name} is defined in modules {modules}: name the one meant with an asm label \"MODULE:{name}\"")]
    AmbiguousModules {
        /// The symbol.
        name: String,
        /// The modules, comma separated.
        modules: String,
    },
}

/// Resolves names in the guest kernel.
pub trait Resolver {
    /// Address of `name` by klp's sympos rule ([`introspect::pick_sympos`]): `sympos` 0 = the
    /// name must be unique, n ≥ 1 = the n-th occurrence in kallsyms order.
    fn resolve(&self, name: &str, sympos: u64) -> Result<u64, LinkError>;
    /// Address of `name` in `object` (a kernel module; `None` = [`Resolver::resolve`]), sympos
    /// counted within that object. Resolvers without modules refuse any object.
    fn resolve_in(&self, object: Option<&str>, name: &str, sympos: u64) -> Result<u64, LinkError> {
        match object {
            None => self.resolve(name, sympos),
            Some(o) => Err(LinkError::ModuleSymbol {
                module: o.to_string(),
                source: SymbolError::Unknown {
                    name: name.to_string(),
                },
            }),
        }
    }
    /// The guest's runtime return thunk: `None` when returns are plain `ret` (the kernel's
    /// `x86_return_thunk == __x86_return_thunk`), else the thunk to jump to.
    fn return_thunk(&self) -> Result<Option<u64>, LinkError>;
    /// Where the original body of guest function `name` continues after its patch site
    /// (`HVPATCH_ORIG`): the site address + 5.
    fn original_body(&self, name: &str, sympos: u64) -> Result<u64, LinkError> {
        let _ = sympos;
        Err(LinkError::Symbol(SymbolError::Unknown {
            name: format!("{ORIG_PREFIX}{name}"),
        }))
    }
}

/// Undefined symbols named `__hvpatch_orig_<fn>` (`HVPATCH_ORIG`) resolve to the original body
/// of `<fn>` past its patch site.
pub const ORIG_PREFIX: &str = "__hvpatch_orig_";

/// One replaced function after linking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedFunc {
    /// Replaced function name.
    pub old_name: String,
    /// Its sympos (0 = unique).
    pub sympos: u64,
    /// Its address in the guest.
    #[serde(with = "introspect::hex")]
    pub old_addr: u64,
    /// Address of the new function.
    #[serde(with = "introspect::hex")]
    pub new_addr: u64,
    /// Flags from the record.
    pub flags: u64,
    /// Size of the new function in bytes.
    #[serde(default)]
    pub new_size: u64,
    /// The kernel module holding the old function (`None`: vmlinux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// The linked images of a patch.
#[derive(Debug, Clone)]
pub struct Linked {
    /// Code part bytes (int3-padded), to be mapped RX at `code_base`.
    pub code: Vec<u8>,
    /// Data part bytes (zero-padded, .bss zeroed, GOT filled), mapped RW+NX at `data_base`.
    pub data: Vec<u8>,
    /// Replaced functions.
    pub funcs: Vec<LinkedFunc>,
    /// Number of return-thunk jumps rewritten.
    pub return_sites: usize,
}

fn fits_i32(v: i128) -> bool {
    v >= i128::from(i32::MIN) && v <= i128::from(i32::MAX)
}

/// Links `obj` for `code_base`/`data_base`.
pub fn link(
    obj: &PatchObject,
    r: &dyn Resolver,
    code_base: u64,
    data_base: u64,
) -> Result<Linked, LinkError> {
    let malformed = |e: object::Error| LinkError::Malformed(e.to_string());
    let elf = ElfFile64::<Endianness>::parse(&*obj.bytes).map_err(malformed)?;
    let lay = &obj.layout;
    let size =
        |n: u64| usize::try_from(n).map_err(|_| LinkError::Malformed("part too large".into()));
    let mut code = vec![0xccu8; size(lay.code_size)?];
    let mut data = vec![0u8; size(lay.data_size)?];
    let base_of = |p: Part| {
        if p == Part::Code {
            code_base
        } else {
            data_base
        }
    };

    // Copy section contents.
    for (&idx, pl) in &lay.sections {
        if !pl.has_data {
            let buf = if pl.part == Part::Code {
                &mut code
            } else {
                &mut data
            };
            let (o, n) = (size(pl.offset)?, size(pl.size)?);
            if let Some(b) = buf.get_mut(o..o + n) {
                b.fill(0);
            }
            continue;
        }
        let s = elf
            .section_by_index(object::SectionIndex(idx))
            .map_err(malformed)?;
        let d = s.data().map_err(malformed)?;
        let buf = if pl.part == Part::Code {
            &mut code
        } else {
            &mut data
        };
        let o = size(pl.offset)?;
        buf.get_mut(o..o + d.len())
            .ok_or_else(|| LinkError::Malformed("section outside its part".into()))?
            .copy_from_slice(d);
    }

    // Resolve a symbol to its runtime address.
    let mut resolved: std::collections::BTreeMap<usize, u64> = Default::default();
    let mut sym_addr = |si: object::SymbolIndex| -> Result<(u64, String), LinkError> {
        let sym = elf.symbol_by_index(si).map_err(malformed)?;
        let name = sym.name().unwrap_or("").to_string();
        if let Some(&a) = resolved.get(&si.0) {
            return Ok((a, name));
        }
        let a = match sym.section() {
            SymbolSection::Section(sec) => {
                let pl = lay
                    .sections
                    .get(&sec.0)
                    .ok_or_else(|| LinkError::BadRelocation {
                        section: String::new(),
                        offset: 0,
                        symbol: name.clone(),
                        what: "refers to a section that is not loaded".into(),
                    })?;
                base_of(pl.part)
                    .wrapping_add(pl.offset)
                    .wrapping_add(sym.address())
            }
            SymbolSection::Absolute => sym.address(),
            SymbolSection::Undefined => {
                if let Some(orig) = name.strip_prefix(ORIG_PREFIX) {
                    // The sympos of the replaced function if this patch replaces it.
                    let pos = obj
                        .funcs
                        .iter()
                        .find(|f| f.old_name == orig)
                        .map(|f| f.sympos)
                        .or_else(|| obj.sympos.get(orig).copied())
                        .unwrap_or(0);
                    let a = r.original_body(orig, pos)?;
                    resolved.insert(si.0, a);
                    return Ok((a, name));
                }
                let pos = obj.sympos.get(&name).copied().unwrap_or(0);
                match r.resolve(&name, pos) {
                    Ok(a) => a,
                    Err(LinkError::Symbol(SymbolError::Unknown { .. })) if sym.is_weak() => 0,
                    Err(e) => return Err(e),
                }
            }
            other => {
                return Err(LinkError::BadRelocation {
                    section: String::new(),
                    offset: 0,
                    symbol: name,
                    what: format!(
                        "unsupported symbol kind {other:?} (common symbol? use -fno-common)"
                    ),
                })
            }
        };
        resolved.insert(si.0, a);
        Ok((a, name))
    };

    let mut return_sites = 0usize;
    let mut thunk: Option<Option<u64>> = None;
    for (&idx, pl) in &lay.sections {
        let s = elf
            .section_by_index(object::SectionIndex(idx))
            .map_err(malformed)?;
        let sname = s.name().unwrap_or("?").to_string();
        let sec_base = base_of(pl.part).wrapping_add(pl.offset);
        for (off, rel) in s.relocations() {
            let RelocationFlags::Elf { r_type } = rel.flags() else {
                return Err(LinkError::Malformed("non-ELF relocation".into()));
            };
            let (sym_value, symbol, got_slot) = match rel.target() {
                RelocationTarget::Symbol(si)
                    if elf
                        .symbol_by_index(si)
                        .is_ok_and(|s| s.is_undefined() && s.name() == Ok(RETURN_THUNK)) =>
                {
                    // Handled below through `Resolver::return_thunk`, never resolved by name.
                    (0, RETURN_THUNK.to_string(), lay.got.get(&si.0).copied())
                }
                RelocationTarget::Symbol(si) => {
                    let (a, n) = sym_addr(si).map_err(|e| match e {
                        LinkError::BadRelocation { symbol, what, .. } => LinkError::BadRelocation {
                            section: sname.clone(),
                            offset: off,
                            symbol,
                            what,
                        },
                        e => e,
                    })?;
                    (a, n, lay.got.get(&si.0).copied())
                }
                RelocationTarget::Absolute => (0, String::from("<abs>"), None),
                _ => {
                    return Err(LinkError::Malformed(format!(
                        "{sname}+{off:#x}: odd relocation target"
                    )))
                }
            };
            if !SUPPORTED_RELOCS.contains(&r_type) {
                return Err(LinkError::UnsupportedRelocation {
                    r_type,
                    section: sname,
                    offset: off,
                    symbol,
                });
            }
            if rel.has_implicit_addend() {
                return Err(LinkError::BadRelocation {
                    section: sname,
                    offset: off,
                    symbol,
                    what: "REL relocations (implicit addend) are not supported".into(),
                });
            }
            let a = rel.addend();
            let place = sec_base.wrapping_add(off);
            let buf = if pl.part == Part::Code {
                &mut code
            } else {
                &mut data
            };
            let at = usize::try_from(pl.offset.saturating_add(off)).unwrap_or(usize::MAX);
            let field_len = match r_type {
                elf::R_X86_64_64 | elf::R_X86_64_PC64 => 8,
                elf::R_X86_64_NONE => 0,
                _ => 4,
            };
            if off.saturating_add(field_len) > pl.size
                || at.checked_add(field_len as usize).is_none()
            {
                return Err(LinkError::BadRelocation {
                    section: sname,
                    offset: off,
                    symbol,
                    what: "field outside the section".into(),
                });
            }
            let oor = |kind: &'static str, value: i128| LinkError::OutOfRange {
                kind,
                section: sname.clone(),
                offset: off,
                symbol: symbol.clone(),
                value,
            };
            if symbol == RETURN_THUNK && !matches!(r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32)
            {
                return Err(LinkError::BadRelocation {
                    section: sname,
                    offset: off,
                    symbol,
                    what: "only jmp/jcc/call to __x86_return_thunk are supported".into(),
                });
            }
            let s_plus_a = i128::from(sym_value) + i128::from(a);
            match r_type {
                elf::R_X86_64_NONE => {}
                elf::R_X86_64_64 => {
                    buf[at..at + 8].copy_from_slice(&(s_plus_a as u64).to_le_bytes());
                }
                elf::R_X86_64_PC64 => {
                    let v = s_plus_a - i128::from(place);
                    buf[at..at + 8].copy_from_slice(&(v as u64).to_le_bytes());
                }
                elf::R_X86_64_32 => {
                    let v = s_plus_a & 0xffff_ffff_ffff_ffff;
                    if v > i128::from(u32::MAX) {
                        return Err(oor("R_X86_64_32", v));
                    }
                    buf[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
                }
                elf::R_X86_64_32S => {
                    // Sign-extended: the 64-bit value must be a sign-extended 32-bit one.
                    let v = i128::from((s_plus_a as u64) as i64);
                    if !fits_i32(v) {
                        return Err(oor("R_X86_64_32S", v));
                    }
                    buf[at..at + 4].copy_from_slice(&(v as i32).to_le_bytes());
                }
                elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                    let is_ret_thunk = symbol == RETURN_THUNK;
                    let opcode = if at >= 1 {
                        buf.get(at - 1).copied()
                    } else {
                        None
                    };
                    if is_ret_thunk && opcode == Some(0xe9) && a == -4 {
                        let t = match thunk {
                            Some(t) => t,
                            None => {
                                let t = r.return_thunk()?;
                                thunk = Some(t);
                                t
                            }
                        };
                        return_sites += 1;
                        match t {
                            None => {
                                buf[at - 1..at + 4]
                                    .copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
                                continue;
                            }
                            Some(t) => {
                                let v = i128::from(t) - 4 - i128::from(place);
                                if !fits_i32(v) {
                                    return Err(oor("return thunk jmp", v));
                                }
                                buf[at..at + 4].copy_from_slice(&(v as i32).to_le_bytes());
                                continue;
                            }
                        }
                    }
                    if is_ret_thunk {
                        // jcc/call to the return thunk: only valid with a real thunk.
                        let t = match thunk {
                            Some(t) => t,
                            None => {
                                let t = r.return_thunk()?;
                                thunk = Some(t);
                                t
                            }
                        };
                        let Some(t) = t else {
                            return Err(LinkError::BadRelocation {
                                section: sname,
                                offset: off,
                                symbol,
                                what: "non-jmp use of __x86_return_thunk on a guest without return thunk \
                                       (cannot be turned into ret in place)"
                                    .into(),
                            });
                        };
                        let v = i128::from(t) + i128::from(a) - i128::from(place);
                        if !fits_i32(v) {
                            return Err(oor("PC32", v));
                        }
                        buf[at..at + 4].copy_from_slice(&(v as i32).to_le_bytes());
                        continue;
                    }
                    let v = s_plus_a - i128::from(place);
                    if !fits_i32(v) {
                        return Err(oor(
                            if r_type == elf::R_X86_64_PC32 {
                                "R_X86_64_PC32"
                            } else {
                                "R_X86_64_PLT32"
                            },
                            v,
                        ));
                    }
                    buf[at..at + 4].copy_from_slice(&(v as i32).to_le_bytes());
                }
                t if is_got_reloc(t) => {
                    let slot =
                        got_slot.ok_or_else(|| LinkError::Malformed("GOT slot missing".into()))?;
                    let slot_addr = data_base.wrapping_add(slot);
                    let v = i128::from(slot_addr) + i128::from(a) - i128::from(place);
                    if !fits_i32(v) {
                        return Err(oor("R_X86_64_GOTPCREL", v));
                    }
                    buf[at..at + 4].copy_from_slice(&(v as i32).to_le_bytes());
                    let so =
                        usize::try_from(slot).map_err(|_| LinkError::Malformed("GOT".into()))?;
                    data.get_mut(so..so + 8)
                        .ok_or_else(|| LinkError::Malformed("GOT slot outside data".into()))?
                        .copy_from_slice(&sym_value.to_le_bytes());
                }
                _ => unreachable!("checked against SUPPORTED_RELOCS"),
            }
        }
    }

    let mut funcs = Vec::new();
    for f in &obj.funcs {
        let old_addr = r.resolve_in(f.object.as_deref(), &f.old_name, f.sympos)?;
        funcs.push(LinkedFunc {
            old_name: f.old_name.clone(),
            sympos: f.sympos,
            old_addr,
            new_addr: code_base.wrapping_add(f.new_offset),
            flags: f.flags,
            new_size: f.new_size,
            object: f.object.clone(),
        });
    }
    Ok(Linked {
        code,
        data,
        funcs,
        return_sites,
    })
}

/// Picks the address for `name` among `addrs` (all kallsyms entries of that name, in kallsyms
/// order) by klp's sympos rule, [`introspect::pick_sympos`].
pub fn pick_sympos(name: &str, addrs: &[u64], sympos: u64) -> Result<u64, LinkError> {
    Ok(addrs[introspect::pick_sympos(name, addrs, sympos)?])
}

/// How a patch names a symbol's position, for an ambiguous name.
fn sympos_hint(e: &SymbolError) -> &'static str {
    match e {
        SymbolError::Ambiguous { .. } => {
            " (in the patch: HVPATCH_SYMPOS(name, n) or HVPATCH_FUNC_POS)"
        }
        _ => "",
    }
}
