//! The decoded kernel symbol table: iteration in `/proc/kallsyms` order, lookup by name with
//! livepatch `sympos` semantics, and address symbolization like `%pB` / `sprint_symbol`.

use serde::Serialize;

use crate::error::SymbolError;

/// One symbol as stored (name in the shared string buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawSymbol {
    pub(crate) addr: u64,
    pub(crate) name_start: u32,
    pub(crate) name_len: u32,
    pub(crate) kind: u8,
}

/// A symbol of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Symbol<'a> {
    /// Name (without the type char).
    pub name: &'a str,
    /// `nm`-style type char (`T`, `t`, `D`, `A`, ...).
    pub kind: char,
    /// Runtime address (for `A` per-cpu symbols: the offset into the per-cpu area).
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// Position in the table (= line in `/proc/kallsyms`, 0-based).
    pub index: usize,
}

/// The result of symbolizing an address (`name+offset/size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SymbolRef<'a> {
    /// Name of the containing symbol.
    pub name: &'a str,
    /// Address of the symbol.
    #[serde(with = "crate::hex")]
    pub addr: u64,
    /// `addr_queried - addr`.
    pub offset: u64,
    /// Distance to the next symbol with a higher address (or to `_end`).
    pub size: u64,
    /// Table index of the symbol.
    pub index: usize,
}

impl std::fmt::Display for SymbolRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{:#x}/{:#x}", self.name, self.offset, self.size)
    }
}

/// Sort key prefix of a name: its first 8 bytes, big-endian, zero-padded (orders like strcmp
/// for names without NUL bytes).
fn name_key(name: &str) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    u64::from_be_bytes(b)
}

/// The one "name + position among duplicates" rule, klp's `sympos` (`klp_find_object_symbol`):
/// `addrs` are the addresses of every symbol named `name`, in kallsyms order; `sympos` 0
/// requires the name to be unique (one entry, even where aliases share an address), `N` picks
/// the `N`-th entry (1-based). Returns the index into `addrs`.
pub fn pick_sympos(name: &str, addrs: &[u64], sympos: u64) -> Result<usize, SymbolError> {
    let count = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
    match (addrs.len(), sympos) {
        (0, _) => Err(SymbolError::Unknown {
            name: name.to_string(),
        }),
        (1, 0) => Ok(0),
        (_, 0) => Err(SymbolError::Ambiguous {
            name: name.to_string(),
            count,
            addrs: addrs.to_vec(),
        }),
        (n, p) => match usize::try_from(p - 1) {
            Ok(i) if i < n => Ok(i),
            _ => Err(SymbolError::NoSuchPos {
                name: name.to_string(),
                sympos: p,
                count,
            }),
        },
    }
}

/// The kernel symbol table (core kernel, no modules), address-sorted like the kernel's.
#[derive(Debug, Clone, Default)]
pub struct Symbols {
    names: String,
    syms: Vec<RawSymbol>,
    /// Indices sorted by (name, index).
    by_name: Vec<u32>,
    /// First 8 name bytes (big-endian, zero-padded) of each `by_name` entry: most binary-search
    /// steps compare these instead of chasing the name.
    keys: Vec<u64>,
    /// `[_stext, _end)`: the range `symbolize` answers for (the kernel's `is_ksym_addr` with
    /// CONFIG_KALLSYMS_ALL).
    ksym_range: (u64, u64),
}

impl Symbols {
    /// Builds the table. `seqs_of_names` (big-endian u24 indices sorted by name), when given and
    /// a valid permutation, seeds the name index so that no full sort is needed.
    pub(crate) fn from_parts(
        names: String,
        syms: Vec<RawSymbol>,
        seqs_of_names: Option<&[u8]>,
    ) -> Self {
        let n = syms.len();
        let mut by_name: Vec<u32> = Vec::new();
        if let Some(seqs) = seqs_of_names.filter(|s| s.len() == 3 * n) {
            let mut seen = vec![false; n];
            let mut ok = true;
            by_name.reserve(n);
            for c in seqs.chunks_exact(3) {
                let i = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
                match seen.get_mut(i as usize) {
                    Some(s) if !*s => *s = true,
                    _ => {
                        ok = false;
                        break;
                    }
                }
                by_name.push(i);
            }
            if !ok {
                by_name.clear();
            }
        }
        if by_name.len() != n {
            by_name = (0..n as u32).collect();
        }
        let mut s = Self {
            names,
            syms,
            by_name,
            keys: Vec::new(),
            ksym_range: (0, 0),
        };
        // Stable sort: adaptive, close to linear when seeded from seqs_of_names.
        let mut by_name = std::mem::take(&mut s.by_name);
        let cmp = |a: &u32, b: &u32| {
            s.name_of(*a as usize)
                .cmp(s.name_of(*b as usize))
                .then(a.cmp(b))
        };
        if !by_name.windows(2).all(|w| cmp(&w[0], &w[1]).is_lt()) {
            by_name.sort_by(cmp);
        }
        s.keys = by_name
            .iter()
            .map(|&i| name_key(s.name_of(i as usize)))
            .collect();
        s.by_name = by_name;
        let first_text = s
            .syms
            .iter()
            .find(|r| r.kind != b'A' && r.kind != b'a')
            .map(|r| r.addr);
        let lo = s
            .unique_addr("_stext")
            .or_else(|| s.unique_addr("_text"))
            .or(first_text)
            .unwrap_or(0);
        let hi = s
            .unique_addr("_end")
            .or_else(|| s.syms.last().map(|r| r.addr.saturating_add(1)))
            .unwrap_or(0);
        s.ksym_range = (lo, hi);
        s
    }

