//! The unload soak as a benchmark: `cargo run --release -p hvpatch-tests --example unload_soak
//! -- [6.1|6.12|both] [CYCLES] [ftrace|prologue]` (default: both kernels, 1000 cycles, the
//! ftrace-site function `version_proc_show`; `prologue`: `rb_simple_read`, which has no ftrace
//! site). Prints the numbers the README records; exits non-zero on any failure (see
//! `harness::soak`).

use harness::soak::{run_soak_target, SoakTarget};
use harness::KernelSeries;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("both");
    let cycles: usize = match args.get(1).map(|c| c.parse()) {
        None => 1000,
        Some(Ok(n)) if n > 0 => n,
        _ => {
            eprintln!("usage: unload_soak [6.1|6.12|both] [CYCLES] [ftrace|prologue]");
            std::process::exit(2);
        }
    };
    let series = match which {
        "6.1" => vec![KernelSeries::V6_1],
        "6.12" => vec![KernelSeries::V6_12],
        "both" => vec![KernelSeries::V6_1, KernelSeries::V6_12],
        _ => {
            eprintln!("usage: unload_soak [6.1|6.12|both] [CYCLES] [ftrace|prologue]");
            std::process::exit(2);
        }
    };
    let target = match args.get(2).map(String::as_str) {
        None | Some("ftrace") => SoakTarget::FtraceSite,
        Some("prologue") => SoakTarget::Prologue,
        _ => {
            eprintln!("usage: unload_soak [6.1|6.12|both] [CYCLES] [ftrace|prologue]");
            std::process::exit(2);
        }
    };
    let mut failed = false;
    for s in series {
        match run_soak_target(s, target, cycles, &mut |n, r| {
            eprintln!("{s:?}: {n} cycles, {} waited", r.waited)
        }) {
            Ok(rep) => print!("{rep}"),
            Err(e) => {
                eprintln!("{s:?}: soak FAILED: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
