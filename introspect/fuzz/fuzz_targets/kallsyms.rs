//! Fuzz the kallsyms table parser: the first two bytes pick the token-table offset and the
//! base alignment, the rest is "guest memory" around the tables.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let bytes = &data[3..];
    let tt = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let base = u64::from(data[2] & 7);
    if let Ok(k) = introspect::kallsyms::parse(bytes, base, tt.min(bytes.len())) {
        let s = &k.symbols;
        for sym in s.iter().take(64) {
            let _ = s.lookup(sym.name, None);
            let _ = s.symbolize(sym.addr.wrapping_add(1));
        }
    }
});
