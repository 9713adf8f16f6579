//! The kallsyms parser on small synthetic tables in both table orders (with and without
//! `seqs_of_names`), and the fuzz seeds made from them.

mod common;

use common::synth::{build, Order};
use introspect::kallsyms::{self, TableOrder};
use introspect::SymbolError;

#[test]
fn synthetic_tables_decode_in_both_orders() {
    let text = 0xffff_ffff_a000_0000;
    for (order, want) in [
        (Order::New, TableOrder::New),
        (Order::Old { seqs: true }, TableOrder::Old),
        (Order::Old { seqs: false }, TableOrder::Old),
    ] {
        for n in [5usize, 255, 256, 257, 1000] {
            let s = build(order, n, text);
            let k = kallsyms::parse(&s.bytes, 0, s.tt_off)
                .unwrap_or_else(|e| panic!("{order:?} n={n}: {e}"));
            assert_eq!(k.layout.order, want, "{order:?} n={n}");
            assert_eq!(k.layout.relative_base, text);
            assert_eq!(
                k.layout.seqs_of_names_pa.is_some(),
                order != Order::Old { seqs: false }
            );
            let got: Vec<_> = k
                .symbols
                .iter()
                .map(|x| (x.kind, x.name.to_string(), x.addr))
                .collect();
            assert_eq!(got, s.syms, "{order:?} n={n}");
            if n > 100 {
                assert!(matches!(
                    k.symbols.lookup("dup_name", None),
                    Err(SymbolError::Ambiguous { .. })
                ));
                assert_eq!(k.symbols.lookup("dup_name", Some(1)), Ok(text + 0x10 * 50));
                assert_eq!(k.symbols.lookup("dup_name", Some(2)), Ok(text + 0x10 * 100));
            }
            // Same tables at a base that is not 8-aligned relative to the slice start.
            let mut shifted = vec![0u8; 3];
            shifted.extend_from_slice(&s.bytes);
            let k2 = kallsyms::parse(&shifted, 0x1000 - 3, s.tt_off + 3).unwrap();
            assert_eq!(k2.symbols.len(), n);
        }
    }
}

/// Writes fuzz seeds (`introspect/fuzz/seeds/kallsyms/`) in the fuzz target's input format:
/// `[tt_off u16][base & 7][bytes]`. Run with HVPATCH_WRITE_FUZZ_SEEDS=1; otherwise it only
/// checks that the seeds parse.
#[test]
fn fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/kallsyms");
    for (i, order) in [
        Order::New,
        Order::Old { seqs: true },
        Order::Old { seqs: false },
    ]
    .into_iter()
    .enumerate()
    {
        let s = build(order, 300, 0xffff_ffff_8100_0000);
        let mut seed = (s.tt_off as u16).to_le_bytes().to_vec();
        seed.push(0);
        seed.extend_from_slice(&s.bytes);
        assert!(kallsyms::parse(&seed[3..], 0, s.tt_off).is_ok());
        if std::env::var_os("HVPATCH_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{i}")), &seed).unwrap();
        }
    }
}

/// Memory crafted so that every 8-aligned position below the token table looks like a
/// `num_syms` header followed by plausible names: the search is bounded by its step budget.
#[test]
fn crafted_names_search_is_bounded() {
    let s = build(Order::New, 300, 0xffff_ffff_8100_0000);
    // Keep the token table + index, replace everything below it.
    let tail = &s.bytes[s.tt_off..];
    let mut bytes = Vec::new();
    for _ in 0..(4 << 20) / 8 {
        // len 7, tokens 'a' 0 0 0 0 0 0: as a header, N = 0x6107 and pad = 0; each candidate
        // walks N plausible entries before its markers fail to match.
        bytes.extend_from_slice(&[7, b'a', 0, 0, 0, 0, 0, 0]);
    }
    let tt_off = bytes.len();
    bytes.extend_from_slice(tail);
    let t = std::time::Instant::now();
    let r = kallsyms::parse(&bytes, 0, tt_off);
    assert!(r.is_err());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    eprintln!(
        "crafted names region rejected in {:?}: {}",
        t.elapsed(),
        r.err().unwrap()
    );
}

/// The model can be shared across threads (API server, engine).
#[test]
fn kernel_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<introspect::Kernel>();
    check::<introspect::Symbols>();
    check::<introspect::KernelInfo>();
}
