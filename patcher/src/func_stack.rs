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
}

impl SiteStack {
    /// The bytes the site at `site` holds now: the top entry's jmp, or the original bytes.
    pub(crate) fn current_bytes(&self, site: u64) -> [u8; 5] {
        match self.entries.last() {
            Some(e) => site::jmp_bytes(site, e.new_addr).unwrap_or(self.original),
            None => self.original,
        }
    }
}
