//! The guest-reading half of the prologue rewrite (issue 9): reads a function's entry and
//! body from guest memory, picks the [`Method`] and, for the prologue and after-ftrace
//! methods, relocates the covered instructions ([`crate::prologue::relocate`]) for a
//! trampoline at a given address. [`GuestSites`] reads the guest's tables of code the kernel
//! rewrites or looks up by address (jump labels, static calls, exception table), whose
//! entries the moved bytes must not hold. Reads only; nothing is written.

use introspect::PhysMemory;
use thiserror::Error;

use crate::engine::Target;
use crate::prologue::{
    check_other_code, method_for, relocate, Method, Prologue, PrologueError, MAX_FUNC_LEN,
};
use crate::site;

/// Why an entry cannot be planned.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EntryPlanError {
    /// The address is not the start of a known symbol (its length is needed).
    #[error("{func:#x} is not the start of a kernel symbol of known size")]
    NoSymbol {
        /// The address.
        func: u64,
    },
    /// Guest memory could not be read.
    #[error("reading the function at {func:#x}: {why}")]
    Memory {
        /// The function.
        func: u64,
        /// The error.
        why: String,
    },
    /// The entry is owned by something that must not be touched (a kprobe, another patcher).
    #[error("entry site {site:#x} of {name}: {why}")]
    Owned {
        /// The function.
        name: String,
        /// The site.
        site: u64,
        /// Who owns it.
        why: String,
    },
    /// The relocator refused.
    #[error("{name}: {source}")]
    Prologue {
        /// The function.
        name: String,
        /// The refusal.
        source: PrologueError,
    },
}

/// A field of a table entry: (offset in the entry, bytes of code it covers, what it is).
type Field = (u64, u64, &'static str);

/// Largest table [`GuestSites::read`] accepts.
const MAX_TABLE: u64 = 4 << 20;

/// The guest's tables of code addresses that must not move: `__jump_table` (jump labels,
/// which `static_key_enable()` rewrites after verifying their bytes, and their targets, which
/// they branch to), `.static_call_sites` (calls `static_call_update()` rewrites) and
/// `__ex_table` (faulting instructions whose fixup is found by address, and the fixups they
/// continue at).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestSites {
    /// `(start, end, what)`, sorted by start.
    ranges: Vec<(u64, u64, String)>,
}

impl GuestSites {
    /// Reads the three tables through kallsyms' `__start_*`/`__stop_*` symbols.
    pub fn read(mem: &dyn PhysMemory, t: &Target) -> Result<Self, EntryPlanError> {
        // (start symbol, stop symbol, entry size, [(field offset, bytes covered, what)]): each
        // field a 32-bit offset from itself to a code address.
        let tables: [(&str, &str, u64, &[Field]); 3] = [
            (
                "__start___jump_table",
                "__stop___jump_table",
                16,
                &[(0, 5, "jump label"), (4, 1, "jump label target")],
            ),
            (
                "__start_static_call_sites",
                "__stop_static_call_sites",
                8,
                &[(0, 5, "static call site")],
            ),
            (
                "__start___ex_table",
                "__stop___ex_table",
                12,
                &[
                    (0, 1, "exception table entry"),
                    (4, 1, "exception fixup target"),
                ],
            ),
        ];
        let mut ranges = Vec::new();
        for (start, stop, size, fields) in tables {
            let sym = |n: &str| {
                t.symbols
                    .addresses(n)
                    .first()
                    .copied()
                    .ok_or_else(|| EntryPlanError::Memory {
                        func: 0,
                        why: format!("no {n} symbol: cannot tell the code sites it lists"),
                    })
            };
            let (lo, hi) = (sym(start)?, sym(stop)?);
            let len = hi
                .checked_sub(lo)
                .filter(|&l| l <= MAX_TABLE && l % size == 0);
            let len = len.ok_or_else(|| EntryPlanError::Memory {
                func: lo,
                why: format!("{start}..{stop} is not a table of {size}-byte entries"),
            })?;
            let mut b = vec![0u8; len as usize];
            t.paging
                .read_virt(mem, lo, &mut b)
                .map_err(|e| EntryPlanError::Memory {
                    func: lo,
                    why: format!("{start}: {e}"),
                })?;
            for (i, e) in b.chunks_exact(size as usize).enumerate() {
                for &(off, covers, what) in fields {
                    let o = off as usize;
                    let rel = i32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
                    let field = lo + i as u64 * size + off;
                    let at = field.wrapping_add(rel as i64 as u64);
                    ranges.push((at, at.saturating_add(covers), what.to_string()));
                }
            }
        }
        ranges.sort();
        Ok(GuestSites { ranges })
    }

