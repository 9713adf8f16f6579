//! Per entry site, the stack of patches replacing it — klp's `func_stack`: the newest entry
//! is the one running; unloading it retargets the site to the one below, and with no entry
//! left the original bytes come back.

use serde::{Deserialize, Serialize};

use crate::site;

/// One patch's replacement of a site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StackEntry {
    /// Patch name.
    pub(crate) patch: String,
    /// Its new function (the site's jmp target while this entry is on top).
    #[serde(with = "introspect::hex")]
    pub(crate) new_addr: u64,
    /// Its size in bytes.
    #[serde(default)]
    pub(crate) new_size: u64,
}

/// The patches replacing one entry site, oldest first, with the bytes it had before any.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SiteStack {
    /// The replaced function.
    pub(crate) func: String,
    /// Guest-physical address of the site.
    #[serde(with = "introspect::hex")]
    pub(crate) site_pa: u64,
    /// The site's bytes before any patch (the ftrace NOP).
    pub(crate) original: [u8; 5],
    /// The patches replacing it, in load order (the last one runs).
    pub(crate) entries: Vec<StackEntry>,
    /// During a transition of the top entry: the bytes the site holds (a jmp to the dispatcher
    /// stub, or, for an immediate function, the version it switched to at once).
    #[serde(default)]
    pub(crate) during: Option<[u8; 5]>,
}

impl SiteStack {
    /// The bytes the site at `site` holds now: the top entry's jmp, or the original bytes.
    pub(crate) fn current_bytes(&self, site: u64) -> [u8; 5] {
        if let Some(b) = self.during {
            return b;
        }
        match self.entries.last() {
            Some(e) => site::jmp_bytes(site, e.new_addr).unwrap_or(self.original),
            None => self.original,
        }
    }
}

impl SiteStack {
    /// The version under the top entry: where it starts (the previous patch's function, or
    /// `orig`, the original: the body after the site, or a prologue rewrite's trampoline) and,
    /// for a patch, its `[start, end)`.
    pub(crate) fn below_top(&self, orig: u64) -> (u64, Option<(u64, u64)>) {
        match self
            .entries
            .len()
            .checked_sub(2)
            .and_then(|i| self.entries.get(i))
        {
            Some(e) => (
                e.new_addr,
                Some((e.new_addr, e.new_addr + e.new_size.max(1))),
            ),
            None => (orig, None),
        }
    }

    /// The bytes the site holds when the top entry is gone: the jmp of the one below, or the
    /// original.
    pub(crate) fn below_bytes(&self, site: u64) -> [u8; 5] {
        match self
            .entries
            .len()
            .checked_sub(2)
            .and_then(|i| self.entries.get(i))
        {
            Some(e) => site::jmp_bytes(site, e.new_addr).unwrap_or(self.original),
            None => self.original,
        }
    }

    /// The version on top now (before pushing another entry): as [`SiteStack::below_top`].
    pub(crate) fn top(&self, orig: u64) -> (u64, Option<(u64, u64)>) {
        match self.entries.last() {
            Some(e) => (
                e.new_addr,
                Some((e.new_addr, e.new_addr + e.new_size.max(1))),
            ),
            None => (orig, None),
        }
    }
}
