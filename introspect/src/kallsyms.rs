//! Finding and decoding the kernel's kallsyms tables in guest-physical RAM, without symbols.
//!
//! Method (KERNEL-FACTS §1.5): find the token table by its `"0\0".."9\0"` run, confirm it with
//! `kallsyms_token_index`, find `kallsyms_num_syms`/`names`/`markers` below it, decide the table
//! order (6.1 "old" vs 6.12 "new"), then locate `offsets`, `relative_base` and
//! `seqs_of_names` and decode every symbol.
//!
//! The parser ([`parse`]) works on one byte slice holding the region around the tables and is
//! safe on arbitrary input: every length and index is checked and every loop is bounded by the
//! slice length.

use memchr::memmem;
use serde::{Deserialize, Serialize};

use crate::error::KallsymsError;
use crate::memory::PhysMemory;
use crate::symbols::{RawSymbol, Symbols};

/// Entries 0x30..=0x39 of the token table (`"0\0".."9\0"`).
const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
/// Longest token accepted (real compressor tokens are a few bytes).
const MAX_TOKEN_LEN: usize = 255;
/// Longest expanded symbol (type char + name) accepted; the kernel's KSYM_NAME_LEN is 512.
pub const MAX_NAME_LEN: usize = 1024;
/// Largest total size of decoded names (bounds memory use on hostile tables).
pub const MAX_NAMES_BYTES: usize = 256 << 20;
/// Largest symbol count accepted (`seqs_of_names` holds 24-bit indices).
pub const MAX_SYMS: u32 = 1 << 24;
/// Most token-table candidates examined in one scan (bounds the work a hostile guest can cause
/// by planting fake tables).
pub const MAX_CANDIDATES: usize = 16;
/// Most `kallsyms_names` entries stepped over while searching for `num_syms` below one token
/// table (the real walk needs `num_syms` steps; crafted memory could otherwise make the search
/// quadratic).
const WALK_BUDGET: u64 = 4 * MAX_SYMS as u64;
/// Most digit-run hits validated in one scan.
pub const MAX_HITS: usize = 1 << 16;
/// Chunk size of the RAM scan.
const SCAN_CHUNK: usize = 1 << 20;
/// Bytes read below / above the token table for the first parse attempt, then the retry.
const WINDOWS: [(u64, u64); 2] = [(4 << 20, 4 << 20), (64 << 20, 64 << 20)];

/// The two table orders of `scripts/kallsyms.c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableOrder {
    /// offsets, relative_base, num_syms, names, markers, (seqs_of_names), token_table,
    /// token_index (6.1 and older).
    Old,
    /// num_syms, names, markers, token_table, token_index, offsets, relative_base,
    /// seqs_of_names (6.4+, e.g. 6.12).
    New,
}

/// How addresses are encoded in `kallsyms_offsets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressEncoding {
    /// CONFIG_KALLSYMS_ABSOLUTE_PERCPU: `off >= 0 ? off : relative_base - 1 - off`.
    AbsolutePercpu,
    /// `relative_base + (u32)off`.
    Relative,
}

/// Where the tables are (guest-physical addresses) and their global values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KallsymsLayout {
    /// Table order.
    pub order: TableOrder,
    /// Address encoding.
    pub encoding: AddressEncoding,
    /// Number of symbols.
    pub num_syms: u32,
    /// `kallsyms_num_syms`.
    #[serde(with = "crate::hex")]
    pub num_syms_pa: u64,
    /// `kallsyms_names`.
    #[serde(with = "crate::hex")]
    pub names_pa: u64,
    /// `kallsyms_markers`.
    #[serde(with = "crate::hex")]
    pub markers_pa: u64,
    /// `kallsyms_seqs_of_names`, if present.
    #[serde(with = "crate::hex")]
    pub seqs_of_names_pa: Option<u64>,
    /// `kallsyms_token_table`.
    #[serde(with = "crate::hex")]
    pub token_table_pa: u64,
    /// `kallsyms_token_index`.
    #[serde(with = "crate::hex")]
    pub token_index_pa: u64,
    /// `kallsyms_offsets`.
    #[serde(with = "crate::hex")]
    pub offsets_pa: u64,
    /// `kallsyms_relative_base`.
    #[serde(with = "crate::hex")]
    pub relative_base_pa: u64,
    /// Value of `kallsyms_relative_base`: the runtime address of `_text`.
    #[serde(with = "crate::hex")]
    pub relative_base: u64,
}

