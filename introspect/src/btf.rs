//! A small, zero-copy-style parser for the kernel's BTF (BPF Type Format) blob.
//!
//! The kernel embeds its own type information between `__start_BTF` and `__stop_BTF`. We read
//! that blob once from guest memory and answer "what is the size of struct X" and "at which
//! byte offset does member path `a.b.c` live" from it. Every structure offset used by the
//! product comes from here; nothing is hard-coded.
//!
//! The blob is guest-controlled: every length and index is bounds-checked, type chains are
//! walked with a depth cap, and malformed input yields [`BtfError`], never a panic.

use std::collections::HashMap;

use thiserror::Error;

/// Largest BTF blob we accept (the 6.12 vmlinux blob is ~4.6 MiB).
pub const MAX_BTF_SIZE: usize = 64 << 20;
/// Largest number of types we index.
pub const MAX_TYPES: usize = 4 << 20;
/// Cap on type-reference chains (typedef -> const -> ...) and nested anonymous members.
const MAX_DEPTH: usize = 32;

const BTF_MAGIC: u16 = 0xeb9f;

/// BTF type kinds (`BTF_KIND_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// `void` (type id 0 only).
    Void = 0,
    /// Integer.
    Int = 1,
    /// Pointer.
    Ptr = 2,
    /// Array.
    Array = 3,
    /// Struct.
    Struct = 4,
    /// Union.
    Union = 5,
    /// Enum (32-bit values).
    Enum = 6,
    /// Forward declaration.
    Fwd = 7,
    /// Typedef.
    Typedef = 8,
    /// `volatile` modifier.
    Volatile = 9,
    /// `const` modifier.
    Const = 10,
    /// `restrict` modifier.
    Restrict = 11,
    /// Function.
    Func = 12,
    /// Function prototype.
    FuncProto = 13,
    /// Variable.
    Var = 14,
    /// Data section.
    Datasec = 15,
    /// Floating point type.
    Float = 16,
    /// Declaration tag.
    DeclTag = 17,
    /// Type tag.
    TypeTag = 18,
    /// Enum (64-bit values).
    Enum64 = 19,
}

