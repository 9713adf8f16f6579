//! Builds small synthetic kallsyms table regions (like `scripts/kallsyms.c` output) in either
//! table order, for parser tests and fuzz seeds.

/// Table order to emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// 6.1: offsets, relative_base, num_syms, names, markers, seqs (optional), tokens, index.
    Old { seqs: bool },
    /// 6.4+: num_syms, names, markers, tokens, index, offsets, relative_base, seqs.
    New,
}

/// A synthetic table region.
pub struct Synth {
    /// The bytes (based at pa 0).
    pub bytes: Vec<u8>,
    /// Offset of the token table.
    pub tt_off: usize,
    /// The symbols emitted: (type char, name, address).
    pub syms: Vec<(char, String, u64)>,
}

fn align8(v: &mut Vec<u8>) {
    while v.len() & 7 != 0 {
        v.push(0);
    }
}

/// Token table: every printable byte maps to itself; other byte values are two-letter tokens.
fn tokens() -> Vec<Vec<u8>> {
    (0..=255u8)
        .map(|b| {
            if b.is_ascii_graphic() {
                vec![b]
            } else {
                vec![b'_', b'a' + (b % 26)]
            }
        })
        .collect()
}

/// `n` symbols: a few per-cpu `A` symbols, then text/data symbols at rising addresses from
/// `text` (with duplicates every 50th name).
pub fn build(order: Order, n: usize, text: u64) -> Synth {
    let mut syms = Vec::new();
    for i in 0..n {
        if i < 3 {
            syms.push(('A', format!("percpu_{i}"), 0x1000 * i as u64));
        } else if i == 3 {
            syms.push(('T', "_text".to_string(), text));
        } else {
            let name = if i % 50 == 0 {
                "dup_name".to_string()
            } else {
                format!("sym_{i}")
            };
            let kind = if i % 3 == 0 { 't' } else { 'T' };
            syms.push((kind, name, text + 0x10 * i as u64));
        }
    }
    let toks = tokens();
    let mut names = Vec::new();
    let mut markers = Vec::new();
    for (i, (k, name, _)) in syms.iter().enumerate() {
        if i % 256 == 0 {
            markers.push(names.len() as u32);
        }
        let mut e = vec![*k as u8];
        e.extend_from_slice(name.as_bytes());
        names.push(e.len() as u8);
        names.extend_from_slice(&e);
    }
    let offsets: Vec<i32> = syms
        .iter()
        .map(|&(k, _, a)| {
            if k == 'A' {
                a as i32
            } else {
                -((a - text) as i32) - 1
            }
        })
        .collect();
    let mut by_name: Vec<usize> = (0..syms.len()).collect();
    by_name.sort_by(|&a, &b| syms[a].1.cmp(&syms[b].1).then(a.cmp(&b)));
    let mut seqs = Vec::new();
    for i in by_name {
        seqs.extend_from_slice(&(i as u32).to_be_bytes()[1..]);
    }
    let mut tt = Vec::new();
    let mut index = Vec::new();
    for t in &toks {
        index.extend_from_slice(&(tt.len() as u16).to_le_bytes());
        tt.extend_from_slice(t);
        tt.push(0);
    }
    let mut v: Vec<u8> = vec![0xcc; 64];
    let emit_offsets = |v: &mut Vec<u8>| {
        for o in &offsets {
            v.extend_from_slice(&o.to_le_bytes());
        }
        align8(v);
        v.extend_from_slice(&text.to_le_bytes());
    };
    let head = |v: &mut Vec<u8>| {
        v.extend_from_slice(&(syms.len() as u32).to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&names);
        align8(v);
        for m in &markers {
            v.extend_from_slice(&m.to_le_bytes());
        }
        align8(v);
    };
    let tt_off;
    match order {
        Order::Old { seqs: with_seqs } => {
            emit_offsets(&mut v);
            head(&mut v);
            if with_seqs {
                v.extend_from_slice(&seqs);
                align8(&mut v);
            }
            tt_off = v.len();
            v.extend_from_slice(&tt);
            align8(&mut v);
            v.extend_from_slice(&index);
        }
        Order::New => {
            head(&mut v);
            tt_off = v.len();
            v.extend_from_slice(&tt);
            align8(&mut v);
            v.extend_from_slice(&index);
            align8(&mut v);
            emit_offsets(&mut v);
            v.extend_from_slice(&seqs);
        }
    }
    v.extend_from_slice(&[0xcc; 64]);
    Synth {
        bytes: v,
        tt_off,
        syms,
    }
}