impl KallsymsLayout {
    /// Lowest guest-physical address of the tables.
    pub fn start_pa(&self) -> u64 {
        self.offsets_pa.min(self.num_syms_pa)
    }
}

/// A decoded kallsyms: where it is and the symbols.
#[derive(Debug, Clone)]
pub struct Kallsyms {
    /// Table locations.
    pub layout: KallsymsLayout,
    /// The symbols.
    pub symbols: Symbols,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Rounds `off` up so that `base_pa + off` is 8-aligned.
fn align8(base_pa: u64, off: usize) -> Option<usize> {
    let mis = (base_pa.wrapping_add(off as u64) & 7) as usize;
    if mis == 0 {
        Some(off)
    } else {
        off.checked_add(8 - mis)
    }
}

/// The 256 tokens, as slices of the input.
struct Tokens<'a> {
    tokens: [&'a [u8]; 256],
    /// Each token zero-padded to 32 bytes (fixed-size copies in the hot loop), with bytes that
    /// are not printable ASCII replaced by `?`.
    padded: Vec<[u8; 32]>,
    /// Offset of `kallsyms_token_index` in the input.
    index_off: usize,
}

fn parse_tokens(bytes: &[u8], base_pa: u64, tt_off: usize) -> Result<Tokens<'_>, KallsymsError> {
    let bad = |reason: &str| KallsymsError::Inconsistent {
        token_table_pa: base_pa.wrapping_add(tt_off as u64),
        reason: reason.to_string(),
    };
    if base_pa.wrapping_add(tt_off as u64) & 7 != 0 {
        return Err(bad("token table not 8-aligned"));
    }
    let mut tokens: [&[u8]; 256] = [&[]; 256];
    let mut starts = [0usize; 256];
    let mut pos = tt_off;
    for (i, tok) in tokens.iter_mut().enumerate() {
        let rest = bytes.get(pos..).ok_or(KallsymsError::Truncated {
            table: "token_table",
        })?;
        let window = &rest[..rest.len().min(MAX_TOKEN_LEN + 1)];
        let len = memchr::memchr(0, window).ok_or(if window.len() > MAX_TOKEN_LEN {
            bad("token too long")
        } else {
            KallsymsError::Truncated {
                table: "token_table",
            }
        })?;
        if len == 0 {
            return Err(bad("empty token"));
        }
        starts[i] = pos - tt_off;
        *tok = &rest[..len];
        pos += len + 1;
    }
    for d in 0..10u8 {
        if tokens[usize::from(b'0' + d)] != [b'0' + d] {
            return Err(bad("digit tokens are not literal"));
        }
    }
    for c in b'a'..=b'z' {
        if tokens[usize::from(c)] != [c] {
            return Err(bad("letter tokens are not literal"));
        }
    }
    let index_off = align8(base_pa, pos).ok_or(KallsymsError::Truncated {
        table: "token_index",
    })?;
    for (i, &s) in starts.iter().enumerate() {
        let v = u16_at(bytes, index_off + 2 * i).ok_or(KallsymsError::Truncated {
            table: "token_index",
        })?;
        if usize::from(v) != s {
            return Err(bad("token_index does not match the token table"));
        }
    }
    let padded = tokens
        .iter()
        .map(|t| {
            let mut a = [0u8; 32];
            for (d, &c) in a.iter_mut().zip(t.iter()) {
                *d = if c.is_ascii_graphic() { c } else { b'?' };
            }
            a
        })
        .collect();
    Ok(Tokens {
        tokens,
        padded,
        index_off,
    })
}

