//! Makes (or refreshes) the guest memory snapshots the introspect and patcher snapshot tests
//! read: `cargo run --release -p hvpatch-tests --example snapshots`. Up-to-date snapshots
//! (same kernel release) are skipped. Output: `$HVPATCH_DUMPS` or `<image cache>/snapshots`.

use std::time::Instant;

use harness::snapshot::{make, snapshots_dir, Outcome, SnapshotKind};

fn main() {
    let root = snapshots_dir();
    let all = Instant::now();
    for kind in SnapshotKind::ALL {
        let t = Instant::now();
        match make(kind, &root) {
            Ok(Outcome::UpToDate(dir)) => {
                println!("snapshots: {kind}: up to date ({})", dir.display())
            }
            Ok(Outcome::Made {
                dir,
                stacks_kept,
                stacks_dropped,
            }) => println!(
                "snapshots: {kind}: made {} in {:.1} s ({stacks_kept} stacks kept, {stacks_dropped} dropped)",
                dir.display(),
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("snapshots: {kind}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "snapshots: done in {:.1} s ({})",
        all.elapsed().as_secs_f64(),
        root.display()
    );
}
