//! Error types of the kernel model (paging, kallsyms, symbols, KASLR slide, `Kernel`).
//!
//! Every failure caused by guest data is a typed error: nothing in this crate panics on what a
//! guest wrote.

use thiserror::Error;

use crate::memory::MemError;

/// Errors walking guest page tables.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PagingError {
    /// The virtual address is not canonical for the paging mode.
    #[error("{va:#x} is not a canonical {levels}-level virtual address")]
    NonCanonical {
        /// The address.
        va: u64,
        /// Paging levels (4 or 5).
        levels: u8,
    },
    /// A paging-structure entry on the way is not present.
    #[error("{va:#x}: level-{level} entry at pa {entry_pa:#x} is not present ({value:#x})")]
    NotPresent {
        /// The address being translated.
        va: u64,
        /// Level of the entry (5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT).
        level: u8,
        /// Guest-physical address of the entry.
        entry_pa: u64,
        /// Raw entry value.
        value: u64,
    },
    /// An entry (or the root) points outside guest RAM.
    #[error("{va:#x}: level-{level} entry {value:#x} points at pa {target:#x}, outside guest RAM")]
    OutsideRam {
        /// The address being translated.
        va: u64,
        /// Level of the entry whose target is outside RAM (6 = the root itself).
        level: u8,
        /// Raw entry value (the root address for level 6).
        value: u64,
        /// The physical address it points at.
        target: u64,
    },
    /// An entry has a reserved bit set (PS in a PML4/PML5 entry).
    #[error("{va:#x}: level-{level} entry {value:#x} has reserved bits set")]
    Reserved {
        /// The address being translated.
        va: u64,
        /// Level of the entry.
        level: u8,
        /// Raw entry value.
        value: u64,
    },
    /// The paging mode is not supported (only 4- and 5-level long mode).
    #[error("unsupported paging mode: {0} levels")]
    Levels(u8),
    /// A virtual range wraps around the address space.
    #[error("virtual range {va:#x}+{len:#x} wraps around")]
    Wraps {
        /// Start.
        va: u64,
        /// Length.
        len: u64,
    },
}

/// Errors finding or decoding the kallsyms tables.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KallsymsError {
    /// No candidate token table was found in guest RAM.
    #[error("no kallsyms token table found in guest RAM")]
    NoTokenTable,
    /// A token table was found but no consistent set of tables around it.
    #[error("kallsyms tables near pa {token_table_pa:#x} are inconsistent: {reason}")]
    Inconsistent {
        /// Guest-physical address of the token table candidate.
        token_table_pa: u64,
        /// What failed.
        reason: String,
    },
    /// A table extends outside the bytes available.
    #[error("kallsyms table {table} is truncated")]
    Truncated {
        /// Which table.
        table: &'static str,
    },
    /// A field holds an impossible value.
    #[error("kallsyms {what} is invalid: {value:#x}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// Reading guest memory failed.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// Errors looking up a symbol by name.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SymbolError {
    /// No symbol has this name.
    #[error("unknown symbol {name:?}")]
    Unknown {
        /// The name.
        name: String,
    },
    /// Several symbols have this name and no (non-zero) position was given.
    #[error(
        "symbol {name:?} is ambiguous: {count} symbols have this name ({}); give sympos 1..={count}",
        positions(addrs)
    )]
    Ambiguous {
        /// The name.
        name: String,
        /// How many symbols have it.
        count: u32,
        /// Their addresses in kallsyms order (sympos 1, 2, ...).
        addrs: Vec<u64>,
    },
    /// The position is larger than the number of symbols with this name.
    #[error("symbol {name:?} has no position {sympos}: only {count} symbols have this name")]
    NoSuchPos {
        /// The name.
        name: String,
        /// The requested 1-based position.
        sympos: u64,
        /// How many symbols have it.
        count: u32,
    },
}

/// `"sympos 1 = 0x…, 2 = 0x…"` for an ambiguous name's candidates.
fn positions(addrs: &[u64]) -> String {
    let list: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{} = {a:#x}", i + 1))
        .collect();
    format!("sympos {}", list.join(", "))
}

/// Errors computing or cross-checking the KASLR slide.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SlideError {
    /// The slide is not a multiple of 2 MiB.
    #[error("KASLR slide {slide:#x} (runtime _text {text:#x}) is not 2 MiB aligned")]
    Misaligned {
        /// The slide.
        slide: u64,
        /// Runtime `_text`.
        text: u64,
    },
    /// Two independent sources disagree.
    #[error("slide check {check} failed: expected {expected:#x}, found {found:#x}")]
    Disagree {
        /// Which check.
        check: &'static str,
        /// Value derived from kallsyms.
        expected: u64,
        /// Value found by the independent source.
        found: u64,
    },
    /// A symbol the checks need is missing from the table.
    #[error("symbol {0} needed for the slide checks is missing")]
    MissingSymbol(&'static str),
    /// The kernel image could not be translated.
    #[error("translating {what} failed: {source}")]
    Paging {
        /// What was translated.
        what: &'static str,
        /// The paging error.
        #[source]
        source: PagingError,
    },
}

/// Errors building or using a [`crate::Kernel`].
#[derive(Debug, Error)]
pub enum KernelError {
    /// No vCPU is in 64-bit long mode with paging on.
    #[error("no vCPU is in 64-bit long mode with paging enabled")]
    NoLongModeVcpu,
    /// kallsyms could not be found or decoded.
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    /// Every kallsyms candidate failed the slide cross-checks; the last failure is given.
    #[error("kallsyms found but not confirmed by the page tables / registers: {0}")]
    Slide(#[from] SlideError),
    /// Page walk failure.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// Guest memory read failure.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Symbol lookup failure.
    #[error(transparent)]
    Symbol(#[from] SymbolError),
    /// The guest no longer runs the kernel this model was built for (rebooted?).
    #[error("kernel model is stale: {what} was {expected:#x}, now {found:#x}")]
    Stale {
        /// What changed.
        what: &'static str,
        /// Value at open.
        expected: u64,
        /// Value now.
        found: u64,
    },
}