/// Reads one `kallsyms_names` entry at `off`: returns (token bytes, offset after the entry).
fn name_entry(bytes: &[u8], off: usize) -> Option<(&[u8], usize)> {
    let b0 = *bytes.get(off)?;
    let (len, hdr) = if b0 & 0x80 != 0 {
        let b1 = *bytes.get(off + 1)?;
        (usize::from(b0 & 0x7f) | (usize::from(b1) << 7), 2)
    } else {
        (usize::from(b0), 1)
    };
    if len == 0 {
        return None;
    }
    let start = off.checked_add(hdr)?;
    let end = start.checked_add(len)?;
    Some((bytes.get(start..end)?, end))
}

fn is_type_char(c: u8) -> bool {
    matches!(
        c.to_ascii_lowercase(),
        b'a' | b'b'
            | b'd'
            | b'r'
            | b't'
            | b'v'
            | b'w'
            | b'u'
            | b'n'
            | b'g'
            | b's'
            | b'i'
            | b'p'
            | b'?'
    )
}

/// Size of the expansion buffer: a name of up to [`MAX_NAME_LEN`] plus one token.
const NAME_BUF: usize = MAX_NAME_LEN + MAX_TOKEN_LEN + 32;

/// Expands one entry into `buf`; returns the length, or `None` if the result is not a
/// plausible symbol (shorter than type char + 1, or longer than [`MAX_NAME_LEN`]). Bytes that
/// are not printable ASCII come out as `?`.
fn expand(tokens: &Tokens<'_>, entry: &[u8], buf: &mut [u8; NAME_BUF]) -> Option<usize> {
    let mut pos = 0usize;
    for &b in entry {
        if pos > MAX_NAME_LEN {
            return None;
        }
        let tok = tokens.tokens[usize::from(b)];
        if tok.len() <= 32 {
            buf[pos..pos + 32].copy_from_slice(&tokens.padded[usize::from(b)]);
        } else {
            for (d, &c) in buf[pos..pos + tok.len()].iter_mut().zip(tok) {
                *d = if c.is_ascii_graphic() { c } else { b'?' };
            }
        }
        pos += tok.len();
    }
    (2..=MAX_NAME_LEN).contains(&pos).then_some(pos)
}

/// Quick plausibility check of the entry at `off` (type char + printable name).
fn plausible_entry(
    tokens: &Tokens<'_>,
    bytes: &[u8],
    off: usize,
    buf: &mut [u8; NAME_BUF],
) -> Option<usize> {
    let (entry, next) = name_entry(bytes, off)?;
    let len = expand(tokens, entry, buf)?;
    if !is_type_char(buf[0]) || buf[1..len].contains(&b'?') {
        return None;
    }
    Some(next)
}

/// Locations found by [`find_names`].
struct NamesLoc {
    num_syms_off: usize,
    n: u32,
    names_off: usize,
    markers_off: usize,
    markers_end: usize,
}

/// Searches below the token table for `num_syms` + `names` + `markers`.
fn find_names(
    bytes: &[u8],
    base_pa: u64,
    tt_off: usize,
    tokens: &Tokens<'_>,
) -> Result<NamesLoc, KallsymsError> {
    let mut scratch = [0u8; NAME_BUF];
    let mut p = align8(base_pa, tt_off.saturating_sub(15)).unwrap_or(0);
    while p + 8 > tt_off {
        match p.checked_sub(8) {
            Some(q) => p = q,
            None => break,
        }
    }
    let mut truncated = true;
    let mut budget = WALK_BUDGET;
    loop {
        if let Some(loc) =
            try_names_at(bytes, base_pa, tt_off, tokens, p, &mut scratch, &mut budget)
        {
            return Ok(loc);
        }
        if budget == 0 {
            return Err(KallsymsError::Inconsistent {
                token_table_pa: base_pa.wrapping_add(tt_off as u64),
                reason: "search budget for kallsyms_names exhausted (crafted tables?)".into(),
            });
        }
        match p.checked_sub(8) {
            Some(q) => p = q,
            None => break,
        }
        if tt_off - p > (MAX_SYMS as usize) * 4 {
            truncated = false;
            break;
        }
    }
    if truncated {
        Err(KallsymsError::Truncated { table: "names" })
    } else {
        Err(KallsymsError::Inconsistent {
            token_table_pa: base_pa.wrapping_add(tt_off as u64),
            reason: "no kallsyms_num_syms/names/markers below the token table".into(),
        })
    }
}

