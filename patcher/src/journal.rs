//! The engine's journal in guest memory: what a restarted server needs to find the patches
//! and a transition in progress from the guest alone (no host state file).
//!
//! Two slots (A/B) of [`SLOT_PAGES`] physically contiguous arena pages each, never mapped into
//! the guest. Each write goes to the slot not holding the newest record, so a writer that dies
//! mid-write leaves the other slot intact. A slot is a 64-byte header and a zstd payload (the
//! engine state as JSON, [`crate::Engine::journal_state`]):
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..8   | magic `HVPJRNL\x01`                                |
//! | 8..12  | format version (1)                                 |
//! | 12..16 | header length (64)                                 |
//! | 16..24 | sequence number (the newest valid slot wins)       |
//! | 24..28 | payload length (compressed)                        |
//! | 28..32 | state length (uncompressed)                        |
//! | 32..64 | HMAC-SHA256 over bytes 0..32 and the payload       |
//!
//! The guest can write these pages. A record counts only if its HMAC verifies with the host's
//! key, so a guest can neither forge one nor alter one; it can replay an older record of its
//! own, which the caller's check against the guest's entry sites and arena mapping
//! ([`crate::Engine::check`]) then has to accept or refuse, exactly as for a state file.

use hmac::{Hmac, Mac};
use introspect::PhysMemory;
use sha2::Sha256;
use thiserror::Error;

/// Pages per slot.
pub const SLOT_PAGES: usize = 4;
/// Bytes per slot.
pub const SLOT_BYTES: usize = SLOT_PAGES * 4096;
/// Slots.
pub const SLOTS: usize = 2;
/// Record magic.
pub const MAGIC: [u8; 8] = *b"HVPJRNL\x01";
/// Format version.
pub const VERSION: u32 = 1;
/// Header bytes.
pub const HEADER: usize = 64;
/// Largest uncompressed state accepted when decoding.
pub const MAX_STATE: usize = 16 << 20;

/// The host key that authenticates records.
#[derive(Clone)]
pub struct JournalKey(pub [u8; 32]);

impl std::fmt::Debug for JournalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JournalKey(..)")
    }
}

/// Errors encoding or decoding a journal record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JournalError {
    /// The state does not fit a slot, even compressed.
    #[error("journal: the state ({raw} bytes, {packed} compressed) does not fit a {SLOT_BYTES}-byte slot")]
    TooLarge {
        /// Uncompressed bytes.
        raw: usize,
        /// Compressed bytes.
        packed: usize,
    },
    /// Compression failed.
    #[error("journal: compressing the state: {0}")]
    Compress(String),
    /// No record magic.
    #[error("no journal record")]
    NoMagic,
    /// A field of the header is out of bounds.
    #[error("journal record: {0}")]
    Malformed(String),
    /// The HMAC does not verify.
    #[error("journal record not authenticated by this host's key (another host wrote it, or the guest changed it)")]
    BadMac,
    /// The payload does not decompress to valid UTF-8 of the stated length.
    #[error("journal record: payload: {0}")]
    Payload(String),
}

/// One valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// The engine state (JSON).
    pub state: String,
}

fn mac(key: &JournalKey, head: &[u8], payload: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; 32 bytes never fails.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("HMAC accepts any key length");
    m.update(head);
    m.update(payload);
    m
}

