//! bzImage payload extraction: setup header parsing and decompression to `vmlinux`.
//!
//! Layout (Documentation/arch/x86/boot.rst): the real-mode setup occupies `setup_sects + 1`
//! sectors of 512 bytes; the protected-mode part follows. `payload_offset`/`payload_length`
//! (boot protocol >= 2.08) locate the compressed kernel inside the protected-mode part. The
//! kernel's build appends the decompressed size as a little-endian u32 after the compressed
//! stream, so decoders must tolerate 4 trailing bytes.

use std::io::Read;

/// Offset of `setup_sects` (u8).
const SETUP_SECTS: usize = 0x1f1;
/// Offset of the `HdrS` magic (u32).
const HEADER_MAGIC_OFF: usize = 0x202;
/// Offset of the boot protocol version (u16).
const VERSION_OFF: usize = 0x206;
/// Offset of `payload_offset` (u32).
const PAYLOAD_OFFSET_OFF: usize = 0x248;
/// Offset of `payload_length` (u32).
const PAYLOAD_LENGTH_OFF: usize = 0x24c;
/// First boot protocol with payload fields.
const MIN_VERSION: u16 = 0x0208;

/// Decompressed kernels larger than this are rejected (decompression-bomb guard).
pub const MAX_VMLINUX: usize = 1 << 30;
/// Maximum uncompressed size of one LZ4 legacy block.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// LZ4 legacy frame magic.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;

/// ELF `e_machine` of x86-64.
const EM_X86_64: u16 = 62;

/// A payload compression format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`), usually with the x86 BCJ filter.
    Xz,
    /// LZ4 legacy frame (`02 21 4c 18`).
    Lz4Legacy,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// bzip2 (`BZh`), recognised but not supported.
    Bzip2,
    /// raw LZMA (`5d 00 00`), recognised but not supported.
    Lzma,
    /// LZO (`89 LZO`), recognised but not supported.
    Lzo,
}

impl Compression {
    /// Detects the format from the payload's first bytes.
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const TABLE: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4Legacy),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
        ];
        TABLE
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, c)| c)
    }
}

/// Errors of [`decompress_bzimage`].
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// The file is too short for the field being read.
    #[error("truncated bzImage: {what} at {offset:#x} is beyond the {len}-byte file")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Its offset.
        offset: usize,
        /// The file length.
        len: usize,
    },
    /// No `HdrS` magic at 0x202.
    #[error("not a bzImage: no HdrS magic at 0x202")]
    NoHeader,
    /// Boot protocol too old to describe the payload.
    #[error("boot protocol {0:#06x} has no payload fields (need >= 2.08)")]
    OldProtocol(u16),
    /// The payload range lies outside the file.
    #[error("payload {offset:#x}+{length:#x} lies outside the {len}-byte file")]
    PayloadOutOfBounds {
        /// Absolute payload start.
        offset: u64,
        /// Payload length.
        length: u64,
        /// File length.
        len: usize,
    },
    /// Unknown compression magic.
    #[error("unknown payload compression (first bytes {0:02x?})")]
    UnknownFormat(Vec<u8>),
    /// Known but unsupported compression.
    #[error("unsupported payload compression {0:?}")]
    Unsupported(Compression),
    /// The decoder rejected the stream.
    #[error("{format:?} stream is corrupt: {detail}")]
    Corrupt {
        /// The format.
        format: Compression,
        /// Decoder message.
        detail: String,
    },
    /// The output would exceed [`MAX_VMLINUX`].
    #[error("decompressed kernel exceeds {MAX_VMLINUX} bytes")]
    TooLarge,
    /// The appended size does not match the output.
    #[error("decompressed {actual} bytes but the payload trailer says {expected}")]
    SizeMismatch {
        /// The trailer's size.
        expected: u32,
        /// Bytes produced.
        actual: usize,
    },
    /// The output is not an x86-64 ELF file.
    #[error("decompressed payload is not an x86-64 ELF: {0}")]
    NotElf(&'static str),
}

