//! The guest's ftrace records (`struct dyn_ftrace`, one per ftrace location, in the pages of
//! the `ftrace_pages_start` list): whether an address is an ftrace location, and what ftrace
//! says of its users (`FTRACE_FL_IPMODIFY`: a livepatch or a kprobe redirects the instruction
//! pointer there; `FTRACE_FL_DIRECT`: a direct trampoline such as BPF's is called there).
//!
//! Layouts come from the guest's BTF when the symbol source has it, else the x86-64 values of
//! both supported kernels. Every guest pointer and count is bounds-checked; loops are bounded.

use crate::engine::Target;
use introspect::PhysMemory;

/// `FTRACE_FL_IPMODIFY` (6.1 and 6.12).
pub const FL_IPMODIFY_DEFAULT: u64 = 1 << 26;
/// `FTRACE_FL_DIRECT` (6.1 and 6.12).
pub const FL_DIRECT_DEFAULT: u64 = 1 << 24;
/// Most `struct ftrace_page`s followed.
const MAX_PAGES: usize = 1 << 16;
/// Most records in one page (an order-10 allocation of 16-byte records is 256 Ki).
const MAX_RECORDS: u64 = 1 << 20;

/// What the guest's ftrace knows of an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Where the `struct dyn_ftrace` is (kernel virtual address).
    pub addr: u64,
    /// `dyn_ftrace.flags`.
    pub flags: u64,
    /// `FTRACE_FL_IPMODIFY` in this guest.
    pub ipmodify: u64,
    /// `FTRACE_FL_DIRECT` in this guest.
    pub direct: u64,
}

impl Record {
    /// Why a jump of ours placed right after ftrace's call at this location would be wrong, or
    /// `None` when it is safe (only tracers that return to the next instruction use it).
    pub fn refusal(&self) -> Option<String> {
        if self.flags & self.ipmodify != 0 {
            return Some(
                "an ftrace user there modifies the instruction pointer (FTRACE_FL_IPMODIFY: the \
                 guest's livepatch, or a kprobe that redirects): code after ftrace's call would \
                 never run"
                    .into(),
            );
        }
        if self.flags & self.direct != 0 {
            return Some(
                "a direct trampoline is attached there (FTRACE_FL_DIRECT: e.g. a BPF fentry/fexit \
                 program): only ftrace may change those bytes"
                    .into(),
            );
        }
        None
    }
}

fn enum_or(t: &Target, name: &str, default: u64) -> u64 {
    t.symbols
        .enum_value("ftrace", name)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| v.is_power_of_two())
        .unwrap_or(default)
}

/// The ftrace record of `ip`, if `ip` is an ftrace location of this guest.
pub fn record_at(mem: &dyn PhysMemory, t: &Target, ip: u64) -> Result<Option<Record>, String> {
    let Some(&head) = t.symbols.addresses("ftrace_pages_start").first() else {
        return Err("no ftrace_pages_start symbol".into());
    };
    let off = |m: &str, d: u64| t.symbols.member_offset("ftrace_page", m).unwrap_or(d);
    let (o_next, o_recs, o_index) = (off("next", 0), off("records", 8), off("index", 16));
    let rec_size = t.symbols.type_size("dyn_ftrace").unwrap_or(16);
    let o_flags = t.symbols.member_offset("dyn_ftrace", "flags").unwrap_or(8);
    if !(16..=64).contains(&rec_size) || o_flags + 8 > rec_size {
        return Err(format!(
            "implausible struct dyn_ftrace: {rec_size} bytes, flags at {o_flags}"
        ));
    }
    let rd64 = |va: u64, what: &str| {
        t.paging
            .read_u64(mem, va)
            .map_err(|e| format!("ftrace records: {what} at {va:#x}: {e}"))
    };
    let mut page = rd64(head, "ftrace_pages_start")?;
    let mut seen = 0usize;
    while page != 0 {
        seen += 1;
        if seen > MAX_PAGES {
            return Err(format!(
                "ftrace records: more than {MAX_PAGES} pages (a loop?)"
            ));
        }
        let recs = rd64(page.wrapping_add(o_recs), "ftrace_page.records")?;
        let mut b = [0u8; 4];
        t.paging
            .read_virt(mem, page.wrapping_add(o_index), &mut b)
            .map_err(|e| format!("ftrace records: ftrace_page.index at {page:#x}: {e}"))?;
        let n = u64::from(u32::from_le_bytes(b));
        if n > MAX_RECORDS {
            return Err(format!(
                "ftrace records: a page of {n} records at {page:#x}"
            ));
        }
        if n > 0 {
            let ip_of = |i: u64| rd64(recs.wrapping_add(i * rec_size), "dyn_ftrace.ip");
            let (first, last) = (ip_of(0)?, ip_of(n - 1)?);
            if (first..=last).contains(&ip) {
                // Sorted within a page (ftrace_process_locs sorts them).
                let (mut lo, mut hi) = (0u64, n);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    let v = ip_of(mid)?;
                    if v == ip {
                        let flags = rd64(
                            recs.wrapping_add(mid * rec_size + o_flags),
                            "dyn_ftrace.flags",
                        )?;
                        return Ok(Some(Record {
                            addr: recs.wrapping_add(mid * rec_size),
                            flags,
                            ipmodify: enum_or(t, "FTRACE_FL_IPMODIFY", FL_IPMODIFY_DEFAULT),
                            direct: enum_or(t, "FTRACE_FL_DIRECT", FL_DIRECT_DEFAULT),
                        }));
                    }
                    if v < ip {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
            }
        }
        page = rd64(page.wrapping_add(o_next), "ftrace_page.next")?;
    }
    Ok(None)
}