fn try_names_at(
    bytes: &[u8],
    base_pa: u64,
    tt_off: usize,
    tokens: &Tokens<'_>,
    p: usize,
    scratch: &mut [u8; NAME_BUF],
    budget: &mut u64,
) -> Option<NamesLoc> {
    let n = u32_at(bytes, p)?;
    if n == 0 || n >= MAX_SYMS || u32_at(bytes, p + 4)? != 0 {
        return None;
    }
    let names_off = p + 8;
    // Each entry is at least 2 bytes, plus markers.
    let min_len = (n as usize).checked_mul(2)?;
    if names_off.checked_add(min_len)? > tt_off {
        return None;
    }
    // Cheap prefilter: the first few entries decode to plausible symbols.
    let mut off = names_off;
    for _ in 0..n.min(4) {
        off = plausible_entry(tokens, bytes, off, scratch)?;
    }
    // Full walk, recording markers.
    let m = n.div_ceil(256) as usize;
    let mut markers = Vec::with_capacity(m);
    let mut off = names_off;
    for i in 0..n {
        *budget = budget.checked_sub(1)?;
        if i % 256 == 0 {
            markers.push(u32::try_from(off - names_off).ok()?);
        }
        let (_, next) = name_entry(bytes, off)?;
        if next > tt_off {
            return None;
        }
        off = next;
    }
    let markers_off = align8(base_pa, off)?;
    let markers_end = markers_off.checked_add(4 * m)?;
    if markers_end > tt_off {
        return None;
    }
    for (i, &want) in markers.iter().enumerate() {
        if u32_at(bytes, markers_off + 4 * i)? != want {
            return None;
        }
    }
    Some(NamesLoc {
        num_syms_off: p,
        n,
        names_off,
        markers_off,
        markers_end,
    })
}

fn is_kernel_ptr(v: u64) -> bool {
    v >= 0xffff_ffff_8000_0000
}