    /// The entries intersecting `[lo, hi)`, as [`relocate`]'s forbidden ranges.
    pub fn within(&self, lo: u64, hi: u64) -> Vec<(u64, u64, String)> {
        // Entries cover at most 5 bytes: start from lo - 5.
        let from = self.ranges.partition_point(|r| r.0 < lo.saturating_sub(5));
        self.ranges[from..]
            .iter()
            .take_while(|r| r.0 < hi)
            .filter(|r| r.1 > lo)
            .cloned()
            .collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// A function's entry as it would be patched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPlan {
    /// The function's name (kallsyms).
    pub name: String,
    /// Its address.
    pub func: u64,
    /// Its length (to the next symbol).
    pub len: u64,
    /// The method.
    pub method: Method,
    /// Where the `jmp` goes.
    pub site: u64,
    /// For [`Method::Prologue`] and [`Method::AfterFtrace`]: the relocation.
    pub prologue: Option<Prologue>,
}

/// Plans the entry of the function at `func`: reads it (up to [`MAX_FUNC_LEN`] bytes), picks
/// the method from its site bytes, and relocates for a trampoline at `tramp_va` when the
/// method moves instructions (refusing also when its `name.cold` part jumps into the moved
/// bytes). `forbidden` as for [`relocate`] (see [`GuestSites`]).
pub fn plan_entry(
    mem: &dyn PhysMemory,
    t: &Target,
    func: u64,
    tramp_va: u64,
    forbidden: &[(u64, u64, String)],
) -> Result<EntryPlan, EntryPlanError> {
    let len = t
        .symbols
        .size_of(func)
        .ok_or(EntryPlanError::NoSymbol { func })?;
    let name = t
        .symbols
        .symbolize(func)
        .map_or_else(|| format!("{func:#x}"), |(n, _)| n);
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_FUNC_LEN)
        .ok_or_else(|| EntryPlanError::Prologue {
            name: name.clone(),
            source: PrologueError::BadInput {
                func,
                why: format!("{len} bytes is more than {MAX_FUNC_LEN}"),
            },
        })?;
    let mut bytes = vec![0u8; n];
    t.paging
        .read_virt(mem, func, &mut bytes)
        .map_err(|e| EntryPlanError::Memory {
            func,
            why: e.to_string(),
        })?;
    let off = site::site_offset(&bytes);
    let site = func + off;
    let refuse = |source| EntryPlanError::Prologue {
        name: name.clone(),
        source,
    };
    let Some(head) = bytes
        .get(off as usize..off as usize + 5)
        .and_then(|h| <[u8; 5]>::try_from(h).ok())
    else {
        return Err(refuse(PrologueError::TooShort { func, len, site }));
    };
    let sym = |a: u64| {
        t.symbols
            .symbolize(a)
            .map(|(n, o)| format!("{n}+{o:#x}"))
            .or_else(|| crate::plan::ftrace_trampoline(mem, t, a))
    };
    let owner = site::classify(site, &head, &sym);
    let owned = |why: String| EntryPlanError::Owned {
        name: name.clone(),
        site,
        why,
    };
    let (method, extra) = method_for(&head, &owner).map_err(owned)?;
    // What the guest's ftrace says of the site: a jump after its call must not be bypassed by
    // an ftrace user redirecting the ip (klp), and a call ftrace manages must not move.
    if method != Method::FtraceSite {
        match crate::ftrace_recs::record_at(mem, t, site) {
            Ok(Some(r)) => {
                if let Some(why) = r.refusal() {
                    return Err(owned(format!("{owner}; {why}")));
                }
                if method == Method::Prologue {
                    return Err(owned(format!(
                        "{owner}: an ftrace location whose bytes ftrace manages; only ftrace may \
                         change them"
                    )));
                }
            }
            Ok(None) if method == Method::AfterFtrace => {
                return Err(owned(format!(
                    "{owner}, but ftrace has no record of this site"
                )))
            }
            Ok(None) => {}
            Err(e) if method == Method::AfterFtrace || head[0] == 0xe8 => {
                return Err(owned(format!("{owner}; cannot tell who owns it: {e}")))
            }
            Err(_) => {}
        }
    }
    let prologue = match method {
        Method::FtraceSite => None,
        Method::Prologue | Method::AfterFtrace => {
            let p = relocate(func, &bytes, off + extra, tramp_va, forbidden).map_err(refuse)?;
            // gcc's out-of-line part `name.cold` jumps back into the function.
            for cold in t.symbols.addresses(&format!("{name}.cold")) {
                let n = t
                    .symbols
                    .size_of(cold)
                    .unwrap_or(0)
                    .min(MAX_FUNC_LEN as u64);
                let mut code = vec![0u8; n as usize];
                t.paging
                    .read_virt(mem, cold, &mut code)
                    .map_err(|e| EntryPlanError::Memory {
                        func: cold,
                        why: e.to_string(),
                    })?;
                check_other_code(&p, cold, &code).map_err(refuse)?;
            }
            Some(p)
        }
    };
    Ok(EntryPlan {
        name,
        func,
        len,
        method,
        site: site + extra,
        prologue,
    })
}