impl Kind {
    fn from_raw(k: u32) -> Option<Kind> {
        Some(match k {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Size in bytes of the kind-specific data following the 12-byte `btf_type` header.
    fn extra_len(self, vlen: u32) -> Option<usize> {
        let vlen = vlen as usize;
        Some(match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => vlen.checked_mul(12)?,
            Kind::Enum | Kind::FuncProto => vlen.checked_mul(8)?,
            _ => 0,
        })
    }
}

/// Errors from parsing or querying BTF.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BtfError {
    /// The blob is too short, has the wrong magic or inconsistent section bounds.
    #[error("bad BTF header: {0}")]
    BadHeader(&'static str),
    /// The blob is larger than [`MAX_BTF_SIZE`].
    #[error("BTF blob of {0} bytes is too large")]
    TooLarge(usize),
    /// A type record is truncated or has an unknown kind.
    #[error("malformed BTF type #{id}: {what}")]
    BadType {
        /// Type id of the offending record.
        id: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// More than [`MAX_TYPES`] types.
    #[error("too many BTF types")]
    TooManyTypes,
    /// No struct/union with that name.
    #[error("no struct or union named `{0}` in BTF")]
    UnknownStruct(String),
    /// The member path does not exist.
    #[error("`{ty}` has no member `{member}`")]
    UnknownMember {
        /// The containing type.
        ty: String,
        /// The member path component that was not found.
        member: String,
    },
    /// The member is a bitfield or not byte-aligned.
    #[error("member `{0}` is a bitfield")]
    Bitfield(String),
    /// A path component goes through something that is not a struct or union.
    #[error("`{0}` is not a struct or union")]
    NotComposite(String),
    /// A type id out of range or a reference chain that is too long or loops.
    #[error("bad type reference {0}")]
    BadRef(u32),
    /// The size of a type cannot be computed (void, function, overflow).
    #[error("type {0} has no size")]
    NoSize(u32),
}

/// A member found by [`Btf::member`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outermost struct.
    pub offset: u64,
    /// Type id of the member (unresolved: may be a typedef or modifier).
    pub type_id: u32,
    /// Size in bytes of the member's type.
    pub size: u64,
}

/// A decoded `btf_type` record.
#[derive(Debug, Clone, Copy)]
struct TypeRec {
    name_off: u32,
    kind: Kind,
    vlen: u32,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Offset of the kind-specific data in `types` section bytes.
    extra: usize,
}

/// Parsed BTF: the raw blob plus an index of type records.
#[derive(Debug, Clone)]
pub struct Btf {
    data: Vec<u8>,
    /// Byte range of the string section within `data`.
    strs_start: usize,
    strs_end: usize,
    /// Offset of each type record within `data`; index = type id (0 = void placeholder).
    offsets: Vec<u32>,
    /// Struct/union name -> first type id with that name.
    by_name: HashMap<String, u32>,
}

fn rd_u32(data: &[u8], off: usize) -> Option<u32> {
    let b = data.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn rd_u16(data: &[u8], off: usize) -> Option<u16> {
    let b = data.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

impl Btf {
    /// Parses a BTF blob (header, type section, string section).
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        if data.len() > MAX_BTF_SIZE {
            return Err(BtfError::TooLarge(data.len()));
        }
        let magic = rd_u16(&data, 0).ok_or(BtfError::BadHeader("truncated"))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::BadHeader("bad magic"));
        }
        let hdr_len = rd_u32(&data, 4).ok_or(BtfError::BadHeader("truncated"))? as usize;
        if hdr_len < 24 || hdr_len > data.len() {
            return Err(BtfError::BadHeader("bad hdr_len"));
        }
        let field = |o| {
            rd_u32(&data, o)
                .map(|v| v as usize)
                .ok_or(BtfError::BadHeader("truncated"))
        };
        let (type_off, type_len, str_off, str_len) =
            (field(8)?, field(12)?, field(16)?, field(20)?);
        let section = |off: usize, len: usize| -> Result<(usize, usize), BtfError> {
            let s = hdr_len
                .checked_add(off)
                .ok_or(BtfError::BadHeader("overflow"))?;
            let e = s.checked_add(len).ok_or(BtfError::BadHeader("overflow"))?;
            if e > data.len() {
                return Err(BtfError::BadHeader("section out of bounds"));
            }
            Ok((s, e))
        };
        let (types_start, types_end) = section(type_off, type_len)?;
        let (strs_start, strs_end) = section(str_off, str_len)?;

        let mut btf = Btf {
            data,
            strs_start,
            strs_end,
            offsets: vec![0],
            by_name: HashMap::new(),
        };
        let mut pos = types_start;
        while pos < types_end {
            let id = u32::try_from(btf.offsets.len()).map_err(|_| BtfError::TooManyTypes)?;
            if btf.offsets.len() > MAX_TYPES {
                return Err(BtfError::TooManyTypes);
            }
            let off32 = u32::try_from(pos).map_err(|_| BtfError::TooManyTypes)?;
            let rec = btf.decode_at(pos, id)?;
            let len = rec
                .kind
                .extra_len(rec.vlen)
                .and_then(|x| x.checked_add(12))
                .ok_or(BtfError::BadType {
                    id,
                    what: "length overflow",
                })?;
            let next = pos.checked_add(len).ok_or(BtfError::BadType {
                id,
                what: "length overflow",
            })?;
            if next > types_end {
                return Err(BtfError::BadType {
                    id,
                    what: "truncated",
                });
            }
            btf.offsets.push(off32);
            if matches!(rec.kind, Kind::Struct | Kind::Union) && rec.name_off != 0 {
                if let Some(name) = btf.str_at(rec.name_off) {
                    if !btf.by_name.contains_key(name) {
                        let name = name.to_owned();
                        btf.by_name.insert(name, id);
                    }
                }
            }
            pos = next;
        }
        Ok(btf)
    }

    fn decode_at(&self, pos: usize, id: u32) -> Result<TypeRec, BtfError> {
        let bad = |what| BtfError::BadType { id, what };
        let name_off = rd_u32(&self.data, pos).ok_or(bad("truncated"))?;
        let info = rd_u32(&self.data, pos + 4).ok_or(bad("truncated"))?;
        let size_or_type = rd_u32(&self.data, pos + 8).ok_or(bad("truncated"))?;
        let kind = Kind::from_raw((info >> 24) & 0x1f).ok_or(bad("unknown kind"))?;
        Ok(TypeRec {
            name_off,
            kind,
            vlen: info & 0xffff,
            kind_flag: info >> 31 != 0,
            size_or_type,
            extra: pos + 12,
        })
    }

    fn rec(&self, id: u32) -> Result<TypeRec, BtfError> {
        let pos = *self
            .offsets
            .get(id as usize)
            .filter(|_| id != 0)
            .ok_or(BtfError::BadRef(id))?;
        self.decode_at(pos as usize, id)
    }

    /// Number of types (including the implicit `void` with id 0).
    pub fn type_count(&self) -> usize {
        self.offsets.len()
    }

    /// The NUL-terminated string at `off` in the string section.
    pub fn str_at(&self, off: u32) -> Option<&str> {
        let start = self.strs_start.checked_add(off as usize)?;
        if start >= self.strs_end {
            return None;
        }
        let s = self.data.get(start..self.strs_end)?;
        let end = s.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&s[..end]).ok()
    }