/// Parses the kallsyms tables from `bytes` (guest-physical `base_pa` onwards) given the offset
/// of a token-table candidate. Never panics; errors on anything inconsistent.
pub fn parse(bytes: &[u8], base_pa: u64, tt_off: usize) -> Result<Kallsyms, KallsymsError> {
    let tokens = parse_tokens(bytes, base_pa, tt_off)?;
    let loc = find_names(bytes, base_pa, tt_off, &tokens)?;
    let n = loc.n as usize;
    let pa = |off: usize| base_pa.wrapping_add(off as u64);
    let bad = |reason: &str| KallsymsError::Inconsistent {
        token_table_pa: pa(tt_off),
        reason: reason.to_string(),
    };
    let after_markers = align8(base_pa, loc.markers_end).ok_or(bad("overflow"))?;
    let offsets_len = 4 * n;
    let seqs_len = 3 * n;
    // New order: offsets after token_index.
    let new = || -> Option<(usize, usize, Option<usize>)> {
        if after_markers != tt_off {
            return None;
        }
        let offsets_off = align8(base_pa, tokens.index_off + 512)?;
        let rb_off = align8(base_pa, offsets_off + offsets_len)?;
        let seqs_off = rb_off + 8;
        u64_at(bytes, rb_off).filter(|&v| is_kernel_ptr(v))?;
        let seqs = bytes.get(seqs_off..seqs_off + seqs_len).map(|_| seqs_off);
        Some((offsets_off, rb_off, seqs))
    };
    let old = || -> Option<(usize, usize, Option<usize>)> {
        let rb_off = loc.num_syms_off.checked_sub(8)?;
        u64_at(bytes, rb_off).filter(|&v| is_kernel_ptr(v))?;
        let offsets_off = rb_off.checked_sub(align8(0, offsets_len)?)?;
        let seqs = if after_markers == tt_off {
            None
        } else if align8(base_pa, after_markers + seqs_len)? == tt_off {
            Some(after_markers)
        } else {
            return None;
        };
        Some((offsets_off, rb_off, seqs))
    };
    let (order, (offsets_off, rb_off, seqs_off)) = if let Some(t) = new() {
        (TableOrder::New, t)
    } else if let Some(t) = old() {
        (TableOrder::Old, t)
    } else {
        return Err(bad(
            "cannot place kallsyms_offsets/relative_base (neither table order fits)",
        ));
    };
    let relative_base = u64_at(bytes, rb_off).ok_or(KallsymsError::Truncated {
        table: "relative_base",
    })?;
    let offsets = bytes
        .get(offsets_off..offsets_off + offsets_len)
        .ok_or(KallsymsError::Truncated { table: "offsets" })?;

    // Decode names.
    let mut names: Vec<u8> = Vec::with_capacity(n.min(bytes.len() / 2) * 24);
    let mut raw: Vec<RawSymbol> = Vec::with_capacity(n.min(bytes.len() / 2));
    let mut scratch = [0u8; NAME_BUF];
    let mut off = loc.names_off;
    for _ in 0..n {
        let (entry, next) =
            name_entry(bytes, off).ok_or(KallsymsError::Truncated { table: "names" })?;
        off = next;
        let len = expand(&tokens, entry, &mut scratch).ok_or(KallsymsError::Invalid {
            what: "symbol name length",
            value: entry.len() as u64,
        })?;
        let start = names.len();
        if start + len > MAX_NAMES_BYTES {
            return Err(KallsymsError::Invalid {
                what: "total length of names",
                value: start as u64,
            });
        }
        names.extend_from_slice(&scratch[1..len]);
        raw.push(RawSymbol {
            addr: 0,
            name_start: start as u32,
            name_len: (len - 1) as u32,
            kind: scratch[0],
        });
    }
    // Decode addresses; pick the encoding that yields an address-sorted table.
    let offs = offsets
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let abs = |o: i32| {
        if o >= 0 {
            o as u64
        } else {
            relative_base
                .wrapping_sub(1)
                .wrapping_sub(i64::from(o) as u64)
        }
    };
    let rel = |o: i32| relative_base.wrapping_add(u64::from(o as u32));
    let mut encoding = AddressEncoding::AbsolutePercpu;
    let mut sorted = true;
    let mut prev = 0u64;
    for (s, o) in raw.iter_mut().zip(offs.clone()) {
        s.addr = abs(o);
        sorted &= s.addr >= prev;
        prev = s.addr;
    }
    if !sorted {
        encoding = AddressEncoding::Relative;
        sorted = true;
        prev = 0;
        for (s, o) in raw.iter_mut().zip(offs) {
            s.addr = rel(o);
            sorted &= s.addr >= prev;
            prev = s.addr;
        }
    }
    if !sorted {
        return Err(bad("decoded addresses are not sorted"));
    }
    let names = String::from_utf8(names).map_err(|_| bad("non-ASCII names"))?;
    let seqs = seqs_off.and_then(|o| bytes.get(o..o + seqs_len));
    let symbols = Symbols::from_parts(names, raw, seqs);
    let layout = KallsymsLayout {
        order,
        encoding,
        num_syms: loc.n,
        num_syms_pa: pa(loc.num_syms_off),
        names_pa: pa(loc.names_off),
        markers_pa: pa(loc.markers_off),
        seqs_of_names_pa: seqs_off.map(pa),
        token_table_pa: pa(tt_off),
        token_index_pa: pa(tokens.index_off),
        offsets_pa: pa(offsets_off),
        relative_base_pa: pa(rb_off),
        relative_base,
    };
    Ok(Kallsyms { layout, symbols })
}