    fn name_of(&self, i: usize) -> &str {
        let Some(r) = self.syms.get(i) else { return "" };
        let start = r.name_start as usize;
        self.names
            .get(start..start + r.name_len as usize)
            .unwrap_or("")
    }

    fn unique_addr(&self, name: &str) -> Option<u64> {
        self.lookup(name, None).ok()
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.syms.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    /// Symbol at table position `index`.
    pub fn get(&self, index: usize) -> Option<Symbol<'_>> {
        let r = self.syms.get(index)?;
        Some(Symbol {
            name: self.name_of(index),
            kind: char::from(r.kind),
            addr: r.addr,
            index,
        })
    }

    /// All symbols in table order (= `/proc/kallsyms` order for the core kernel).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Symbol<'_>> + '_ {
        (0..self.syms.len()).map(move |i| {
            let r = &self.syms[i];
            Symbol {
                name: self.name_of(i),
                kind: char::from(r.kind),
                addr: r.addr,
                index: i,
            }
        })
    }

    /// Positions `[lo, hi)` in `by_name` of the symbols named `name`.
    fn name_range(&self, name: &str) -> (usize, usize) {
        let key = name_key(name);
        let (mut lo, mut hi) = (0usize, self.by_name.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let less = match self.keys.get(mid) {
                Some(&k) if k != key => k < key,
                _ => self.name_of(self.by_name[mid] as usize) < name,
            };
            if less {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut end = lo;
        while end < self.by_name.len()
            && self.keys.get(end) == Some(&key)
            && self.name_of(self.by_name[end] as usize) == name
        {
            end += 1;
        }
        (lo, end)
    }

    /// All symbols named `name`, in table (address) order.
    pub fn lookup_all<'a>(&'a self, name: &str) -> impl Iterator<Item = Symbol<'a>> + 'a {
        let (lo, hi) = self.name_range(name);
        self.by_name[lo..hi]
            .iter()
            .filter_map(move |&i| self.get(i as usize))
    }

    /// Address of `name`, with livepatch `sympos` semantics ([`pick_sympos`]): `sympos` is the
    /// 1-based position among same-named symbols in table order; `None`/`Some(0)` requires a
    /// unique name.
    pub fn lookup(&self, name: &str, sympos: Option<u32>) -> Result<u64, SymbolError> {
        self.lookup_symbol(name, sympos).map(|s| s.addr)
    }

    /// Like [`Symbols::lookup`], returning the whole symbol.
    pub fn lookup_symbol(
        &self,
        name: &str,
        sympos: Option<u32>,
    ) -> Result<Symbol<'_>, SymbolError> {
        let (lo, hi) = self.name_range(name);
        let addrs: Vec<u64> = self.by_name[lo..hi]
            .iter()
            .map(|&i| self.syms.get(i as usize).map_or(0, |r| r.addr))
            .collect();
        let pick = pick_sympos(name, &addrs, u64::from(sympos.unwrap_or(0)))?;
        let idx = self.by_name[lo + pick] as usize;
        self.get(idx).ok_or(SymbolError::Unknown {
            name: name.to_string(),
        })
    }

    /// The symbol containing `addr`, like the kernel's `get_symbol_pos()` behind `%pB`,
    /// `/proc/PID/stack` and `sprint_symbol`: the first of the aliases at the nearest address
    /// `<= addr`; size = distance to the next higher address (or to `_end`). Answers only for
    /// `[_stext, _end)`, like `is_ksym_addr()` with CONFIG_KALLSYMS_ALL.
    pub fn symbolize(&self, addr: u64) -> Option<SymbolRef<'_>> {
        let (lo_range, hi_range) = self.ksym_range;
        if addr < lo_range || addr >= hi_range || self.syms.is_empty() {
            return None;
        }
        // Last index with address <= addr.
        let mut low = self
            .syms
            .partition_point(|r| r.addr <= addr)
            .checked_sub(1)?;
        let start = self.syms[low].addr;
        while low > 0 && self.syms[low - 1].addr == start {
            low -= 1;
        }
        let end = self.syms[low + 1..]
            .iter()
            .find(|r| r.addr > start)
            .map_or(hi_range, |r| r.addr);
        Some(SymbolRef {
            name: self.name_of(low),
            addr: start,
            offset: addr - start,
            size: end.saturating_sub(start),
            index: low,
        })
    }

    /// The range `[_stext, _end)` that [`Symbols::symbolize`] covers.
    pub fn ksym_range(&self) -> (u64, u64) {
        self.ksym_range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, char, u64)]) -> Symbols {
        let mut names = String::new();
        let mut syms = Vec::new();
        for &(n, k, a) in entries {
            syms.push(RawSymbol {
                addr: a,
                name_start: names.len() as u32,
                name_len: n.len() as u32,
                kind: k as u8,
            });
            names.push_str(n);
        }
        Symbols::from_parts(names, syms, None)
    }

    #[test]
    fn lookup_sympos_and_symbolize() {
        let s = table(&[
            ("per_cpu_thing", 'A', 0x10),
            ("_text", 'T', 0x1000),
            ("_stext", 'T', 0x1000),
            ("dup", 't', 0x1000),
            ("__pfx_foo", 't', 0x1010),
            ("foo", 'T', 0x1020),
            ("dup", 't', 0x1040),
            ("bar", 'T', 0x1040),
            ("_end", 'B', 0x2000),
        ]);
        assert_eq!(s.lookup("foo", None), Ok(0x1020));
        assert_eq!(s.lookup("foo", Some(1)), Ok(0x1020));
        assert_eq!(
            s.lookup("foo", Some(2)),
            Err(SymbolError::NoSuchPos {
                name: "foo".into(),
                sympos: 2,
                count: 1
            })
        );
        assert_eq!(
            s.lookup("dup", None),
            Err(SymbolError::Ambiguous {
                name: "dup".into(),
                count: 2,
                addrs: vec![0x1000, 0x1040]
            })
        );
        assert_eq!(
            s.lookup("dup", Some(0)),
            Err(SymbolError::Ambiguous {
                name: "dup".into(),
                count: 2,
                addrs: vec![0x1000, 0x1040]
            })
        );
        assert_eq!(s.lookup("dup", Some(2)), Ok(0x1040));
        assert_eq!(
            s.lookup("nope", None),
            Err(SymbolError::Unknown {
                name: "nope".into()
            })
        );
        assert_eq!(s.lookup_all("dup").count(), 2);
        let r = s.symbolize(0x1025).unwrap();
        assert_eq!((r.name, r.offset, r.size), ("foo", 5, 0x20));
        // First alias wins.
        let r = s.symbolize(0x1041).unwrap();
        assert_eq!((r.name, r.offset, r.size), ("dup", 1, 0xfc0));
        let r = s.symbolize(0x1000).unwrap();
        assert_eq!((r.name, r.size), ("_text", 0x10));
        assert_eq!(r.to_string(), "_text+0x0/0x10");
        assert!(s.symbolize(0x10).is_none());
        assert!(s.symbolize(0x2000).is_none());
        let names: Vec<_> = s.iter().map(|x| x.name).collect();
        assert_eq!(names[3], "dup");
    }

    #[test]
    fn pick_sympos_is_klps_rule() {
        assert_eq!(pick_sympos("x", &[7], 0), Ok(0));
        assert_eq!(pick_sympos("x", &[7], 1), Ok(0));
        assert_eq!(pick_sympos("x", &[1, 2, 3], 3), Ok(2));
        // Aliases at one address still make the name ambiguous (klp counts entries).
        let e = pick_sympos("x", &[5, 5], 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "symbol \"x\" is ambiguous: 2 symbols have this name (sympos 1 = 0x5, 2 = 0x5); \
             give sympos 1..=2"
        );
        let e = pick_sympos("x", &[1, 2], 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "symbol \"x\" has no position 3: only 2 symbols have this name"
        );
        assert!(matches!(
            pick_sympos("x", &[1], u64::MAX),
            Err(SymbolError::NoSuchPos {
                sympos: u64::MAX,
                count: 1,
                ..
            })
        ));
        assert_eq!(
            pick_sympos("x", &[], 1),
            Err(SymbolError::Unknown { name: "x".into() })
        );
    }

    #[test]
    fn bad_seqs_fall_back() {
        let names = "bac".to_string();
        let mk = |i: u32, a| RawSymbol {
            addr: a,
            name_start: i,
            name_len: 1,
            kind: b'T',
        };
        let syms = vec![mk(0, 1), mk(1, 2), mk(2, 3)];
        // Duplicate index 0: not a permutation.
        let s = Symbols::from_parts(
            names.clone(),
            syms.clone(),
            Some(&[0, 0, 0, 0, 0, 0, 0, 0, 9]),
        );
        assert_eq!(s.lookup("c", None), Ok(3));
        // Valid permutation but wrong order: sorting fixes it.
        let s = Symbols::from_parts(names, syms, Some(&[0, 0, 2, 0, 0, 0, 0, 0, 1]));
        assert_eq!(s.lookup("a", None), Ok(2));
        assert_eq!(s.lookup("b", None), Ok(1));
    }
}
