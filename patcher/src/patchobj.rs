//! A patch object: one relocatable x86-64 ELF file compiled from one C file with
//! `hvpatch.h`. Parsing validates it, reads the `.hvpatch.*` metadata records and computes the
//! layout of its loadable sections into a code part (RX) and a data part (RW, NX).
//!
//! The layout does not depend on where the parts will live; [`crate::link`] applies the
//! relocations once the arena addresses are known.

use std::collections::BTreeMap;

use object::elf;
use object::read::elf::{ElfFile64, SectionHeader};
use object::{
    Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SectionIndex, SymbolSection,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Size of one `struct hvpatch_func` record.
const FUNC_RECORD: usize = 32;
/// Size of one `struct hvpatch_func_obj` record (`HVPATCH_FUNC_OBJ*`, `.hvpatch.funcs.obj`).
const FUNC_OBJ_RECORD: usize = 40;
/// Longest module name (`MODULE_NAME_LEN - 1`).
const MODULE_NAME_MAX: usize = 55;
/// Size of one `struct hvpatch_sympos` record.
const SYMPOS_RECORD: usize = 16;
/// Cap on metadata records (hostile input).
const MAX_RECORDS: usize = 4096;
/// Largest code or data part (the arena maps at most 2 MiB).
pub const MAX_PART: u64 = 2 << 20;

/// Errors reading a patch object.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ObjectError {
    /// Not an ELF file at all.
    #[error("{file}: not an ELF file (magic {magic})")]
    NotElf {
        /// File name.
        file: String,
        /// The first bytes, hex.
        magic: String,
    },
    /// ELF, but not an x86-64 little-endian relocatable object.
    #[error("{file}: not an x86-64 ELF relocatable object (.o): {what}")]
    WrongKind {
        /// File name.
        file: String,
        /// What is wrong.
        what: String,
    },
    /// The ELF is malformed.
    #[error("{file}: malformed ELF: {what}")]
    Malformed {
        /// File name.
        file: String,
        /// Details.
        what: String,
    },
    /// A loadable section we cannot load (exception tables, alternatives, constructors…).
    #[error("{file}: unsupported allocatable section {section} (only .text*, .rodata*, .data*, .bss* are loaded)")]
    UnsupportedSection {
        /// File name.
        file: String,
        /// Section name.
        section: String,
    },
    /// The `.hvpatch.*` metadata is malformed.
    #[error("{file}: bad patch metadata: {what}")]
    BadMetadata {
        /// File name.
        file: String,
        /// Details.
        what: String,
    },
    /// The object replaces no function.
    #[error("{file}: no HVPATCH_FUNC record: the object replaces nothing")]
    NoFunctions {
        /// File name.
        file: String,
    },
}

/// Which part of the arena a section goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    /// Executable, read-only.
    Code,
    /// Read-write, not executable.
    Data,
}

/// Where one loaded section is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Code or data part.
    pub part: Part,
    /// Byte offset inside the part.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Whether the section has file contents (false for .bss).
    pub has_data: bool,
}

/// One `HVPATCH_FUNC*` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncRecord {
    /// Name of the function to replace (a guest symbol).
    pub old_name: String,
    /// Its position among duplicates (0 = must be unique).
    pub sympos: u64,
    /// `HVPATCH_*` flags.
    pub flags: u64,
    /// Offset of the new function inside the code part.
    pub new_offset: u64,
    /// Name of the new function in the object, if it has one.
    pub new_name: String,
    /// Size of the new function in bytes (its ELF symbol size; else up to the next function
    /// symbol or the end of its section).
    pub new_size: u64,
    /// The object holding the old function: a kernel module's name (`HVPATCH_FUNC_OBJ*`), or
    /// `None` for vmlinux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// Layout of the loadable sections.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Size of the code part in bytes.
    pub code_size: u64,
    /// Size of the data part in bytes (sections, then GOT).
    pub data_size: u64,
    /// Placement of each loaded section, by section index.
    pub sections: BTreeMap<usize, Placement>,
    /// GOT slot (offset in the data part) of each symbol referenced through GOTPCREL*.
    pub got: BTreeMap<usize, u64>,
}