    /// Name of type `id` ("" if anonymous or invalid).
    pub fn type_name(&self, id: u32) -> &str {
        self.rec(id)
            .ok()
            .and_then(|r| self.str_at(r.name_off))
            .unwrap_or("")
    }

    /// Kind of type `id`.
    pub fn kind(&self, id: u32) -> Result<Kind, BtfError> {
        if id == 0 {
            return Ok(Kind::Void);
        }
        Ok(self.rec(id)?.kind)
    }

    /// Type id of the struct or union called `name`.
    pub fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| BtfError::UnknownStruct(name.to_owned()))
    }

    /// Value of the enumerator `name` (searched in every ENUM and ENUM64 type).
    pub fn enum_value(&self, name: &str) -> Option<i64> {
        for id in 1..self.offsets.len() as u32 {
            let Ok(r) = self.rec(id) else { continue };
            let (stride, wide) = match r.kind {
                Kind::Enum => (8, false),
                Kind::Enum64 => (12, true),
                _ => continue,
            };
            for i in 0..r.vlen as usize {
                let e = r.extra + i * stride;
                let Some(n) = rd_u32(&self.data, e) else {
                    break;
                };
                if self.str_at(n) != Some(name) {
                    continue;
                }
                let lo = rd_u32(&self.data, e + 4)?;
                return Some(if wide {
                    let hi = rd_u32(&self.data, e + 8)?;
                    ((hi as u64) << 32 | lo as u64) as i64
                } else if r.kind_flag {
                    lo as i32 as i64
                } else {
                    lo as i64
                });
            }
        }
        None
    }

    /// Follows typedefs and modifiers (const, volatile, restrict, type tags) to the real type.
    pub fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_DEPTH {
            if id == 0 {
                return Ok(0);
            }
            let r = self.rec(id)?;
            match r.kind {
                Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag => {
                    id = r.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::BadRef(id))
    }

    /// Size in bytes of type `id`.
    pub fn type_size(&self, id: u32) -> Result<u64, BtfError> {
        let mut mult: u64 = 1;
        let mut id = id;
        for _ in 0..MAX_DEPTH {
            id = self.resolve(id)?;
            if id == 0 {
                return Err(BtfError::NoSize(0));
            }
            let r = self.rec(id)?;
            match r.kind {
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec => {
                    return mult
                        .checked_mul(r.size_or_type as u64)
                        .ok_or(BtfError::NoSize(id))
                }
                Kind::Ptr => return mult.checked_mul(8).ok_or(BtfError::NoSize(id)),
                Kind::Array => {
                    let elem = rd_u32(&self.data, r.extra).ok_or(BtfError::BadRef(id))?;
                    let n = rd_u32(&self.data, r.extra + 8).ok_or(BtfError::BadRef(id))?;
                    mult = mult.checked_mul(n as u64).ok_or(BtfError::NoSize(id))?;
                    id = elem;
                }
                _ => return Err(BtfError::NoSize(id)),
            }
        }
        Err(BtfError::BadRef(id))
    }

    /// `sizeof(struct name)` (or union).
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let id = self.struct_id(name)?;
        self.type_size(id)
    }

    /// Byte offset of a member path like `"pid"`, `"thread.sp"` or `"name.release"` within
    /// struct/union `name`. Anonymous struct/union members are searched transparently.
    /// Fails on bitfields and unknown members.
    pub fn member_offset(&self, name: &str, path: &str) -> Result<u64, BtfError> {
        Ok(self.member(name, path)?.offset)
    }

    /// Like [`Btf::member_offset`] but also returns the member's type and size.
    pub fn member(&self, name: &str, path: &str) -> Result<Member, BtfError> {
        let mut ty = self.struct_id(name)?;
        let mut ty_name = name.to_owned();
        let mut offset: u64 = 0;
        let mut last = None;
        for comp in path.split('.') {
            let (off, mid) =
                self.find_member(ty, comp, 0)?
                    .ok_or_else(|| BtfError::UnknownMember {
                        ty: ty_name.clone(),
                        member: comp.to_owned(),
                    })?;
            offset = offset.checked_add(off).ok_or(BtfError::BadRef(mid))?;
            last = Some(mid);
            ty = mid;
            ty_name = comp.to_owned();
        }
        let type_id = last.ok_or_else(|| BtfError::UnknownMember {
            ty: name.to_owned(),
            member: String::new(),
        })?;
        Ok(Member {
            offset,
            type_id,
            size: self.type_size(type_id)?,
        })
    }

    /// Searches `ty` (after resolving) for member `name`, descending into anonymous members.
    /// Returns (byte offset, member type id).
    fn find_member(
        &self,
        ty: u32,
        name: &str,
        depth: usize,
    ) -> Result<Option<(u64, u32)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::BadRef(ty));
        }
        let id = self.resolve(ty)?;
        let r = if id == 0 { None } else { Some(self.rec(id)?) };
        let r = match r {
            Some(r) if matches!(r.kind, Kind::Struct | Kind::Union) => r,
            _ => return Err(BtfError::NotComposite(self.type_name(id).to_owned())),
        };
        for i in 0..r.vlen as usize {
            let m = r.extra + i * 12;
            let bad = || BtfError::BadType {
                id,
                what: "truncated member",
            };
            let m_name = rd_u32(&self.data, m).ok_or_else(bad)?;
            let m_type = rd_u32(&self.data, m + 4).ok_or_else(bad)?;
            let m_off = rd_u32(&self.data, m + 8).ok_or_else(bad)?;
            let (bits, bitfield_size) = if r.kind_flag {
                (m_off & 0xff_ffff, m_off >> 24)
            } else {
                (m_off, 0)
            };
            if m_name == 0 {
                // Anonymous struct/union: look inside.
                let inner = self.resolve(m_type)?;
                if inner != 0 && matches!(self.kind(inner)?, Kind::Struct | Kind::Union) {
                    if let Some((off, t)) = self.find_member(inner, name, depth + 1)? {
                        if bits % 8 != 0 {
                            return Err(BtfError::Bitfield(name.to_owned()));
                        }
                        return Ok(Some(((bits / 8) as u64 + off, t)));
                    }
                }
                continue;
            }
            if self.str_at(m_name) == Some(name) {
                if bitfield_size != 0 || bits % 8 != 0 {
                    return Err(BtfError::Bitfield(name.to_owned()));
                }
                return Ok(Some(((bits / 8) as u64, m_type)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: int, struct inner {int a; int b:3; int c}, struct outer
    /// { int x; union { int u; struct inner in; }; struct inner named; char arr[16]; }.
    pub(crate) fn sample() -> Vec<u8> {
        let strs = b"\0int\0inner\0a\0b\0c\0outer\0x\0u\0in\0named\0arr\0char\0";
        let s = |name: &str| -> u32 {
            let mut off = 0;
            for part in strs.split(|&b| b == 0) {
                if part == name.as_bytes() {
                    return off;
                }
                off += part.len() as u32 + 1;
            }
            panic!("{name}")
        };
        let mut t = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        // 1: int
        push(&[s("int"), 1 << 24, 4, 32]);
        // 2: struct inner (kind_flag for bitfield)
        push(&[s("inner"), (4 << 24) | (1 << 31) | 3, 12]);
        push(&[s("a"), 1, 0]);
        push(&[s("b"), 1, (3 << 24) | 32]);
        push(&[s("c"), 1, 64]);
        // 3: anonymous union { int u; struct inner in; }
        push(&[0, (5 << 24) | 2, 12]);
        push(&[s("u"), 1, 0]);
        push(&[s("in"), 2, 0]);
        // 4: struct outer
        push(&[s("outer"), (4 << 24) | 4, 44]);
        push(&[s("x"), 1, 0]);
        push(&[0, 3, 32]);
        push(&[s("named"), 2, 128]);
        push(&[s("arr"), 6, 224]);
        // 5: char
        push(&[s("char"), 1 << 24, 1, 8]);
        // 6: char[16]
        push(&[0, 3 << 24, 0, 5, 1, 16]);
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strs.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(strs);
        out
    }

    #[test]
    fn sample_queries() {
        let b = Btf::parse(sample()).unwrap();
        assert_eq!(b.struct_size("outer").unwrap(), 44);
        assert_eq!(b.struct_size("inner").unwrap(), 12);
        assert_eq!(b.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(b.member_offset("outer", "u").unwrap(), 4);
        assert_eq!(b.member_offset("outer", "in.c").unwrap(), 12);
        assert_eq!(b.member_offset("outer", "named.c").unwrap(), 24);
        assert_eq!(b.member("outer", "arr").unwrap().size, 16);
        assert_eq!(b.member_offset("outer", "arr").unwrap(), 28);
        assert_eq!(
            b.member_offset("outer", "named.b"),
            Err(BtfError::Bitfield("b".into()))
        );
        assert!(matches!(
            b.member_offset("outer", "nope"),
            Err(BtfError::UnknownMember { .. })
        ));
        assert!(matches!(
            b.member_offset("outer", "x.y"),
            Err(BtfError::NotComposite(_))
        ));
        assert!(matches!(
            b.struct_size("nope"),
            Err(BtfError::UnknownStruct(_))
        ));
    }

    #[test]
    fn header_errors() {
        assert!(Btf::parse(vec![]).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0]).is_err());
        let mut s = sample();
        s[12] = 0xff; // type_len huge
        assert!(Btf::parse(s).is_err());
    }

    /// A few thousand random mutations of a valid blob never panic or hang.
    #[test]
    fn fuzz_mutations() {
        let base = sample();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let mut d = base.clone();
            for _ in 0..(rnd() % 8 + 1) {
                let i = (rnd() as usize) % d.len();
                d[i] = rnd() as u8;
            }
            if rnd() % 8 == 0 {
                let n = (rnd() as usize) % d.len();
                d.truncate(n);
            }
            exercise(&d);
        }
    }

    /// Runs every query on a blob; used by the unit fuzz test and the cargo-fuzz target.
    pub(crate) fn exercise(d: &[u8]) {
        if let Ok(b) = Btf::parse(d.to_vec()) {
            for n in ["outer", "inner", "int"] {
                let _ = b.struct_size(n);
                for p in ["x", "u", "in.c", "named.b", "arr", "a.b.c"] {
                    let _ = b.member(n, p);
                }
            }
            for id in 0..b.type_count() as u32 + 2 {
                let _ = b.type_size(id);
                let _ = b.type_name(id);
            }
        }
    }
}