/// Given a hit of the digit run at offset `hit` in `bytes`, the offset of the token table
/// start (from `token_index[0x30]`), if consistent.
fn table_start_from_hit(bytes: &[u8], base_pa: u64, hit: usize) -> Option<usize> {
    let mut pos = hit;
    for _ in 0x30..0x100 {
        let rest = bytes.get(pos..)?;
        let len = memchr::memchr(0, &rest[..rest.len().min(MAX_TOKEN_LEN + 1)])?;
        if len == 0 {
            return None;
        }
        pos += len + 1;
    }
    let index_off = align8(base_pa, pos)?;
    let idx30 = usize::from(u16_at(bytes, index_off + 2 * 0x30)?);
    hit.checked_sub(idx30)
}

/// Guest-physical addresses of token-table candidates (validated token table + token index)
/// anywhere in guest RAM, in address order, at most [`MAX_CANDIDATES`].
pub fn scan_token_tables(mem: &dyn PhysMemory) -> Vec<u64> {
    scan_token_tables_in(mem, &mem.regions())
}

/// Like [`scan_token_tables`], restricted to guest-physical `(start, len)` ranges (e.g. the
/// frames that back the kernel image mapping, see [`crate::paging::mapped_ranges`]).
pub fn scan_token_tables_in(mem: &dyn PhysMemory, ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out = scan_ranges(mem, ranges);
    out.sort_unstable();
    out.dedup();
    out
}

/// Scans `(pa, len)` ranges (each searched up to `DIGITS.len() - 1` bytes past its end so that
/// hits straddling two ranges are found).
fn scan_ranges(mem: &dyn PhysMemory, ranges: &[(u64, u64)]) -> Vec<u64> {
    let finder = memmem::Finder::new(DIGITS);
    let overlap = DIGITS.len() - 1;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; SCAN_CHUNK + overlap];
    let mut validated = 0usize;
    for &(start, len) in ranges {
        let mut off = 0u64;
        while off < len {
            let want = (len - off).min(SCAN_CHUNK as u64) as usize + overlap;
            let mut n = want;
            // Shorten the read at the end of RAM.
            while n > 0 && mem.read_phys(start + off, &mut chunk[..n]).is_err() {
                n = if n > want - overlap {
                    want - overlap
                } else {
                    0
                };
            }
            if n == 0 {
                break;
            }
            for hit in finder.find_iter(&chunk[..n]) {
                if hit as u64 + off >= len {
                    break;
                }
                if quick_reject(&chunk[..n], hit) {
                    continue;
                }
                validated += 1;
                if validated > MAX_HITS {
                    tracing::warn!(
                        "more than {MAX_HITS} token-table look-alikes in guest RAM; scan stopped"
                    );
                    return out;
                }
                let hit_pa = start + off + hit as u64;
                if let Some(tt) = validate_hit(mem, hit_pa) {
                    if !out.contains(&tt) {
                        out.push(tt);
                        if out.len() >= MAX_CANDIDATES {
                            return out;
                        }
                    }
                }
            }
            off += SCAN_CHUNK as u64;
        }
    }
    out
}