/// A parsed, validated patch object.
#[derive(Debug, Clone)]
pub struct PatchObject {
    /// Patch name: `HVPATCH_NAME`, else the file name without `.o`.
    pub name: String,
    /// File name it was loaded from.
    pub file_name: String,
    /// `HVPATCH_KERNEL`, if any.
    pub kernel_release: Option<String>,
    /// Replaced functions.
    pub funcs: Vec<FuncRecord>,
    /// `HVPATCH_SYMPOS` entries: undefined symbol name → position.
    pub sympos: BTreeMap<String, u64>,
    /// Undefined symbols (resolved in the guest), sorted.
    pub undefined: Vec<String>,
    /// Section layout.
    pub layout: Layout,
    /// `HVPATCH_PATCH_FLAGS` (`HVPATCH_IMMEDIATE`: the whole patch switches at once).
    pub flags: u64,
    /// Whether the object says its code keeps frame pointers (`hvpatch build` compiles with
    /// `-fno-omit-frame-pointer` and marks the object), so that stacks through it unwind.
    pub frame_pointers: bool,
    /// The object bytes.
    pub bytes: Vec<u8>,
}

impl PatchObject {
    /// The kernel modules the patch names (`HVPATCH_FUNC_OBJ*` records and `module:symbol`
    /// undefined names), sorted, without duplicates.
    pub fn modules(&self) -> Vec<String> {
        let mut m: std::collections::BTreeSet<String> =
            self.funcs.iter().filter_map(|f| f.object.clone()).collect();
        m.extend(
            self.undefined
                .iter()
                .filter_map(|u| u.split_once(':').map(|(o, _)| o.to_string()))
                .filter(|o| !o.is_empty() && o != "vmlinux"),
        );
        m.into_iter().collect()
    }
}

/// The relocation types the linker understands.
pub const SUPPORTED_RELOCS: &[u32] = &[
    elf::R_X86_64_NONE,
    elf::R_X86_64_64,
    elf::R_X86_64_PC32,
    elf::R_X86_64_PLT32,
    elf::R_X86_64_32,
    elf::R_X86_64_32S,
    elf::R_X86_64_PC64,
    elf::R_X86_64_GOTPCREL,
    elf::R_X86_64_GOTPCRELX,
    elf::R_X86_64_REX_GOTPCRELX,
];

/// Whether a relocation type uses a GOT slot.
pub fn is_got_reloc(r_type: u32) -> bool {
    matches!(
        r_type,
        elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX
    )
}

/// What to do with a section.
enum SectionUse {
    Load(Part),
    Metadata,
    Skip,
}