/// The slot bytes (header + payload, at most [`SLOT_BYTES`]) of `state` with `seq`.
pub fn encode(state: &str, seq: u64, key: &JournalKey) -> Result<Vec<u8>, JournalError> {
    let payload = zstd::bulk::compress(state.as_bytes(), 3)
        .map_err(|e| JournalError::Compress(e.to_string()))?;
    if HEADER + payload.len() > SLOT_BYTES {
        return Err(JournalError::TooLarge {
            raw: state.len(),
            packed: payload.len(),
        });
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    let tag = mac(key, &out, &payload).finalize().into_bytes();
    out.extend_from_slice(&tag);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes the record at the start of `slot` (any length; bytes past a slot are ignored).
pub fn decode(slot: &[u8], key: &JournalKey) -> Result<Record, JournalError> {
    if slot.len() < HEADER || slot[..8] != MAGIC {
        return Err(JournalError::NoMagic);
    }
    let version = le32(slot, 8);
    if version != VERSION {
        return Err(JournalError::Malformed(format!(
            "version {version}, expected {VERSION}"
        )));
    }
    let header = le32(slot, 12) as usize;
    if header != HEADER {
        return Err(JournalError::Malformed(format!(
            "header length {header}, expected {HEADER}"
        )));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&slot[16..24]);
    let seq = u64::from_le_bytes(seq);
    let packed = le32(slot, 24) as usize;
    let raw = le32(slot, 28) as usize;
    let room = slot.len().min(SLOT_BYTES) - HEADER;
    if packed > room {
        return Err(JournalError::Malformed(format!(
            "payload of {packed} bytes in a {room}-byte slot"
        )));
    }
    if raw > MAX_STATE {
        return Err(JournalError::Malformed(format!("state of {raw} bytes")));
    }
    let payload = &slot[HEADER..HEADER + packed];
    mac(key, &slot[..32], payload)
        .verify_slice(&slot[32..64])
        .map_err(|_| JournalError::BadMac)?;
    let bytes =
        zstd::bulk::decompress(payload, raw).map_err(|e| JournalError::Payload(e.to_string()))?;
    if bytes.len() != raw {
        return Err(JournalError::Payload(format!(
            "{} bytes, header says {raw}",
            bytes.len()
        )));
    }
    let state = String::from_utf8(bytes).map_err(|e| JournalError::Payload(e.to_string()))?;
    Ok(Record { seq, state })
}

/// What a scan of guest memory found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The newest valid record and the guest-physical address of its slot.
    pub newest: Option<(u64, Record)>,
    /// Records that did not verify: (address, why).
    pub rejected: Vec<(u64, JournalError)>,
}

/// Scans the page-aligned guest-physical `window` for journal records (unreadable pages are
/// skipped; a slot is read no further than the window's end).
pub fn scan(mem: &dyn PhysMemory, window: (u64, u64), key: &JournalKey) -> Scan {
    let mut out = Scan::default();
    let mut pa = window.0 & !0xfff;
    while pa < window.1 {
        let mut head = [0u8; 8];
        if mem.read_phys(pa, &mut head).is_ok() && head == MAGIC {
            let len = (window.1 - pa).min(SLOT_BYTES as u64) as usize;
            let mut slot = vec![0u8; len];
            if mem.read_phys(pa, &mut slot).is_ok() {
                match decode(&slot, key) {
                    Ok(r) => {
                        if out.newest.as_ref().is_none_or(|(_, n)| r.seq > n.seq) {
                            out.newest = Some((pa, r));
                        }
                    }
                    Err(e) => out.rejected.push((pa, e)),
                }
            }
        }
        pa += 4096;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspect::SliceMemory;

    fn key(b: u8) -> JournalKey {
        JournalKey([b; 32])
    }

    #[test]
    fn round_trip_and_tamper() {
        let state = format!("{{\"patches\":[{}]}}", "\"x\",".repeat(500) + "\"y\"");
        let rec = encode(&state, 7, &key(1)).unwrap();
        assert!(rec.len() < state.len(), "compressed");
        assert_eq!(
            decode(&rec, &key(1)).unwrap(),
            Record {
                seq: 7,
                state: state.clone()
            }
        );
        assert_eq!(decode(&rec, &key(2)), Err(JournalError::BadMac));
        // Every single-byte change of header or payload is refused, never a panic.
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad, &key(1)).is_err(), "byte {i}");
        }
        // Truncated anywhere.
        for n in 0..rec.len() {
            assert!(decode(&rec[..n], &key(1)).is_err(), "length {n}");
        }
        // Lengths pointing past the slot.
        let mut bad = rec.clone();
        bad[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad, &key(1)),
            Err(JournalError::Malformed(_))
        ));
        let mut bad = rec;
        bad[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bad, &key(1)),
            Err(JournalError::Malformed(_))
        ));
    }

    #[test]
    fn a_state_too_large_is_refused() {
        // Incompressible bytes, as hex.
        let mut x = 0x1234_5678_9abc_def0u64;
        let s: String = (0..3 * SLOT_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b"0123456789abcdef"[(x & 15) as usize])
            })
            .collect();
        assert!(matches!(
            encode(&s, 1, &key(1)),
            Err(JournalError::TooLarge { .. })
        ));
    }

    #[test]
    fn scan_takes_the_newest_valid_slot() {
        let mut ram = vec![0u8; 0x40000];
        let put = |ram: &mut Vec<u8>, at: usize, b: &[u8]| ram[at..at + b.len()].copy_from_slice(b);
        put(&mut ram, 0x8000, &encode("{\"a\":1}", 4, &key(1)).unwrap());
        put(&mut ram, 0x10000, &encode("{\"a\":2}", 5, &key(1)).unwrap());
        // A newer record under another key, and one torn mid-write, are rejected.
        put(&mut ram, 0x20000, &encode("{\"a\":3}", 9, &key(2)).unwrap());
        let mut torn = encode("{\"a\":4}", 10, &key(1)).unwrap();
        let n = torn.len();
        torn[n - 1] ^= 1;
        put(&mut ram, 0x30000, &torn);
        // A magic at the very end of the window: the slot is cut there, never read past it.
        put(&mut ram, 0x3f000, &MAGIC);
        let mem = SliceMemory::flat(&ram);
        let s = scan(&mem, (0, 0x40000), &key(1));
        let (pa, r) = s.newest.unwrap();
        assert_eq!((pa, r.seq, r.state.as_str()), (0x10000, 5, "{\"a\":2}"));
        assert_eq!(s.rejected.len(), 3, "{:?}", s.rejected);
        assert_eq!(s.rejected[0], (0x20000, JournalError::BadMac));
    }
}