/// Cheap in-chunk test of a digit-run hit: tokens 0x3a..=0x60 follow, then `"a\0".."z\0"`.
/// Returns true only when the bytes are available and do not fit.
fn quick_reject(buf: &[u8], hit: usize) -> bool {
    const LETTERS: &[u8] =
        b"a\0b\0c\0d\0e\0f\0g\0h\0i\0j\0k\0l\0m\0n\0o\0p\0q\0r\0s\0t\0u\0v\0w\0x\0y\0z\0";
    let mut pos = hit + DIGITS.len();
    for _ in 0x3a..0x61 {
        let Some(rest) = buf.get(pos..) else {
            return false;
        };
        match memchr::memchr(0, &rest[..rest.len().min(MAX_TOKEN_LEN + 1)]) {
            Some(0) => return true,
            Some(l) => pos += l + 1,
            None => return rest.len() > MAX_TOKEN_LEN,
        }
    }
    match buf.get(pos..pos + LETTERS.len()) {
        Some(b) => b != LETTERS,
        None => false,
    }
}

/// Reads a window around a digit-run hit and returns the token table's pa if it validates.
fn validate_hit(mem: &dyn PhysMemory, hit_pa: u64) -> Option<u64> {
    let lo = hit_pa.saturating_sub(0x4000) & !7;
    let (rstart, rlen) = mem
        .regions()
        .into_iter()
        .find(|&(s, l)| hit_pa >= s && hit_pa - s < l)?;
    let lo = lo.max(rstart);
    let hi = hit_pa.saturating_add(0x4000).min(rstart + rlen);
    let mut buf = vec![0u8; usize::try_from(hi - lo).ok()?];
    mem.read_phys(lo, &mut buf).ok()?;
    let hit = usize::try_from(hit_pa - lo).ok()?;
    let tt = table_start_from_hit(&buf, lo, hit)?;
    parse_tokens(&buf, lo, tt).ok()?;
    Some(lo + tt as u64)
}