fn classify(name: &str, sh_type: u32, sh_flags: u64) -> Result<SectionUse, ()> {
    if name.starts_with(".hvpatch.") {
        return Ok(SectionUse::Metadata);
    }
    if sh_flags & u64::from(elf::SHF_ALLOC) == 0 {
        return Ok(SectionUse::Skip);
    }
    if sh_type == elf::SHT_NOTE || name == ".eh_frame" || name == ".note.GNU-stack" {
        return Ok(SectionUse::Skip);
    }
    if sh_type != elf::SHT_PROGBITS && sh_type != elf::SHT_NOBITS {
        return Err(());
    }
    let is = |p: &str| name == p || name.starts_with(&format!("{p}."));
    if is(".text") {
        Ok(SectionUse::Load(Part::Code))
    } else if is(".rodata") || is(".data") || is(".bss") || name.starts_with(".rodata.str") {
        Ok(SectionUse::Load(Part::Data))
    } else {
        Err(())
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    let a = a.max(1);
    if !a.is_power_of_two() {
        return None;
    }
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

impl PatchObject {
    /// Validates `bytes` as a patch object and computes its layout. `file_name` names it in
    /// errors and is the default patch name.
    pub fn parse(bytes: &[u8], file_name: &str) -> Result<Self, ObjectError> {
        let file = file_name.to_string();
        let malformed = |what: String| ObjectError::Malformed {
            file: file.clone(),
            what,
        };
        let wrong = |what: &str| ObjectError::WrongKind {
            file: file.clone(),
            what: what.into(),
        };
        if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
            let magic = bytes
                .iter()
                .take(4)
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            return Err(ObjectError::NotElf { file, magic });
        }
        if bytes.get(4) != Some(&elf::ELFCLASS64) {
            return Err(wrong("not ELFCLASS64 (32-bit object?)"));
        }
        if bytes.get(5) != Some(&elf::ELFDATA2LSB) {
            return Err(wrong("not little-endian"));
        }
        let e_type = bytes.get(16..18).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let e_machine = bytes.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if e_machine != Some(elf::EM_X86_64) {
            return Err(wrong(&format!(
                "e_machine is {e_machine:?}, not EM_X86_64 (62)"
            )));
        }
        if e_type != Some(elf::ET_REL) {
            let t = match e_type {
                Some(elf::ET_EXEC) => "an executable (ET_EXEC)".to_string(),
                Some(elf::ET_DYN) => "a shared object / PIE (ET_DYN)".to_string(),
                other => format!("e_type {other:?}"),
            };
            return Err(wrong(&format!(
                "it is {t}; build the patch with `hvpatch build` (gcc -c)"
            )));
        }
        let elf = ElfFile64::<Endianness>::parse(bytes).map_err(|e| malformed(e.to_string()))?;
        let endian = elf.endian();

        // Sections: classify and lay out.
        let mut layout = Layout::default();
        let mut meta: BTreeMap<String, SectionIndex> = BTreeMap::new();
        let mut loads: Vec<(SectionIndex, Part, u64, u64, bool)> = Vec::new();
        for s in elf.sections() {
            let name = s.name().map_err(|e| malformed(e.to_string()))?.to_string();
            let hdr = s.elf_section_header();
            let sh_type = hdr.sh_type(endian);
            let sh_flags = hdr.sh_flags(endian);
            match classify(&name, sh_type, sh_flags) {
                Ok(SectionUse::Load(part)) => loads.push((
                    s.index(),
                    part,
                    s.size(),
                    s.align(),
                    sh_type != elf::SHT_NOBITS,
                )),
                Ok(SectionUse::Metadata) => {
                    meta.insert(name, s.index());
                }
                Ok(SectionUse::Skip) => {}
                Err(()) => {
                    return Err(ObjectError::UnsupportedSection {
                        file,
                        section: name,
                    });
                }
            }
        }
        let mut code_end = 0u64;
        let mut data_end = 0u64;
        for (part, end) in [(Part::Code, &mut code_end), (Part::Data, &mut data_end)] {
            // Sections with contents first, then .bss-like ones.
            let mut order: Vec<_> = loads.iter().filter(|l| l.1 == part).collect();
            order.sort_by_key(|l| !l.4);
            for &&(idx, _, size, align, has_data) in &order {
                let off = align_up(*end, align)
                    .ok_or_else(|| malformed(format!("bad alignment {align}")))?;
                *end = off
                    .checked_add(size)
                    .ok_or_else(|| malformed("section too large".into()))?;
                layout.sections.insert(
                    idx.0,
                    Placement {
                        part,
                        offset: off,
                        size,
                        has_data,
                    },
                );
            }
        }

        // Relocations of loaded sections: check types, collect GOT users and undefined symbols.
        let mut undefined = std::collections::BTreeSet::new();
        let mut got_syms = std::collections::BTreeSet::new();
        for &(idx, ..) in &loads {
            let s = elf
                .section_by_index(idx)
                .map_err(|e| malformed(e.to_string()))?;
            for (_, r) in s.relocations() {
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return Err(malformed("non-ELF relocation".into()));
                };
                if let RelocationTarget::Symbol(si) = r.target() {
                    let sym = elf
                        .symbol_by_index(si)
                        .map_err(|e| malformed(e.to_string()))?;
                    if sym.section() == SymbolSection::Undefined {
                        undefined.insert(
                            sym.name()
                                .map_err(|e| malformed(e.to_string()))?
                                .to_string(),
                        );
                    }
                    if is_got_reloc(r_type) {
                        got_syms.insert(si.0);
                    }
                }
            }
        }
        if !got_syms.is_empty() {
            data_end = align_up(data_end, 8).unwrap_or(data_end);
            for si in got_syms {
                layout.got.insert(si, data_end);
                data_end = data_end.saturating_add(8);
            }
        }
        if code_end > MAX_PART || data_end > MAX_PART {
            return Err(malformed(format!(
                "code part {code_end:#x} / data part {data_end:#x} bytes: larger than {MAX_PART:#x}"
            )));
        }
        layout.code_size = code_end;
        layout.data_size = data_end;

        // Metadata.
        let bad = |what: String| ObjectError::BadMetadata {
            file: file.clone(),
            what,
        };
        let meta_bytes = |name: &str| -> Result<Option<&[u8]>, ObjectError> {
            match meta.get(name) {
                None => Ok(None),
                Some(&i) => {
                    let s = elf
                        .section_by_index(i)
                        .map_err(|e| malformed(e.to_string()))?;
                    Ok(Some(s.data().map_err(|e| malformed(e.to_string()))?))
                }
            }
        };
        let cstr = |b: &[u8]| -> Result<String, ObjectError> {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            let s =
                std::str::from_utf8(&b[..end]).map_err(|_| bad("string is not UTF-8".into()))?;
            Ok(s.to_string())
        };
        let name = match meta_bytes(".hvpatch.name")? {
            Some(b) => cstr(b)?,
            None => file_name
                .rsplit('/')
                .next()
                .unwrap_or(file_name)
                .trim_end_matches(".o")
                .to_string(),
        };
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(bad(format!(
                "patch name {name:?} must be 1-64 printable ASCII characters"
            )));
        }
        let kernel_release = meta_bytes(".hvpatch.kernel")?.map(cstr).transpose()?;

        // Pointer fields of records: (record section offset) → (target section, offset).
        let pointers =
            |sec: &str| -> Result<BTreeMap<u64, (SectionIndex, u64, String)>, ObjectError> {
                let mut m = BTreeMap::new();
                let Some(&i) = meta.get(sec) else {
                    return Ok(m);
                };
                let s = elf
                    .section_by_index(i)
                    .map_err(|e| malformed(e.to_string()))?;
                for (off, r) in s.relocations() {
                    if r.flags()
                        != (RelocationFlags::Elf {
                            r_type: elf::R_X86_64_64,
                        })
                    {
                        return Err(bad(format!(
                            "{sec}+{off:#x}: relocation is not R_X86_64_64"
                        )));
                    }
                    let RelocationTarget::Symbol(si) = r.target() else {
                        return Err(bad(format!("{sec}+{off:#x}: relocation without symbol")));
                    };
                    let sym = elf
                        .symbol_by_index(si)
                        .map_err(|e| malformed(e.to_string()))?;
                    let SymbolSection::Section(ts) = sym.section() else {
                        return Err(bad(format!(
                            "{sec}+{off:#x}: points to {:?}, which is not defined in this object",
                            sym.name().unwrap_or("?")
                        )));
                    };
                    let target = (sym.address() as i64).wrapping_add(r.addend()) as u64;
                    let sname = if sym.kind() == object::SymbolKind::Section {
                        // Static function referenced through its section: find its own symbol.
                        elf.symbols()
                            .find(|s| {
                                s.section() == SymbolSection::Section(ts)
                                    && s.address() == target
                                    && s.kind() == object::SymbolKind::Text
                            })
                            .and_then(|s| s.name().ok().map(str::to_string))
                            .unwrap_or_default()
                    } else {
                        sym.name().unwrap_or("").to_string()
                    };
                    m.insert(off, (ts, target, sname));
                }
                Ok(m)
            };
        let string_at = |ts: SectionIndex, off: u64| -> Result<String, ObjectError> {
            let s = elf
                .section_by_index(ts)
                .map_err(|e| malformed(e.to_string()))?;
            let d = s.data().map_err(|e| malformed(e.to_string()))?;
            let start = usize::try_from(off).ok().and_then(|o| d.get(o..));
            cstr(start.ok_or_else(|| bad(format!("string offset {off:#x} out of section")))?)
        };
        let u64_at = |d: &[u8], off: usize| -> u64 {
            d.get(off..off + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .unwrap_or(0)
        };

        let mut funcs = Vec::new();
        for (sec, rec) in [
            (".hvpatch.funcs", FUNC_RECORD),
            (".hvpatch.funcs.obj", FUNC_OBJ_RECORD),
        ] {
            let Some(d) = meta_bytes(sec)? else {
                continue;
            };
            if d.len() % rec != 0 || d.len() / rec > MAX_RECORDS {
                return Err(bad(format!("{sec} size {} is not n*{rec}", d.len())));
            }
            let ptrs = pointers(sec)?;
            for i in 0..d.len() / rec {
                let base = (i * rec) as u64;
                let (ns, noff, _) = ptrs
                    .get(&base)
                    .ok_or_else(|| bad(format!("function record {i}: old_name is not a string")))?;
                let old_name = string_at(*ns, *noff)?;
                let (fs, foff, fname) = ptrs.get(&(base + 8)).ok_or_else(|| {
                    bad(format!(
                        "record for {old_name}: new_func is not a function here"
                    ))
                })?;
                let pl = layout
                    .sections
                    .get(&fs.0)
                    .filter(|p| p.part == Part::Code && *foff < p.size)
                    .ok_or_else(|| {
                        bad(format!(
                            "record for {old_name}: new function is not in .text"
                        ))
                    })?;
                if old_name.is_empty() {
                    return Err(bad(format!("function record {i}: empty old name")));
                }
                let new_size = func_size(&elf, *fs, *foff, pl.size);
                let object = if rec == FUNC_OBJ_RECORD {
                    let (os, ooff, _) = ptrs.get(&(base + 32)).ok_or_else(|| {
                        bad(format!("record for {old_name}: object is not a string"))
                    })?;
                    let o = string_at(*os, *ooff)?;
                    if o.is_empty()
                        || o.len() > MODULE_NAME_MAX
                        || !o
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(bad(format!(
                            "record for {old_name}: object {o:?} is not a module name \
                             (1-{MODULE_NAME_MAX} of [A-Za-z0-9_-])"
                        )));
                    }
                    (o != "vmlinux").then_some(o)
                } else {
                    None
                };
                funcs.push(FuncRecord {
                    old_name,
                    sympos: u64_at(d, i * rec + 16),
                    flags: u64_at(d, i * rec + 24),
                    new_offset: pl.offset + foff,
                    new_name: fname.clone(),
                    new_size,
                    object,
                });
            }
        }
        if funcs.is_empty() {
            return Err(ObjectError::NoFunctions { file });
        }
        {
            let mut seen = std::collections::BTreeSet::new();
            for f in &funcs {
                if !seen.insert((f.object.clone(), f.old_name.clone(), f.sympos)) {
                    return Err(bad(format!(
                        "{}{} (sympos {}) is replaced twice",
                        f.object
                            .as_deref()
                            .map_or(String::new(), |o| format!("{o}:")),
                        f.old_name,
                        f.sympos
                    )));
                }
            }
        }
        let mut sympos = BTreeMap::new();
        if let Some(d) = meta_bytes(".hvpatch.sympos")? {
            if d.len() % SYMPOS_RECORD != 0 || d.len() / SYMPOS_RECORD > MAX_RECORDS {
                return Err(bad(format!(
                    ".hvpatch.sympos size {} is not n*{SYMPOS_RECORD}",
                    d.len()
                )));
            }
            let ptrs = pointers(".hvpatch.sympos")?;
            for i in 0..d.len() / SYMPOS_RECORD {
                let (ns, noff, _) = ptrs
                    .get(&((i * SYMPOS_RECORD) as u64))
                    .ok_or_else(|| bad(format!("sympos record {i}: name is not a string")))?;
                let n = string_at(*ns, *noff)?;
                sympos.insert(n, u64_at(d, i * SYMPOS_RECORD + 8));
            }
        }
        let flags = meta_bytes(".hvpatch.flags")?
            .map(|d| {
                if d.len() != 8 {
                    return Err(bad(format!(".hvpatch.flags size {} is not 8", d.len())));
                }
                Ok(u64_at(d, 0))
            })
            .transpose()?
            .unwrap_or(0);
        let frame_pointers = meta_bytes(".hvpatch.unwind")?
            .map(cstr)
            .transpose()?
            .is_some_and(|s| s == "frame-pointer");
        Ok(Self {
            name,
            file_name: file,
            kernel_release,
            flags,
            frame_pointers,
            funcs,
            sympos,
            undefined: undefined.into_iter().collect(),
            layout,
            bytes: bytes.to_vec(),
        })
    }
}

/// Size of the function at `off` in section `sec` (`sec_size` bytes): its `STT_FUNC` symbol's
/// size, else the distance to the next function symbol in the section or the section's end.
fn func_size(elf: &ElfFile64<Endianness>, sec: SectionIndex, off: u64, sec_size: u64) -> u64 {
    let in_sec = || {
        elf.symbols()
            .filter(move |s| s.section() == SymbolSection::Section(sec))
            .filter(|s| s.kind() == object::SymbolKind::Text)
    };
    if let Some(s) = in_sec().find(|s| s.address() == off && s.size() > 0) {
        return s.size();
    }
    let next = in_sec()
        .map(|s| s.address())
        .filter(|&a| a > off)
        .min()
        .unwrap_or(sec_size);
    next.saturating_sub(off)
}
