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

fn print(images: &guest_images::Images, machine: bool) {
    if !machine {
        println!("cache: {}", images.cache.display());
    }
    for k in &images.kernels {
        let s = k.series.to_string().replace('.', "_");
        if machine {
            println!("KERNEL_{s}_RELEASE={}", k.release);
            println!("KERNEL_{s}_BZIMAGE={}", k.bzimage.display());
            println!("KERNEL_{s}_VMLINUX={}", k.vmlinux.display());
            println!("KERNEL_{s}_CONFIG={}", k.config.display());
        } else {
            println!("kernel {} ({}):", k.series, k.release);
            println!("  bzimage {}", k.bzimage.display());
            println!("  vmlinux {}", k.vmlinux.display());
            println!("  config  {}", k.config.display());
        }
    }
    if machine {
        println!("INITRAMFS={}", images.initramfs.display());
        println!("PROGS={}", images.progs.display());
    } else {
        println!("initramfs {}", images.initramfs.display());
        println!("progs     {}", images.progs.display());
    }
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
