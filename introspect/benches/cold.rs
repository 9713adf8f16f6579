//! Cold introspection time of a guest snapshot: scan RAM for kallsyms, decode every symbol,
//! compute and cross-check the KASLR slide (`Kernel::open`), plus its parts separately.
//!
//! `cargo bench -p hvpatch-introspect --bench cold -- <ram.bin> <regs.txt>`
//! (defaults: the 6.12 guest snapshot, see `tests/common/snapshot_dir.rs`).

mod common;

use common::{best, load_snapshot};
use introspect::{kallsyms, Kernel, SliceMemory};

fn main() {
    let (ram, vcpus) = load_snapshot();
    let mem = SliceMemory::flat(&ram);
    let runs = 5;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("decode") {
        let tt = kallsyms::scan_token_tables(&mem)[0];
        let (t, _) = best(50, || kallsyms::decode_at(&mem, tt).expect("decode"));
        println!("decode: {:.2} ms", t.as_secs_f64() * 1e3);
        return;
    }

    let (t_scan, cands) = best(runs, || kallsyms::scan_token_tables(&mem));
    let tt = *cands.first().expect("no token table found");
    let (t_decode, ks) = best(runs, || kallsyms::decode_at(&mem, tt).expect("decode"));
    let (t_open, k) = best(runs, || Kernel::open(&mem, &vcpus).expect("Kernel::open"));
    // Cold open + first use of the BTF/ORC model (BTF parse, ORC tables).
    let (t_model, model_ok) = best(runs, || {
        let k = Kernel::open(&mem, &vcpus).expect("Kernel::open");
        let ok = k.model(&mem).is_ok();
        ok
    });
    let (t_lookup, _) = best(runs, || {
        k.symbols()
            .iter()
            .take(10_000)
            .filter(|s| k.lookup(s.name, Some(1)).is_ok())
            .count()
    });
    let (t_symbolize, _) = best(runs, || {
        k.symbols()
            .iter()
            .take(10_000)
            .filter(|s| k.symbolize(s.addr + 1).is_some())
            .count()
    });
    println!("guest RAM:            {} MiB", ram.len() >> 20);
    println!(
        "kernel:               {:?}, {} symbols",
        k.info().release,
        ks.symbols.len()
    );
    println!(
        "full-RAM scan:        {:>8.2} ms  ({} token table(s); fallback path of open)",
        t_scan.as_secs_f64() * 1e3,
        cands.len()
    );
    println!(
        "decode all symbols:   {:>8.2} ms",
        t_decode.as_secs_f64() * 1e3
    );
    println!(
        "Kernel::open (cold):  {:>8.2} ms  (kernel-image frames scan + decode + slide checks + banner)",
        t_open.as_secs_f64() * 1e3
    );
    println!(
        "10k lookups:          {:>8.2} ms",
        t_lookup.as_secs_f64() * 1e3
    );
    println!(
        "10k symbolize:        {:>8.2} ms",
        t_symbolize.as_secs_f64() * 1e3
    );
    println!(
        "open + BTF/ORC model: {:>8.2} ms  (model built: {model_ok})",
        t_model.as_secs_f64() * 1e3
    );
    println!("(best of {runs} runs each)");
}
