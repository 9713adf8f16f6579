//! Decodes payloads made by the real compressors with the kernel build's own flags
//! (arch/x86/boot/compressed, scripts/Makefile.lib: `*_with_size` appends the size as le32).

use std::io::Write;
use std::process::{Command, Stdio};

use guest_images::bzimage::{decompress_payload, Compression};

/// `len` bytes of x86-64-looking data (BCJ has calls to convert).
fn sample(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x: u32 = 1;
    while v.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        // call rel32, mov, ret, plus some repeated text.
        v.push(0xe8);
        v.extend_from_slice(&(x >> 20).to_le_bytes());
        v.extend_from_slice(&[0x48, 0x89, 0xe5, 0xc3]);
        v.extend_from_slice(b"Linux version 6.1 ");
    }
    v.truncate(len);
    v
}

fn compress(tool: &str, args: &[&str], package: &str, data: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("`{tool}` is needed ({e}): apt-get install -y {package}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{tool} {args:?} failed");
    let mut stream = out.stdout;
    stream.extend_from_slice(&(data.len() as u32).to_le_bytes());
    stream
}

#[test]
fn payloads_from_the_kernel_build_commands_decode() {
    // 9 MiB for LZ4 so it needs two 8 MiB blocks; less for the slow compressors.
    let (small, large) = (sample(2 << 20), sample(9 << 20));
    let cases = [
        ("gzip", &["-n", "-f", "-9"][..], "gzip", Compression::Gzip),
        (
            "xz",
            &[
                "--check=crc32",
                "--x86",
                "--lzma2=preset=1,dict=32MiB",
                "-c",
            ][..],
            "xz-utils",
            Compression::Xz,
        ),
        (
            "lz4",
            &["-l", "-9", "-c"][..],
            "lz4",
            Compression::Lz4Legacy,
        ),
        (
            "zstd",
            &["--ultra", "-22", "-c", "-q"][..],
            "zstd",
            Compression::Zstd,
        ),
    ];
    for (tool, args, package, format) in cases {
        let data = if format == Compression::Lz4Legacy {
            &large
        } else {
            &small
        };
        let payload = compress(tool, args, package, data);
        assert_eq!(Compression::detect(&payload), Some(format), "{tool}");
        let out = decompress_payload(&payload).unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(&out == data, "{tool}: output differs");
        // A wrong size trailer and a truncated stream are errors.
        let mut wrong = payload.clone();
        let n = wrong.len();
        wrong[n - 4] ^= 1;
        assert!(decompress_payload(&wrong).is_err(), "{tool}");
        assert!(
            decompress_payload(&payload[..payload.len() / 2]).is_err(),
            "{tool}"
        );
    }
}
