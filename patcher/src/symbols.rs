//! Where the engine gets guest symbols: [`SymbolSource`], implemented by a plain
//! [`SymbolMap`] (explicit symbols, `/proc/kallsyms` text) and, in [`crate::kernel`], by
//! `introspect::Kernel`.

use std::collections::BTreeMap;

use introspect::{Module, ModuleState, ModuleSymbol, PhysMemory};

/// A loaded kernel module as a patch object sees it: the module (name, state, regions) and
/// its symbol table, read from guest memory at one moment.
#[derive(Debug, Clone)]
pub struct ModuleSyms {
    /// The module.
    pub module: Module,
    /// Its symbols in `/proc/kallsyms` order (undefined ones included; only defined ones
    /// resolve).
    pub symbols: Vec<ModuleSymbol>,
}

impl ModuleSyms {
    /// Addresses of the defined symbols named `name`, in the module's kallsyms order (the
    /// order klp's sympos counts in, within one object).
    pub fn addresses(&self, name: &str) -> Vec<u64> {
        self.symbols
            .iter()
            .filter(|s| s.defined && s.name == name)
            .map(|s| s.addr)
            .collect()
    }

    /// Size of the symbol at `addr`: up to the next defined symbol of the module or the end of
    /// its region (`find_kallsyms_symbol`).
    pub fn size_of(&self, addr: u64) -> Option<u64> {
        introspect::modsyms::symbol_size(&self.symbols, &self.module, addr)
    }

    /// Why a patch may not touch the module now, if it may not: only a live module (not
    /// being loaded or unloaded) is patched.
    pub fn not_live(&self) -> Option<String> {
        match self.module.state {
            ModuleState::Live => None,
            ModuleState::Coming => {
                Some("is being loaded (state COMING: its init runs); retry once it is live".into())
            }
            ModuleState::Going => Some("is being unloaded (state GOING)".into()),
            ModuleState::Unknown => Some("is in an unknown state".into()),
        }
    }
}

/// Guest kernel symbols.
pub trait SymbolSource {
    /// All addresses of symbols named `name`, in kallsyms (address) order. Empty if unknown.
    fn addresses(&self, name: &str) -> Vec<u64>;
    /// The symbol containing `addr`: `(name, offset)`.
    fn symbolize(&self, addr: u64) -> Option<(String, u64)>;
    /// Length of the symbol starting at `addr`: the distance to the next higher symbol (its
    /// kallsyms end); `None` if no symbol starts there or it is unknown.
    fn size_of(&self, _addr: u64) -> Option<u64> {
        None
    }
    /// An enumerator's value from the guest's type information (BTF), e.g.
    /// `("pageflags", "PG_reserved")`; `None` if unknown.
    fn enum_value(&self, _enum_name: &str, _enumerator: &str) -> Option<i64> {
        None
    }
    /// Size of `struct <name>` from the guest's type information; `None` if unknown.
    fn type_size(&self, _struct_name: &str) -> Option<u64> {
        None
    }
    /// Offset of `member` in `struct <name>` from the guest's type information; `None` if
    /// unknown.
    fn member_offset(&self, _struct_name: &str, _member: &str) -> Option<u64> {
        None
    }
    /// The loaded kernel module `name` with its symbols, read now from `mem`: `Ok(None)` when
    /// no module of that name is loaded, `Err` when this source cannot read modules.
    fn module(&self, _mem: &dyn PhysMemory, name: &str) -> Result<Option<ModuleSyms>, String> {
        Err(format!(
            "module {name}: this symbol source has no module information"
        ))
    }
}

/// An explicit symbol table: name → addresses, plus an address-sorted index for symbolizing.
#[derive(Debug, Clone, Default)]
pub struct SymbolMap {
    by_name: BTreeMap<String, Vec<u64>>,
    by_addr: BTreeMap<u64, String>,
    enums: BTreeMap<(String, String), i64>,
}

impl SymbolMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a symbol (duplicates of a name keep insertion order, which should be address order).
    pub fn insert(&mut self, name: &str, addr: u64) {
        self.by_name.entry(name.to_string()).or_default().push(addr);
        self.by_addr.entry(addr).or_insert_with(|| name.to_string());
    }

    /// Records an enumerator value (see [`SymbolSource::enum_value`]).
    pub fn insert_enum(&mut self, enum_name: &str, enumerator: &str, value: i64) {
        self.enums
            .insert((enum_name.to_string(), enumerator.to_string()), value);
    }

    /// Parses `/proc/kallsyms` text (`addr type name [module]`), skipping `__pfx_` padding
    /// symbols for symbolizing and module symbols entirely. Lines sorted by address.
    pub fn from_kallsyms(text: &str) -> Self {
        let mut m = Self::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(a), Some(_t), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if it.next().is_some() {
                continue; // [module]
            }
            let Ok(addr) = u64::from_str_radix(a, 16) else {
                continue;
            };
            m.by_name.entry(name.to_string()).or_default().push(addr);
            if !name.starts_with("__pfx_") {
                m.by_addr.entry(addr).or_insert_with(|| name.to_string());
            }
        }
        m
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Names that occur at more than one distinct address.
    pub fn duplicated_names(&self) -> impl Iterator<Item = (&str, &[u64])> {
        self.by_name.iter().filter_map(|(n, v)| {
            let first = *v.first()?;
            v.iter()
                .any(|&a| a != first)
                .then_some((n.as_str(), v.as_slice()))
        })
    }
}

impl SymbolSource for SymbolMap {
    fn addresses(&self, name: &str) -> Vec<u64> {
        self.by_name.get(name).cloned().unwrap_or_default()
    }

    fn symbolize(&self, addr: u64) -> Option<(String, u64)> {
        let (a, n) = self.by_addr.range(..=addr).next_back()?;
        Some((n.clone(), addr - a))
    }

    fn size_of(&self, addr: u64) -> Option<u64> {
        self.by_addr.get(&addr)?;
        let (next, _) = self.by_addr.range(addr + 1..).next()?;
        Some(next - addr)
    }

    fn enum_value(&self, enum_name: &str, enumerator: &str) -> Option<i64> {
        self.enums
            .get(&(enum_name.to_string(), enumerator.to_string()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_text() {
        let m = SymbolMap::from_kallsyms(
            "ffffffff81000000 T _text\nffffffff81000010 t __pfx_foo\nffffffff81000020 t foo\n\
             ffffffff81000040 t foo\nffffffffc0000000 t modfn [mod]\nbad line\n",
        );
        assert_eq!(
            m.addresses("foo"),
            vec![0xffffffff81000020, 0xffffffff81000040]
        );
        assert!(m.addresses("modfn").is_empty());
        assert_eq!(
            m.symbolize(0xffffffff81000018),
            Some(("_text".into(), 0x18))
        );
        assert_eq!(m.symbolize(0xffffffff81000045), Some(("foo".into(), 5)));
        assert_eq!(m.duplicated_names().count(), 1);
        assert_eq!(m.size_of(0xffffffff81000020), Some(0x20));
        assert_eq!(m.size_of(0xffffffff81000021), None);
    }
}