/// Reads a little-endian integer of `N` bytes at `off`.
fn le<const N: usize>(bz: &[u8], off: usize, what: &'static str) -> Result<[u8; N], BzImageError> {
    off.checked_add(N)
        .and_then(|end| bz.get(off..end))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(BzImageError::Truncated {
            what,
            offset: off,
            len: bz.len(),
        })
}

/// Returns the compressed payload of a bzImage (including any trailing size bytes).
pub fn payload(bz: &[u8]) -> Result<&[u8], BzImageError> {
    if le::<4>(bz, HEADER_MAGIC_OFF, "HdrS magic")? != *b"HdrS" {
        return Err(BzImageError::NoHeader);
    }
    let version = u16::from_le_bytes(le(bz, VERSION_OFF, "protocol version")?);
    if version < MIN_VERSION {
        return Err(BzImageError::OldProtocol(version));
    }
    let [setup_sects] = le::<1>(bz, SETUP_SECTS, "setup_sects")?;
    // A zero setup_sects means 4 (boot.rst).
    let setup_sects = if setup_sects == 0 { 4 } else { setup_sects };
    let pm_start = (u64::from(setup_sects) + 1) * 512;
    let offset = u64::from(u32::from_le_bytes(le(
        bz,
        PAYLOAD_OFFSET_OFF,
        "payload_offset",
    )?));
    let length = u64::from(u32::from_le_bytes(le(
        bz,
        PAYLOAD_LENGTH_OFF,
        "payload_length",
    )?));
    let start = pm_start + offset;
    let out_of_bounds = BzImageError::PayloadOutOfBounds {
        offset: start,
        length,
        len: bz.len(),
    };
    let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(start + length)) else {
        return Err(out_of_bounds);
    };
    bz.get(start..end).ok_or(out_of_bounds)
}

/// Decompresses a bzImage's payload to the `vmlinux` ELF image and checks it is x86-64.
pub fn decompress_bzimage(bz: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let payload = payload(bz)?;
    let out = decompress_payload(payload)?;
    check_x86_64_elf(&out)?;
    Ok(out)
}

/// Decompresses a payload whose format is detected by magic.
pub fn decompress_payload(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let format = Compression::detect(payload)
        .ok_or_else(|| BzImageError::UnknownFormat(payload.iter().take(8).copied().collect()))?;
    // The size the build appended after the stream (all x86 formats use `*_with_size`).
    let trailer = payload
        .len()
        .checked_sub(4)
        .and_then(|s| payload.get(s..))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_le_bytes);
    let hint = trailer.map_or(0, |t| (t as usize).min(MAX_VMLINUX));
    let out = match format {
        Compression::Gzip => read_limited(format, flate2::read::GzDecoder::new(payload), hint)?,
        Compression::Xz => read_limited(format, lzma_rust2::XzReader::new(payload, false), hint)?,
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(payload)
                .map_err(|e| corrupt(format, e))?
                .single_frame();
            // `zstd --ultra -22` (the kernel build) uses a 128 MiB window; refuse larger ones.
            dec.window_log_max(27).map_err(|e| corrupt(format, e))?;
            read_limited(format, dec, hint)?
        }
        Compression::Lz4Legacy => lz4_legacy(payload, hint)?,
        other => return Err(BzImageError::Unsupported(other)),
    };
    match trailer {
        Some(expected) if expected as usize != out.len() => Err(BzImageError::SizeMismatch {
            expected,
            actual: out.len(),
        }),
        _ => Ok(out),
    }
}

/// Wraps a decoder error.
fn corrupt(format: Compression, e: impl std::fmt::Display) -> BzImageError {
    BzImageError::Corrupt {
        format,
        detail: e.to_string(),
    }
}

/// Reads a decoder to the end, at most [`MAX_VMLINUX`] bytes.
fn read_limited(format: Compression, r: impl Read, hint: usize) -> Result<Vec<u8>, BzImageError> {
    let mut out = Vec::with_capacity(hint);
    r.take(MAX_VMLINUX as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(format, e))?;
    if out.len() > MAX_VMLINUX {
        return Err(BzImageError::TooLarge);
    }
    Ok(out)
}

