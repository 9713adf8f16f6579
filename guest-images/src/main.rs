//! `hvpatch-images`: fetch and build guest images.

use clap::{Parser, Subcommand};

/// Fetch and build the guest kernels, initramfs and test programs hvpatch tests boot.
#[derive(Parser)]
#[command(name = "hvpatch-images", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch/build whatever is missing or stale (idempotent), then list the cached paths.
    Fetch {
        /// Print only `KEY=path` lines (for scripts).
        #[arg(long)]
        print: bool,
    },
    /// List the cached paths without fetching or building; fails if anything is missing.
    Show,
}

/// Renders the cached paths; `machine` selects `KEY=path` lines.
fn render(images: &guest_images::Images, machine: bool) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    if !machine {
        line(format!("cache: {}", images.cache.display()));
    }
    for k in &images.kernels {
        let s = k.series.to_string().replace('.', "_");
        if machine {
            line(format!("KERNEL_{s}_RELEASE={}", k.release));
            line(format!("KERNEL_{s}_BZIMAGE={}", k.bzimage.display()));
            line(format!("KERNEL_{s}_VMLINUX={}", k.vmlinux.display()));
            line(format!("KERNEL_{s}_CONFIG={}", k.config.display()));
        } else {
            line(format!("kernel {} ({}):", k.series, k.release));
            line(format!("  bzimage {}", k.bzimage.display()));
            line(format!("  vmlinux {}", k.vmlinux.display()));
            line(format!("  config  {}", k.config.display()));
        }
    }
    if machine {
        line(format!("INITRAMFS={}", images.initramfs.display()));
        line(format!("PROGS={}", images.progs.display()));
    } else {
        line(format!("initramfs {}", images.initramfs.display()));
        line(format!("progs     {}", images.progs.display()));
    }
    out
}

/// Prints to stdout, ignoring a closed pipe (e.g. `| head`).
fn print(images: &guest_images::Images, machine: bool) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(render(images, machine).as_bytes());
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Fetch { print: machine } => guest_images::ensure().map(|i| print(&i, machine)),
        Cmd::Show => guest_images::existing().map(|i| print(&i, false)),
    };
    if let Err(e) = result {
        eprintln!("hvpatch-images: error: {e}");
        std::process::exit(1);
    }
}
