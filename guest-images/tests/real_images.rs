//! Tests on the real cached images. They fail (never skip) with a how-to when the cache is
//! missing: run `cargo run -p hvpatch-guest-images -- fetch`.

use std::io::Read;

use guest_images::bzimage::{payload, Compression};
use guest_images::cpio::{self, S_IFCHR, S_IFDIR, S_IFREG};
use guest_images::{decompress_bzimage, existing, initramfs, progs, KernelSeries};

fn images() -> guest_images::Images {
    existing().unwrap_or_else(|e| panic!("guest images unavailable: {e}"))
}

#[test]
fn real_kernels_decompress_to_the_cached_vmlinux_with_their_banner() {
    let images = images();
    for series in KernelSeries::all() {
        let k = images.kernel(series).expect("kernel of every series");
        let bz = std::fs::read(&k.bzimage).unwrap();
        // Debian builds 6.1 with LZ4 and 6.12 with zstd: both decoders run on real data.
        let expected_format = match series {
            KernelSeries::V6_1 => Compression::Lz4Legacy,
            KernelSeries::V6_12 => Compression::Zstd,
        };
        assert_eq!(
            Compression::detect(payload(&bz).unwrap()),
            Some(expected_format),
            "{series}"
        );
        let vmlinux = decompress_bzimage(&bz).unwrap_or_else(|e| panic!("{series}: {e}"));
        assert_eq!(&vmlinux[..4], b"\x7fELF");
        assert_eq!(
            u16::from_le_bytes([vmlinux[0x12], vmlinux[0x13]]),
            62,
            "EM_X86_64"
        );
        let banner = format!("Linux version {} ", k.release);
        assert!(
            memchr::memmem::find(&vmlinux, banner.as_bytes()).is_some(),
            "{series}: no `{banner}` in vmlinux"
        );
        // The cached vmlinux is exactly this decompression.
        let cached = std::fs::read(&k.vmlinux).unwrap();
        assert!(cached == vmlinux, "{series}: cached vmlinux differs");
        // The release agrees with the kernel's own config and the series.
        let config = std::fs::read_to_string(&k.config).unwrap();
        assert!(config.contains("CONFIG_X86_64=y"), "{series}: config");
        assert!(
            k.release.starts_with(&format!("{series}.")),
            "{}",
            k.release
        );
    }
}

#[test]
fn truncated_real_bzimage_is_an_error() {
    let images = images();
    let k = images.kernel(KernelSeries::V6_12).unwrap();
    let bz = std::fs::read(&k.bzimage).unwrap();
    let p = payload(&bz).unwrap();
    let start = p.as_ptr() as usize - bz.as_ptr() as usize;
    let end = start + p.len();
    // Cuts in the header, inside the payload and just before its size trailer.
    for cut in [0x200, 0x1000, start + p.len() / 2, end - 5] {
        assert!(decompress_bzimage(&bz[..cut]).is_err(), "cut at {cut:#x}");
    }
    // A corrupted byte in the middle of the stream.
    let mut bad = bz.clone();
    bad[start + p.len() / 2] ^= 0xff;
    assert!(decompress_bzimage(&bad).is_err());
}
#[test]
fn initramfs_parses_back_with_init_busybox_and_programs() {
    let images = images();
    let gz = std::fs::read(&images.initramfs).unwrap();
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut archive)
        .unwrap();
    let entries = cpio::parse(&archive).unwrap();
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name} in the initramfs"))
    };
    let init = get("init");
    assert_eq!(init.file_type(), S_IFREG);
    assert_eq!(init.mode & 0o111, 0o111, "init is executable");
    assert_eq!(init.data, initramfs::INIT.as_bytes());
    let init_text = String::from_utf8_lossy(&init.data);
    for needle in [
        "mount -t tracefs tracefs /sys/kernel/tracing",
        "mount -t debugfs debugfs /sys/kernel/debug",
        "echo \"hvpatch-guest: ready\"",
        "exec setsid cttyhack /bin/sh",
    ] {
        assert!(init_text.contains(needle), "init lacks {needle:?}");
    }
    assert_eq!(
        get("bin/busybox").data,
        std::fs::read(initramfs::BUSYBOX).unwrap()
    );
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        assert_eq!(get(d).file_type(), S_IFDIR, "{d}");
    }
    let console = get("dev/console");
    assert_eq!((console.file_type(), console.rdev), (S_IFCHR, (5, 1)));
    for prog in progs::PROGS {
        let e = get(&format!("bin/{}", prog.name));
        assert_eq!(e.data, std::fs::read(images.progs.join(prog.name)).unwrap());
        assert_eq!(&e.data[..4], b"\x7fELF", "{}", prog.name);
    }
}
