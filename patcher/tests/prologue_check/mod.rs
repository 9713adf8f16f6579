//! The tests' own check of a relocation: an independent decode of the original bytes and of
//! the trampoline, compared operand by operand.

#![allow(dead_code)]

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use patcher::prologue::Prologue;

/// Every instruction of `b` decoded at `ip`.
pub fn decode(b: &[u8], ip: u64) -> Vec<Instruction> {
    let mut d = Decoder::with_ip(64, b, ip, DecoderOptions::NONE);
    (&mut d).into_iter().collect()
}

fn is_branch_kind(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
}

/// Checks, operand by operand, that `new` (in the trampoline) does what `old` did.
pub fn assert_same(old: &Instruction, new: &Instruction, ctx: &str) {
    assert_eq!(old.mnemonic(), new.mnemonic(), "{ctx}: mnemonic");
    assert_eq!(old.op_count(), new.op_count(), "{ctx}: operand count");
    assert_eq!(old.has_lock_prefix(), new.has_lock_prefix(), "{ctx}: lock");
    assert_eq!(old.has_rep_prefix(), new.has_rep_prefix(), "{ctx}: rep");
    assert_eq!(
        old.has_repne_prefix(),
        new.has_repne_prefix(),
        "{ctx}: repne"
    );
    assert_eq!(old.segment_prefix(), new.segment_prefix(), "{ctx}: segment");
    for i in 0..old.op_count() {
        let (a, b) = (old.op_kind(i), new.op_kind(i));
        if is_branch_kind(a) {
            assert!(is_branch_kind(b), "{ctx}: operand {i} kind {b:?}");
            assert_eq!(
                old.near_branch_target(),
                new.near_branch_target(),
                "{ctx}: branch target"
            );
            continue;
        }
        assert_eq!(a, b, "{ctx}: operand {i} kind");
        match a {
            OpKind::Register => {
                assert_eq!(
                    old.op_register(i),
                    new.op_register(i),
                    "{ctx}: register {i}"
                )
            }
            OpKind::Memory => {
                assert_eq!(old.memory_base(), new.memory_base(), "{ctx}: base");
                assert_eq!(old.memory_index(), new.memory_index(), "{ctx}: index");
                assert_eq!(old.memory_index_scale(), new.memory_index_scale(), "{ctx}");
                assert_eq!(old.memory_size(), new.memory_size(), "{ctx}: size");
                assert_eq!(old.memory_segment(), new.memory_segment(), "{ctx}: segment");
                if old.memory_base() == Register::RIP {
                    assert_eq!(
                        old.ip_rel_memory_address(),
                        new.ip_rel_memory_address(),
                        "{ctx}: RIP-relative address"
                    );
                } else {
                    assert_eq!(
                        old.memory_displacement64(),
                        new.memory_displacement64(),
                        "{ctx}: displacement"
                    );
                }
            }
            k if format!("{k:?}").starts_with("Immediate") => {
                assert_eq!(old.immediate(i), new.immediate(i), "{ctx}: immediate {i}")
            }
            _ => {}
        }
    }
    if old.op_count() == 0 || !is_branch_kind(old.op0_kind()) {
        assert_eq!(old.code(), new.code(), "{ctx}: encoding");
    }
}

/// `moved` (the function's bytes at `p.site`, `p.moved_len` of them) against the trampoline
/// placed at `tramp_va`: the same instructions, then `jmp p.resume`.
pub fn check_tramp(moved: &[u8], p: &Prologue, tramp_va: u64, ctx: &str) {
    assert_eq!(p.original(), moved, "{ctx}: moved bytes");
    let orig = decode(moved, p.site);
    assert_eq!(orig.len(), p.moved.len(), "{ctx}");
    let tramp = decode(&p.tramp, tramp_va);
    assert_eq!(
        tramp.len(),
        orig.len() + 1,
        "{ctx}: trampoline {:02x?}",
        p.tramp
    );
    for (k, (o, n)) in orig.iter().zip(&tramp).enumerate() {
        assert_eq!(p.moved[k].addr, o.ip(), "{ctx}");
        assert_eq!(p.moved[k].new_addr, n.ip(), "{ctx}");
        assert_same(o, n, &format!("{ctx}: `{}`", p.moved[k].text));
    }
    let back = tramp.last().unwrap();
    assert_eq!(back.mnemonic(), Mnemonic::Jmp, "{ctx}");
    assert_eq!(back.near_branch_target(), p.resume, "{ctx}");
}