/// Decodes an LZ4 legacy frame: magic, then blocks of `u32 length` + LZ4 block, each at most
/// 8 MiB uncompressed. A repeated magic starts a concatenated frame; 4 trailing bytes (the size
/// trailer) end the stream.
fn lz4_legacy(payload: &[u8], hint: usize) -> Result<Vec<u8>, BzImageError> {
    let format = Compression::Lz4Legacy;
    let mut out = Vec::with_capacity(hint);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut rest = payload.get(4..).unwrap_or_default();
    let mut blocks = 0usize;
    while rest.len() >= 4 {
        let (len_bytes, tail) = rest.split_at(4);
        let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if len == LZ4_LEGACY_MAGIC {
            rest = tail;
            continue;
        }
        if tail.is_empty() && blocks > 0 {
            // The decompressed-size trailer; checked by the caller.
            break;
        }
        let Some(data) = tail.get(..len as usize) else {
            return Err(corrupt(
                format,
                format!("block of {len} bytes but only {} remain", tail.len()),
            ));
        };
        let n =
            lz4_flex::block::decompress_into(data, &mut block).map_err(|e| corrupt(format, e))?;
        let produced = block
            .get(..n)
            .ok_or_else(|| corrupt(format, "bad block size"))?;
        if out.len() + n > MAX_VMLINUX {
            return Err(BzImageError::TooLarge);
        }
        out.extend_from_slice(produced);
        blocks += 1;
        rest = tail.get(len as usize..).unwrap_or_default();
    }
    if blocks == 0 {
        return Err(corrupt(format, "no blocks"));
    }
    Ok(out)
}