/// Reads the region around the token table at `token_table_pa` and parses it.
pub fn decode_at(mem: &dyn PhysMemory, token_table_pa: u64) -> Result<Kallsyms, KallsymsError> {
    let (rstart, rlen) = mem
        .regions()
        .into_iter()
        .find(|&(s, l)| token_table_pa >= s && token_table_pa - s < l)
        .ok_or(KallsymsError::NoTokenTable)?;
    let rend = rstart.saturating_add(rlen);
    let mut last = KallsymsError::NoTokenTable;
    for (below, above) in WINDOWS {
        let lo = token_table_pa.saturating_sub(below).max(rstart) & !7;
        let lo = lo.max(rstart);
        let hi = token_table_pa.saturating_add(above).min(rend);
        let mut buf = vec![0u8; usize::try_from(hi - lo).map_err(|_| KallsymsError::NoTokenTable)?];
        mem.read_phys(lo, &mut buf)?;
        match parse(&buf, lo, (token_table_pa - lo) as usize) {
            Ok(k) => return Ok(k),
            Err(e @ KallsymsError::Truncated { .. }) => {
                last = e;
                if lo == rstart && hi == rend {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Scans guest RAM and decodes the first candidate that parses. [`crate::Kernel::open`] goes
/// further and requires the candidate to agree with the page tables and registers.
pub fn find(mem: &dyn PhysMemory) -> Result<Kallsyms, KallsymsError> {
    let mut last = KallsymsError::NoTokenTable;
    for tt in scan_token_tables(mem) {
        match decode_at(mem, tt) {
            Ok(k) => return Ok(k),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Result of comparing the decoded table with a guest's `/proc/kallsyms`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ProcComparison {
    /// Lines that matched a core-kernel symbol exactly (address, type, name, in order).
    pub core: usize,
    /// Lines after the core symbols, grouped by their `[module]` tag (e.g. a module name,
    /// `bpf`, `__builtin__ftrace`, `__builtin__kprobes`).
    pub extra: Vec<(String, usize)>,
}

/// A difference between the decoded table and `/proc/kallsyms`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("/proc/kallsyms line {line}: expected {expected:?}, found {found:?}")]
pub struct Mismatch {
    /// 1-based line number in the `/proc/kallsyms` text.
    pub line: usize,
    /// What the decoded table says (`"<addr> <type> <name>"`), or a description.
    pub expected: String,
    /// The line in the text.
    pub found: String,
}

/// Compares every line of a `/proc/kallsyms` text (read as root, so addresses are real) with the
/// decoded table: the first `symbols.len()` lines must equal the core symbols in order; the
/// lines after them must all carry a `[tag]` (modules, bpf, ftrace/kprobe trampolines) and are
/// counted per tag.
pub fn compare_with_proc(symbols: &Symbols, proc_text: &str) -> Result<ProcComparison, Mismatch> {
    let mut lines = proc_text.lines().enumerate();
    let mut cmp = ProcComparison::default();
    for sym in symbols.iter() {
        let expected = format!("{:016x} {} {}", sym.addr, sym.kind, sym.name);
        let Some((i, line)) = lines.next() else {
            return Err(Mismatch {
                line: cmp.core + 1,
                expected,
                found: "<end of /proc/kallsyms>".into(),
            });
        };
        if line.trim_end() != expected {
            return Err(Mismatch {
                line: i + 1,
                expected,
                found: line.to_string(),
            });
        }
        cmp.core += 1;
    }
    for (i, line) in lines {
        let tag = line
            .split_whitespace()
            .nth(3)
            .filter(|t| t.starts_with('[') && t.ends_with(']'))
            .map(|t| t.trim_matches(|c| c == '[' || c == ']').to_string());
        let Some(tag) = tag else {
            return Err(Mismatch {
                line: i + 1,
                expected: "a [module]-tagged line after the core symbols".into(),
                found: line.to_string(),
            });
        };
        match cmp.extra.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, c)) => *c += 1,
            None => cmp.extra.push((tag, 1)),
        }
    }
    Ok(cmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbols::RawSymbol;

    fn table() -> Symbols {
        let mut names = String::new();
        let mut syms = Vec::new();
        for (n, k, a) in [
            ("fixed_percpu_data", b'A', 0u64),
            ("_text", b'T', 0xffff_ffff_8100_0000),
        ] {
            syms.push(RawSymbol {
                addr: a,
                name_start: names.len() as u32,
                name_len: n.len() as u32,
                kind: k,
            });
            names.push_str(n);
        }
        Symbols::from_parts(names, syms, None)
    }

    #[test]
    fn compare_with_proc_core_and_tagged_lines() {
        let s = table();
        let core = "0000000000000000 A fixed_percpu_data\nffffffff81000000 T _text\n";
        assert_eq!(
            compare_with_proc(&s, core),
            Ok(ProcComparison {
                core: 2,
                extra: vec![]
            })
        );
        let more = format!(
            "{core}ffffffffc0001000 t foo\t[virtio_net]\nffffffffc0002000 T bar\t[virtio_net]\n\
             ffffffffc0003000 t bpf_prog_6deef7357e7b4530\t[bpf]\nffffffffc0004000 t ftrace_trampoline\t[__builtin__ftrace]\n"
        );
        let c = compare_with_proc(&s, &more).unwrap();
        assert_eq!(c.core, 2);
        assert_eq!(
            c.extra,
            vec![
                ("virtio_net".into(), 2),
                ("bpf".into(), 1),
                ("__builtin__ftrace".into(), 1)
            ]
        );
        // Wrong address, wrong type, missing line, untagged extra line.
        let e = compare_with_proc(
            &s,
            "0000000000000000 A fixed_percpu_data\nffffffff81000001 T _text\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(compare_with_proc(&s, "0000000000000000 a fixed_percpu_data\n").is_err());
        assert_eq!(
            compare_with_proc(&s, "0000000000000000 A fixed_percpu_data\n")
                .unwrap_err()
                .line,
            2
        );
        assert_eq!(
            compare_with_proc(&s, &format!("{core}ffffffff81000010 T stray\n"))
                .unwrap_err()
                .line,
            3
        );
    }
}
