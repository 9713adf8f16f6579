//! Function entry sites: where the 5-byte `jmp rel32` goes and what is there now
//! (KERNEL-FACTS §4).

use serde::{Deserialize, Serialize};

/// The ftrace NOP that every traceable function has at its patch site after boot.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Sealed ENDBR (`osp nopl (%rax)`), written by `apply_seal_endbr()` on 6.12.
pub const ENDBR_SEALED: [u8; 4] = [0x66, 0x0f, 0x1f, 0x00];

/// Offset of the patch site in a function whose first bytes are `head` (≥ 4 bytes): 4 after an
/// ENDBR (kept or sealed), else 0.
pub fn site_offset(head: &[u8]) -> u64 {
    match head.get(..4) {
        Some(h) if h == ENDBR64 || h == ENDBR_SEALED => 4,
        _ => 0,
    }
}

/// `e9 rel32` from `site` to `target`, or `None` if out of rel32 range.
pub fn jmp_bytes(site: u64, target: u64) -> Option<[u8; 5]> {
    let d = i128::from(target) - (i128::from(site) + 5);
    let d = i32::try_from(d).ok()?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&d.to_le_bytes());
    Some(b)
}

/// Target of an `e8`/`e9` rel32 at `site`.
pub fn rel32_target(site: u64, bytes: &[u8; 5]) -> u64 {
    let d = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    site.wrapping_add(5).wrapping_add(d as i64 as u64)
}

/// What occupies a site that is not the expected NOP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SiteOwner {
    /// `call` to an ftrace/livepatch/BPF trampoline.
    Ftrace {
        /// Call target.
        #[serde(with = "introspect::hex")]
        target: u64,
        /// Its symbol (`ftrace_caller+0x0`, …), if known.
        symbol: Option<String>,
    },
    /// `int3`: a kprobe (or a debugger breakpoint).
    Kprobe,
    /// A `jmp` not installed by this engine.
    ForeignJmp {
        /// Jump target.
        #[serde(with = "introspect::hex")]
        target: u64,
        /// Its symbol, if known.
        symbol: Option<String>,
    },
    /// Something else.
    Unexpected,
}

impl std::fmt::Display for SiteOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sym = |s: &Option<String>, t: u64| s.clone().unwrap_or_else(|| format!("{t:#x}"));
        match self {
            SiteOwner::Ftrace { target, symbol } => {
                let s = sym(symbol, *target);
                let who = if s.starts_with("ftrace_caller") || s.starts_with("ftrace_regs_caller") {
                    "ftrace (tracing, livepatch or kprobe-on-ftrace)"
                } else if s.contains("bpf") {
                    "a BPF trampoline"
                } else {
                    "an ftrace/BPF trampoline"
                };
                write!(f, "owned by {who}: call {s}")
            }
            SiteOwner::Kprobe => write!(f, "owned by a kprobe (int3)"),
            SiteOwner::ForeignJmp { target, symbol } => {
                write!(
                    f,
                    "already redirected by someone else: jmp {}",
                    sym(symbol, *target)
                )
            }
            SiteOwner::Unexpected => write!(
                f,
                "unexpected bytes (no ftrace NOP site: function not traceable?)"
            ),
        }
    }
}

/// Classifies foreign site bytes; `symbolize` names call/jmp targets.
pub fn classify(
    site: u64,
    bytes: &[u8; 5],
    symbolize: &dyn Fn(u64) -> Option<String>,
) -> SiteOwner {
    match bytes[0] {
        0xe8 => {
            let t = rel32_target(site, bytes);
            SiteOwner::Ftrace {
                target: t,
                symbol: symbolize(t),
            }
        }
        0xe9 => {
            let t = rel32_target(site, bytes);
            SiteOwner::ForeignJmp {
                target: t,
                symbol: symbolize(t),
            }
        }
        0xcc => SiteOwner::Kprobe,
        _ => SiteOwner::Unexpected,
    }
}

/// Hex of bytes, space separated.
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_jmps() {
        assert_eq!(site_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f]), 4);
        assert_eq!(site_offset(&[0x66, 0x0f, 0x1f, 0x00]), 4);
        assert_eq!(site_offset(&NOP5), 0);
        let j = jmp_bytes(0xffff_ffff_8100_0000, 0xffff_ffff_8100_0105).unwrap();
        assert_eq!(j, [0xe9, 0x00, 0x01, 0, 0]);
        assert_eq!(
            rel32_target(0xffff_ffff_8100_0000, &j),
            0xffff_ffff_8100_0105
        );
        let back = jmp_bytes(0xffff_ffff_8100_0000, 0xffff_ffff_80ff_fff0).unwrap();
        assert_eq!(
            rel32_target(0xffff_ffff_8100_0000, &back),
            0xffff_ffff_80ff_fff0
        );
        assert!(jmp_bytes(0xffff_ffff_8100_0000, 0xffff_8880_0000_0000).is_none());
        let s = |_| Some("ftrace_caller+0x0".to_string());
        let o = classify(0x1000, &[0xe8, 0, 0, 0, 0], &s);
        assert!(o.to_string().contains("ftrace_caller"));
        assert_eq!(classify(0x1000, &[0xcc, 0, 0, 0, 0], &s), SiteOwner::Kprobe);
        assert_eq!(
            classify(0x1000, &[0x55, 0, 0, 0, 0], &s),
            SiteOwner::Unexpected
        );
    }
}