/// Checks the ELF magic, 64-bit class, little-endian data and `EM_X86_64`.
pub fn check_x86_64_elf(elf: &[u8]) -> Result<(), BzImageError> {
    if !elf.starts_with(b"\x7fELF") {
        return Err(BzImageError::NotElf("no ELF magic"));
    }
    if elf.get(4) != Some(&2) {
        return Err(BzImageError::NotElf("not ELFCLASS64"));
    }
    if elf.get(5) != Some(&1) {
        return Err(BzImageError::NotElf("not little-endian"));
    }
    match elf.get(0x12..0x14) {
        Some(&[a, b]) if u16::from_le_bytes([a, b]) == EM_X86_64 => Ok(()),
        Some(_) => Err(BzImageError::NotElf("e_machine is not EM_X86_64")),
        None => Err(BzImageError::NotElf("truncated ELF header")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal x86-64 ELF header followed by compressible filler.
    fn fake_vmlinux(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2;
        v[5] = 1;
        v[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        for (i, b) in v.iter_mut().enumerate().skip(64) {
            *b = (i % 251) as u8 ^ (i / 4096) as u8;
        }
        v
    }

    /// Wraps a compressed stream (plus size trailer) in a minimal bzImage.
    fn fake_bzimage(stream: &[u8], decompressed: usize) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm_start = (setup_sects as usize + 1) * 512;
        let payload_off = 0x3c0usize;
        let mut payload = stream.to_vec();
        payload.extend_from_slice(&(decompressed as u32).to_le_bytes());
        let mut bz = vec![0u8; pm_start + payload_off];
        bz[SETUP_SECTS] = setup_sects;
        bz[HEADER_MAGIC_OFF..HEADER_MAGIC_OFF + 4].copy_from_slice(b"HdrS");
        bz[VERSION_OFF..VERSION_OFF + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[PAYLOAD_OFFSET_OFF..PAYLOAD_OFFSET_OFF + 4]
            .copy_from_slice(&(payload_off as u32).to_le_bytes());
        bz[PAYLOAD_LENGTH_OFF..PAYLOAD_LENGTH_OFF + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.extend_from_slice(&payload);
        bz.extend_from_slice(&[0xcc; 100]); // trailing data after the payload
        bz
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn lz4_legacy_stream(data: &[u8]) -> Vec<u8> {
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(&c);
        }
        s
    }

    fn xz_bcj(data: &[u8]) -> Vec<u8> {
        use lzma_rust2::{CheckType, FilterConfig, XzOptions, XzWriter};
        let mut opts = XzOptions::with_preset(1);
        opts.set_check_sum_type(CheckType::Crc32);
        opts.filters = vec![FilterConfig::new_bcj_x86(0)];
        let mut w = XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn every_supported_format_round_trips() {
        // 9 MiB so LZ4 needs two blocks.
        let vmlinux = fake_vmlinux(9 << 20);
        let streams = [
            (Compression::Gzip, gzip(&vmlinux)),
            (Compression::Lz4Legacy, lz4_legacy_stream(&vmlinux)),
            (
                Compression::Zstd,
                zstd::bulk::compress(&vmlinux, 3).unwrap(),
            ),
            (Compression::Xz, xz_bcj(&vmlinux)),
        ];
        for (format, stream) in streams {
            assert_eq!(Compression::detect(&stream), Some(format));
            let bz = fake_bzimage(&stream, vmlinux.len());
            let out = decompress_bzimage(&bz).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert!(out == vmlinux, "{format:?} output differs");
        }
    }

    #[test]
    fn size_trailer_mismatch_is_an_error() {
        let vmlinux = fake_vmlinux(100_000);
        let bz = fake_bzimage(&gzip(&vmlinux), vmlinux.len() + 1);
        assert!(matches!(
            decompress_bzimage(&bz),
            Err(BzImageError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn malformed_inputs_give_errors_not_panics() {
        let vmlinux = fake_vmlinux(300_000);
        assert!(matches!(
            decompress_bzimage(&[]),
            Err(BzImageError::Truncated { .. })
        ));
        assert!(matches!(
            decompress_bzimage(&[0u8; 0x300]),
            Err(BzImageError::NoHeader)
        ));
        // Garbage payloads of every kind, and truncations of valid ones at many points.
        for stream in [
            gzip(&vmlinux),
            lz4_legacy_stream(&vmlinux),
            zstd::bulk::compress(&vmlinux, 1).unwrap(),
            xz_bcj(&vmlinux),
        ] {
            let bz = fake_bzimage(&stream, vmlinux.len());
            for cut in [
                0,
                1,
                0x1f2,
                0x204,
                0x250,
                2048,
                2100,
                bz.len() / 2,
                bz.len() - 110,
            ] {
                assert!(decompress_bzimage(&bz[..cut]).is_err(), "cut at {cut}");
            }
            // Corrupt the middle of the stream.
            let mut bad = bz.clone();
            let mid = 2048 + 0x3c0 + stream.len() / 2;
            for b in &mut bad[mid..mid + 64] {
                *b ^= 0x5a;
            }
            assert!(decompress_bzimage(&bad).is_err());
        }
        // Payload fields pointing outside the file.
        let mut bz = fake_bzimage(&gzip(&vmlinux), vmlinux.len());
        bz[PAYLOAD_LENGTH_OFF..PAYLOAD_LENGTH_OFF + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress_bzimage(&bz),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        // Unknown magic.
        let bz = fake_bzimage(b"garbage garbage", 10);
        assert!(matches!(
            decompress_bzimage(&bz),
            Err(BzImageError::UnknownFormat(_))
        ));
        // LZ4 block length larger than what remains.
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        s.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
        s.extend_from_slice(&[0; 16]);
        assert!(decompress_bzimage(&fake_bzimage(&s, 10)).is_err());
        // Valid stream, but not an x86-64 ELF.
        let mut not_elf = vmlinux.clone();
        not_elf[0x12] = 0xb7; // EM_AARCH64
        assert!(matches!(
            decompress_bzimage(&fake_bzimage(&gzip(&not_elf), not_elf.len())),
            Err(BzImageError::NotElf(_))
        ));
    }
}
