//! Prologue rewrite: patching a function whose entry is not an ftrace NOP site (issue 9).
//!
//! The 5-byte `jmp rel32` goes at the site (after an ENDBR or its sealed form, which stays in
//! place; or right after an ftrace `call`, the "after-ftrace" case). The whole instructions it
//! covers move into a trampoline in the arena, re-encoded by iced-x86's [`BlockEncoder`] so that
//! RIP-relative operands, branches and calls reach the same absolute addresses (short branches
//! widen), followed by a `jmp` back to the first instruction not moved. The trampoline is the
//! function's "old code" for the unpatched state.
//!
//! [`relocate`] is pure: it gets the function's bytes up to its kallsyms end and refuses
//! ([`PrologueError`]) what cannot move safely. The bytes come from a hostile guest: every
//! length and address is checked, nothing panics.

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Formatter,
    GasFormatter, Instruction, InstructionBlock, IntelFormatter, Mnemonic, OpKind,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Length of the `jmp rel32` written at the site.
pub const JMP_LEN: u64 = 5;

/// Largest function [`relocate`] decodes (a bound on hostile sizes; kernel functions are far
/// smaller).
pub const MAX_FUNC_LEN: usize = 1 << 20;

/// Longest trampoline: at most 5 moved instructions of ≤ 15 bytes each, widened, plus the jmp.
pub const MAX_TRAMP_LEN: usize = 128;

/// How a replaced function's entry is redirected (`patch info` shows it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The ftrace NOP5 site is overwritten; nothing moves.
    #[default]
    FtraceSite,
    /// The instructions at the entry (after any ENDBR) move to a trampoline.
    Prologue,
    /// ftrace owns the entry site (`call ftrace_caller` or a trampoline): the jump goes right
    /// after those 5 bytes and the instructions there move to a trampoline.
    AfterFtrace,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::FtraceSite => "ftrace-site",
            Method::Prologue => "prologue",
            Method::AfterFtrace => "after-ftrace",
        })
    }
}

/// One instruction moved from the function into the trampoline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedInsn {
    /// Its address in the function.
    #[serde(with = "introspect::hex")]
    pub addr: u64,
    /// Its original bytes.
    pub bytes: Vec<u8>,
    /// Its disassembly (AT&T, as `objdump -d`; branch and RIP-relative targets absolute).
    pub text: String,
    /// Its address in the trampoline.
    #[serde(with = "introspect::hex")]
    pub new_addr: u64,
}

/// A relocated prologue: what moved, and the trampoline that replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prologue {
    /// The function's address.
    #[serde(with = "introspect::hex")]
    pub func: u64,
    /// Where the `jmp rel32` goes (first moved instruction).
    #[serde(with = "introspect::hex")]
    pub site: u64,
    /// The moved instructions, in order; they cover `site..site + moved_len`.
    pub moved: Vec<MovedInsn>,
    /// Bytes moved (≥ [`JMP_LEN`]).
    pub moved_len: u64,
    /// Where the trampoline is placed.
    #[serde(with = "introspect::hex")]
    pub tramp_va: u64,
    /// The trampoline: the moved instructions re-encoded, then `jmp resume`.
    pub tramp: Vec<u8>,
    /// Where the trampoline continues in the function: `site + moved_len`.
    #[serde(with = "introspect::hex")]
    pub resume: u64,
}

impl Prologue {
    /// The original bytes under the jump (`site..site + moved_len`).
    pub fn original(&self) -> Vec<u8> {
        self.moved.iter().flat_map(|m| m.bytes.clone()).collect()
    }

    /// Whether `ip` lies strictly inside the moved bytes: a vCPU or task that would resume
    /// there (an interrupted RIP, a return address after a moved `call`) would land inside the
    /// `jmp`. The writer must check that none does, with the vCPUs paused.
    pub fn splits(&self, ip: u64) -> bool {
        ip > self.site && ip < self.resume
    }

    /// The trampoline address equivalent to `ip`, a moved instruction's address (for moving a
    /// paused vCPU's RIP, as optimized kprobes do); `None` between instruction boundaries.
    pub fn to_trampoline(&self, ip: u64) -> Option<u64> {
        self.moved.iter().find(|m| m.addr == ip).map(|m| m.new_addr)
    }
}

/// Whether `sym` (a call target, symbolized) is ftrace's caller or a copy of it: exactly
/// `ftrace_caller+0x0` / `ftrace_regs_caller+0x0`, or an ops trampoline named by the planner.
fn is_ftrace_caller(sym: &str) -> bool {
    ["ftrace_caller", "ftrace_regs_caller"].iter().any(|c| {
        sym.strip_prefix(c)
            .is_some_and(|rest| rest == "+0x0" || rest.starts_with(" (a copy:"))
    })
}

/// How to patch an entry whose site holds `bytes`, classified as `owner` by
/// [`crate::site::classify`] (call targets symbolized): the method, and what to add to
/// [`crate::site::site_offset`] for [`relocate`]. `Err` names why the entry cannot be taken.
///
/// - the ftrace NOP: [`Method::FtraceSite`];
/// - a `call` to `ftrace_caller`, `ftrace_regs_caller` or a copy of them (an ftrace ops
///   trampoline): [`Method::AfterFtrace`], 5 bytes further, leaving ftrace's bytes alone;
/// - any other bytes, including a `call` elsewhere (a BPF trampoline, or an ordinary call the
///   function starts with): [`Method::Prologue`] — the call moves with the rest;
/// - `int3` (a kprobe) and a foreign `jmp` (another patcher): refused.
pub fn method_for(
    bytes: &[u8; 5],
    owner: &crate::site::SiteOwner,
) -> Result<(Method, u64), String> {
    use crate::site::SiteOwner;
    if *bytes == crate::site::NOP5 {
        return Ok((Method::FtraceSite, 0));
    }
    match owner {
        SiteOwner::Ftrace {
            symbol: Some(s), ..
        } if is_ftrace_caller(s) => Ok((Method::AfterFtrace, JMP_LEN)),
        SiteOwner::Kprobe => Err(owner.to_string()),
        // Another patcher's jmp, or a tail call the function starts with: neither can move.
        SiteOwner::ForeignJmp { .. } => Err(format!(
            "{owner} (or the function starts with a tail-call jmp, which cannot move either)"
        )),
        _ => Ok((Method::Prologue, 0)),
    }
}

/// Why a prologue cannot be relocated. Every variant names the address (and the instruction
/// where there is one).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PrologueError {
    /// The caller's input does not describe a function.
    #[error("function at {func:#x}: {why}")]
    BadInput {
        /// Function address.
        func: u64,
        /// What is wrong.
        why: String,
    },
    /// The site offset is not an instruction boundary of the function.
    #[error("site {site:#x} of the function at {func:#x} is not an instruction boundary (`{insn}` at {addr:#x} spans it)")]
    SiteNotBoundary {
        /// Function address.
        func: u64,
        /// The site.
        site: u64,
        /// The instruction spanning it.
        addr: u64,
        /// Its disassembly.
        insn: String,
    },
    /// Fewer than 5 bytes from the site to the function's end.
    #[error("function at {func:#x} is {len} bytes: too short for a 5-byte jmp at {site:#x}")]
    TooShort {
        /// Function address.
        func: u64,
        /// Its length.
        len: u64,
        /// The site.
        site: u64,
    },
    /// The last instruction needed to cover the jump runs past the function's end.
    #[error("function at {func:#x} ends at {end:#x}, inside the moved range: `{insn}` at {addr:#x} crosses it")]
    EndsInside {
        /// Function address.
        func: u64,
        /// Its end (kallsyms).
        end: u64,
        /// The crossing instruction.
        addr: u64,
        /// Its disassembly (as far as it decodes).
        insn: String,
    },
    /// Bytes that do not decode (a linear decode of the function is needed to find branches).
    #[error("undecodable bytes at {addr:#x}: {bytes}")]
    Undecodable {
        /// Address.
        addr: u64,
        /// Up to 15 bytes there, hex.
        bytes: String,
    },
    /// A branch of the function lands inside the moved bytes, after their first instruction.
    #[error(
        "`{insn}` at {addr:#x} branches to {target:#x}, inside the moved bytes {site:#x}..{end:#x}"
    )]
    BranchIntoMoved {
        /// Branch address.
        addr: u64,
        /// Its disassembly.
        insn: String,
        /// Its target.
        target: u64,
        /// The site.
        site: u64,
        /// End of the moved bytes.
        end: u64,
    },
    /// An instruction takes the address of (or reads) a point inside the moved bytes.
    #[error(
        "`{insn}` at {addr:#x} refers to {target:#x}, inside the moved bytes {site:#x}..{end:#x}"
    )]
    RefIntoMoved {
        /// Instruction address.
        addr: u64,
        /// Its disassembly.
        insn: String,
        /// The address referred to.
        target: u64,
        /// The site.
        site: u64,
        /// End of the moved bytes.
        end: u64,
    },
    /// `ret`, `jmp` or another flow end inside the moved range: what follows it there is only
    /// reached by branches, and moving it makes no sense.
    #[error("`{insn}` at {addr:#x} ends the control flow inside the moved bytes")]
    FlowEnd {
        /// Address.
        addr: u64,
        /// Its disassembly.
        insn: String,
    },
    /// `int3` inside the moved range: a kprobe (or a debugger breakpoint) owns these bytes.
    #[error("`int3` at {addr:#x} in the moved bytes: owned by a kprobe (or a breakpoint)")]
    Kprobe {
        /// Address.
        addr: u64,
    },
    /// A trapping instruction (`ud2`: BUG/WARN, found by address in `__bug_table`; `int n`).
    #[error("`{insn}` at {addr:#x} traps, and its handler finds it by address (BUG/WARN via __bug_table): it cannot move")]
    Trap {
        /// Address.
        addr: u64,
        /// Its disassembly.
        insn: String,
    },
    /// iced-x86 cannot re-encode the instruction so that it behaves the same at the trampoline.
    #[error("`{insn}` at {addr:#x} cannot be relocated: {why}")]
    Unrelocatable {
        /// Address.
        addr: u64,
        /// Its disassembly.
        insn: String,
        /// Why.
        why: String,
    },
    /// A caller-named range (exception-table entry, jump-table target, jump label, static call,
    /// alternative, ...) intersects the moved bytes.
    #[error("{what} at {start:#x}..{end:#x} intersects the moved bytes {site:#x}..{moved_end:#x} (`{insn}` at {addr:#x})")]
    Forbidden {
        /// What the range is.
        what: String,
        /// Its start.
        start: u64,
        /// Its end (exclusive).
        end: u64,
        /// The site.
        site: u64,
        /// End of the moved bytes.
        moved_end: u64,
        /// The first moved instruction in the range.
        addr: u64,
        /// Its disassembly.
        insn: String,
    },
    /// The trampoline cannot reach a target with rel32.
    #[error(
        "the trampoline at {tramp:#x} is out of rel32 reach of {target:#x} (`{insn}` at {addr:#x})"
    )]
    Reach {
        /// Trampoline address.
        tramp: u64,
        /// The target.
        target: u64,
        /// The instruction needing it.
        addr: u64,
        /// Its disassembly.
        insn: String,
    },
}

/// AT&T text of `ins`, with absolute targets.
pub fn gas(ins: &Instruction) -> String {
    let mut f = GasFormatter::new();
    f.options_mut().set_uppercase_hex(false);
    let mut s = String::new();
    f.format(ins, &mut s);
    s
}

/// Intel text of `ins` without branch-size hints (`short`/`near`) and with absolute
/// RIP-relative addresses: equal for an instruction and its faithful relocation.
fn canonical(ins: &Instruction) -> String {
    let mut f = IntelFormatter::new();
    f.options_mut().set_show_branch_size(false);
    f.options_mut().set_rip_relative_addresses(false);
    let mut s = String::new();
    f.format(ins, &mut s);
    s
}

/// Whether `a` and `b` behave the same: for direct branches and calls, the same mnemonic and
/// absolute target (a short form may have widened); for everything else the same encoding kind
/// and operands, RIP-relative addresses compared as absolute addresses.
pub fn equivalent(a: &Instruction, b: &Instruction) -> bool {
    if is_direct_branch(a) || is_direct_branch(b) {
        return is_direct_branch(a)
            && is_direct_branch(b)
            && a.mnemonic() == b.mnemonic()
            && a.near_branch_target() == b.near_branch_target()
            && canonical(a) == canonical(b);
    }
    a.code() == b.code()
        && a.op_count() == b.op_count()
        && a.is_ip_rel_memory_operand() == b.is_ip_rel_memory_operand()
        && (!a.is_ip_rel_memory_operand() || a.ip_rel_memory_address() == b.ip_rel_memory_address())
        && canonical(a) == canonical(b)
}

/// A direct near branch or call (`jmp`/`jcc`/`call`/`loop`/`jrcxz`/`xbegin` with a target).
fn is_direct_branch(i: &Instruction) -> bool {
    i.op_count() >= 1
        && matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
}

fn hex(b: &[u8]) -> String {
    crate::site::hex(b)
}

/// `|target - from| < 2 GiB - 64`: rel32 reach with room for the instruction length.
fn in_reach(from: u64, target: u64) -> bool {
    (target.wrapping_sub(from) as i64).unsigned_abs() < (1 << 31) - 64
}

/// Relocates the instructions at `func_start + site_offset` that the 5-byte `jmp` covers into a
/// trampoline at `tramp_va`.
///
/// - `bytes` is the whole function, from its start to its kallsyms end: all of it is decoded
///   to find branches into the moved bytes.
/// - `site_offset` is [`crate::site::site_offset`] (0, or 4 after an ENDBR, which stays in
///   place), plus 5 for the after-ftrace case (the ftrace `call` stays in place).
/// - `forbidden` lists `(start, end, what)` ranges (end exclusive) that must not intersect the
///   moved bytes: exception-table entries, jump-table targets, jump-label / static-call /
///   alternatives sites.
///
/// A branch to the site itself is allowed: at the function's first instruction only the entry
/// state is live, so it behaves like a new call of the function.
pub fn relocate(
    func_start: u64,
    bytes: &[u8],
    site_offset: u64,
    tramp_va: u64,
    forbidden: &[(u64, u64, String)],
) -> Result<Prologue, PrologueError> {
    let bad = |why: String| PrologueError::BadInput {
        func: func_start,
        why,
    };
    if bytes.len() > MAX_FUNC_LEN {
        return Err(bad(format!(
            "{} bytes is more than {MAX_FUNC_LEN}",
            bytes.len()
        )));
    }
    let len = bytes.len() as u64;
    let func_end = func_start
        .checked_add(len)
        .ok_or_else(|| bad("its end overflows the address space".into()))?;
    if site_offset > len {
        return Err(bad(format!(
            "site offset {site_offset:#x} is past its {len} bytes"
        )));
    }
    let site = func_start + site_offset;
    if len - site_offset < JMP_LEN {
        return Err(PrologueError::TooShort {
            func: func_start,
            len,
            site,
        });
    }

    // Linear decode of the whole function.
    let mut insns = Vec::new();
    let mut dec = Decoder::with_ip(64, bytes, func_start, DecoderOptions::NONE);
    while dec.can_decode() {
        let at = dec.position();
        let ins = dec.decode();
        if ins.is_invalid() {
            let addr = func_start + at as u64;
            // An instruction cut by the function's end.
            if dec.last_error() == iced_x86::DecoderError::NoMoreBytes && addr < site + JMP_LEN {
                return Err(PrologueError::EndsInside {
                    func: func_start,
                    end: func_end,
                    addr,
                    insn: format!("(truncated) {}", hex(&bytes[at..])),
                });
            }
            return Err(PrologueError::Undecodable {
                addr,
                bytes: hex(&bytes[at..bytes.len().min(at + 15)]),
            });
        }
        insns.push(ins);
    }

    // The instructions covering site..site+5.
    let first = insns
        .iter()
        .position(|i| i.ip() >= site)
        .filter(|&k| insns[k].ip() == site)
        .ok_or_else(|| {
            let span = insns
                .iter()
                .find(|i| i.ip() < site && i.next_ip() > site)
                .copied()
                .unwrap_or_default();
            PrologueError::SiteNotBoundary {
                func: func_start,
                site,
                addr: span.ip(),
                insn: gas(&span),
            }
        })?;
    let mut last = first;
    while insns[last].next_ip() < site + JMP_LEN {
        last += 1;
        // Cannot run out: the decode covered the function and site + 5 <= func_end.
        if last >= insns.len() {
            return Err(bad("decode ended inside the moved range".into()));
        }
    }
    let moved = &insns[first..=last];
    let resume = insns[last].next_ip();
    if resume > func_end {
        return Err(PrologueError::EndsInside {
            func: func_start,
            end: func_end,
            addr: insns[last].ip(),
            insn: gas(&insns[last]),
        });
    }
    let moved_len = resume - site;

    // What may not move.
    for i in moved {
        let addr = i.ip();
        let insn = gas(i);
        match i.mnemonic() {
            Mnemonic::Int3 => return Err(PrologueError::Kprobe { addr }),
            Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => {
                return Err(PrologueError::Trap { addr, insn })
            }
            _ => {}
        }
        match i.flow_control() {
            FlowControl::Return
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch => return Err(PrologueError::FlowEnd { addr, insn }),
            FlowControl::Interrupt | FlowControl::Exception => {
                return Err(PrologueError::Trap { addr, insn })
            }
            FlowControl::XbeginXabortXend => {
                return Err(PrologueError::Unrelocatable {
                    addr,
                    insn,
                    why: "transactional memory".into(),
                })
            }
            _ => {}
        }
        if matches!(
            i.code(),
            Code::Loopne_rel8_64_RCX
                | Code::Loope_rel8_64_RCX
                | Code::Loop_rel8_64_RCX
                | Code::Jrcxz_rel8_64
                | Code::Loopne_rel8_64_ECX
                | Code::Loope_rel8_64_ECX
                | Code::Loop_rel8_64_ECX
                | Code::Jecxz_rel8_64
        ) {
            return Err(PrologueError::Unrelocatable {
                addr,
                insn,
                why: "a short-only branch (loop/jrcxz) would need rewriting".into(),
            });
        }
    }
    for (start, end, what) in forbidden {
        if *start < resume && *end > site {
            let hit = moved
                .iter()
                .find(|i| i.next_ip() > *start && i.ip() < *end)
                .unwrap_or(&moved[0]);
            return Err(PrologueError::Forbidden {
                what: what.clone(),
                start: *start,
                end: *end,
                site,
                moved_end: resume,
                addr: hit.ip(),
                insn: gas(hit),
            });
        }
    }
    // Anything of the function landing strictly inside the moved bytes.
    refs_into(&insns, site, resume)?;
    // The moved instructions' targets from the trampoline, and the way back.
    let reach = |target: u64, i: &Instruction| {
        if in_reach(tramp_va, target) {
            Ok(())
        } else {
            Err(PrologueError::Reach {
                tramp: tramp_va,
                target,
                addr: i.ip(),
                insn: gas(i),
            })
        }
    };
    for i in moved {
        if is_direct_branch(i) {
            reach(i.near_branch_target(), i)?;
        }
        if i.is_ip_rel_memory_operand() {
            reach(i.ip_rel_memory_address(), i)?;
        }
    }
    reach(resume, &insns[last])?;

    // Re-encode. The jmp back gets ip 0, an address no kernel branch targets, so the block
    // encoder links no moved branch to it.
    let back = Instruction::with_branch(Code::Jmp_rel32_64, resume).map_err(|e| {
        PrologueError::Unrelocatable {
            addr: resume,
            insn: "jmp back".into(),
            why: e.to_string(),
        }
    })?;
    let mut block: Vec<Instruction> = moved.to_vec();
    block.push(back);
    let enc = BlockEncoder::encode(
        64,
        InstructionBlock::new(&block, tramp_va),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(|e| blame(moved, tramp_va, &e.to_string()))?;
    let tramp = enc.code_buffer;
    if tramp.len() > MAX_TRAMP_LEN {
        return Err(blame(
            moved,
            tramp_va,
            &format!("trampoline of {} bytes", tramp.len()),
        ));
    }
    // Check: the trampoline decodes to the moved instructions, each equivalent, then the jmp.
    let mut check = Decoder::with_ip(64, &tramp, tramp_va, DecoderOptions::NONE);
    for (k, want) in block.iter().enumerate() {
        let got = check.decode();
        let off = enc.new_instruction_offsets.get(k).copied();
        if got.is_invalid() || off != Some((got.ip() - tramp_va) as u32) || !equivalent(want, &got)
        {
            return Err(PrologueError::Unrelocatable {
                addr: want.ip(),
                insn: gas(want),
                why: format!("re-encoded as `{}`", gas(&got)),
            });
        }
    }
    if check.can_decode() {
        return Err(blame(moved, tramp_va, "trailing bytes in the trampoline"));
    }

    let moved = moved
        .iter()
        .zip(&enc.new_instruction_offsets)
        .map(|(i, &new_off)| {
            let off = (i.ip() - func_start) as usize;
            MovedInsn {
                addr: i.ip(),
                bytes: bytes[off..off + i.len()].to_vec(),
                text: gas(i),
                new_addr: tramp_va + u64::from(new_off),
            }
        })
        .collect();
    Ok(Prologue {
        func: func_start,
        site,
        moved,
        moved_len,
        tramp_va,
        tramp,
        resume,
    })
}

/// Refuses a direct branch or RIP-relative reference of `insns` to a point strictly inside
/// `site..resume` (the site itself is allowed).
fn refs_into(insns: &[Instruction], site: u64, resume: u64) -> Result<(), PrologueError> {
    let inside = |t: u64| t > site && t < resume;
    for i in insns {
        if is_direct_branch(i) && inside(i.near_branch_target()) {
            return Err(PrologueError::BranchIntoMoved {
                addr: i.ip(),
                insn: gas(i),
                target: i.near_branch_target(),
                site,
                end: resume,
            });
        }
        if i.is_ip_rel_memory_operand() && inside(i.ip_rel_memory_address()) {
            return Err(PrologueError::RefIntoMoved {
                addr: i.ip(),
                insn: gas(i),
                target: i.ip_rel_memory_address(),
                site,
                end: resume,
            });
        }
        // An absolute address as an immediate or a displacement (`mov $label,%rax`,
        // `-mcmodel=kernel` code takes addresses so).
        let absolute = (0..i.op_count()).find_map(|k| {
            let v = match i.op_kind(k) {
                OpKind::Immediate32to64 | OpKind::Immediate64 => i.immediate(k),
                OpKind::Memory if i.memory_base() != iced_x86::Register::RIP => {
                    i.memory_displacement64()
                }
                _ => return None,
            };
            inside(v).then_some(v)
        });
        if let Some(target) = absolute {
            return Err(PrologueError::RefIntoMoved {
                addr: i.ip(),
                insn: gas(i),
                target,
                site,
                end: resume,
            });
        }
    }
    Ok(())
}

/// Applies [`relocate`]'s branch rule to other code that may jump into the function: the
/// bytes at `start` (e.g. its `foo.cold` part, which gcc places elsewhere and which jumps
/// back into `foo`). Refuses what lands strictly inside `p`'s moved bytes, and undecodable
/// bytes.
pub fn check_other_code(p: &Prologue, start: u64, bytes: &[u8]) -> Result<(), PrologueError> {
    if bytes.len() > MAX_FUNC_LEN || start.checked_add(bytes.len() as u64).is_none() {
        return Err(PrologueError::BadInput {
            func: start,
            why: format!("{} bytes of other code", bytes.len()),
        });
    }
    let mut insns = Vec::new();
    let mut dec = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    while dec.can_decode() {
        let at = dec.position();
        let ins = dec.decode();
        if ins.is_invalid() {
            return Err(PrologueError::Undecodable {
                addr: start + at as u64,
                bytes: hex(&bytes[at..bytes.len().min(at + 15)]),
            });
        }
        insns.push(ins);
    }
    refs_into(&insns, p.site, p.resume)
}

/// The moved instruction that iced-x86 refuses alone, or the first one.
fn blame(moved: &[Instruction], tramp_va: u64, why: &str) -> PrologueError {
    let culprit = moved
        .iter()
        .find(|i| {
            BlockEncoder::encode(
                64,
                InstructionBlock::new(std::slice::from_ref(*i), tramp_va),
                BlockEncoderOptions::NONE,
            )
            .is_err()
        })
        .or(moved.first());
    match culprit {
        Some(i) => PrologueError::Unrelocatable {
            addr: i.ip(),
            insn: gas(i),
            why: why.to_string(),
        },
        None => PrologueError::Unrelocatable {
            addr: tramp_va,
            insn: String::new(),
            why: why.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    const F: u64 = 0xffff_ffff_8123_4560;
    const T: u64 = 0xffff_ffff_c040_0000;

    /// Assembles at `F` with `body`.
    fn asm(body: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(64).unwrap();
        body(&mut a).unwrap();
        a.assemble(F).unwrap()
    }

    fn decode_all(b: &[u8], ip: u64) -> Vec<Instruction> {
        let mut d = Decoder::with_ip(64, b, ip, DecoderOptions::NONE);
        (&mut d).into_iter().collect()
    }

    #[test]
    fn synthetic_rip_relative_and_short_branch_move_and_widen() {
        // push rbp; mov rax,[rip+0x1000]; je short +1; nop; pop rbp; ret
        let b = [
            0x55, 0x48, 0x8b, 0x05, 0x00, 0x10, 0x00, 0x00, 0x74, 0x01, 0x90, 0x5d, 0xc3,
        ];
        let data = F + 8 + 0x1000;
        let p = relocate(F, &b, 0, T, &[]).unwrap();
        assert_eq!(p.moved.len(), 2, "{:?}", p.moved);
        assert_eq!(p.moved_len, 8);
        assert_eq!(p.resume, F + 8);
        let t = decode_all(&p.tramp, T);
        let orig = decode_all(&b, F);
        assert_eq!(t.len(), 3);
        assert!(equivalent(&orig[0], &t[0]) && equivalent(&orig[1], &t[1]));
        assert_eq!(t[1].ip_rel_memory_address(), data);
        assert_eq!(t[2].near_branch_target(), F + 8);
        assert_eq!(t[2].mnemonic(), Mnemonic::Jmp);
        let text = &p.moved[1].text;
        assert!(text.contains(&format!("{data:#x}")), "{text}");
        assert_eq!(p.original(), b[..8].to_vec());
        assert_eq!(p.moved[1].new_addr, T + 1);
        assert_eq!(p.to_trampoline(F + 1), Some(T + 1));
        assert_eq!(p.to_trampoline(F + 2), None);
        assert!(!p.splits(F) && p.splits(F + 1) && p.splits(F + 7) && !p.splits(F + 8));
    }

    #[test]
    fn methods_by_site_bytes() {
        use crate::site::{classify, NOP5};
        let sym = |t: u64| match t {
            0x2000 => Some("ftrace_regs_caller+0x0".to_string()),
            0x3000 => Some("ftrace_caller (a copy: ftrace ops trampoline at 0x3000)".to_string()),
            _ => Some("bpf_trampoline_6442".to_string()),
        };
        let m = |b: [u8; 5]| method_for(&b, &classify(0x1000, &b, &sym));
        assert_eq!(m(NOP5), Ok((Method::FtraceSite, 0)));
        let call = |t: u64| {
            let mut b = crate::site::jmp_bytes(0x1000, t).unwrap();
            b[0] = 0xe8;
            b
        };
        assert_eq!(m(call(0x2000)), Ok((Method::AfterFtrace, 5)));
        assert_eq!(m(call(0x3000)), Ok((Method::AfterFtrace, 5)));
        assert_eq!(m(call(0x4000)), Ok((Method::Prologue, 0)));
        assert!(!is_ftrace_caller("ftrace_caller+0x10") && !is_ftrace_caller("ftrace_callers+0x0"));
        assert_eq!(m([0x55, 0x48, 0x89, 0xe5, 0x41]), Ok((Method::Prologue, 0)));
        assert!(m([0xcc, 0x48, 0x89, 0xe5, 0x41])
            .unwrap_err()
            .contains("kprobe"));
        assert!(m(crate::site::jmp_bytes(0x1000, 0x5000).unwrap()).is_err());
        assert_eq!(Method::AfterFtrace.to_string(), "after-ftrace");
        assert_eq!(
            serde_json::to_string(&Method::FtraceSite).unwrap(),
            "\"ftrace-site\""
        );
    }

    #[test]
    fn synthetic_short_jcc_in_moved_range_widens() {
        let b = asm(|a| {
            let mut l = a.create_label();
            a.test(edi, edi)?;
            a.je(l)?;
            a.mov(eax, 1)?;
            a.set_label(&mut l)?;
            a.ret()
        });
        let p = relocate(F, &b, 0, T, &[]).unwrap();
        let t = decode_all(&p.tramp, T);
        assert_eq!(t[1].code(), Code::Je_rel32_64);
        assert_eq!(
            t[1].near_branch_target(),
            decode_all(&b, F)[1].near_branch_target()
        );
    }

    #[test]
    fn synthetic_refusals() {
        // Too short: 4 bytes.
        let e = relocate(F, &[0x31, 0xc0, 0xc3, 0xcc], 0, T, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::TooShort { len: 4, .. }), "{e}");
        // Ends inside: a 7-byte mov cut to 6 bytes.
        let b = asm(|a| a.mov(rax, qword_ptr(0xffff_ffff_8200_0000u64)));
        let e = relocate(F, &b[..6], 0, T, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::EndsInside { .. }), "{e}");
        // ret in the moved range.
        let b = asm(|a| {
            a.xor(eax, eax)?;
            a.ret()?;
            a.int3()?;
            a.int3()
        });
        let e = relocate(F, &b, 0, T, &[]).unwrap_err();
        assert!(
            matches!(e, PrologueError::FlowEnd { addr, .. } if addr == F + 2),
            "{e}"
        );
        assert!(e.to_string().contains("ret"), "{e}");
        // ud2.
        let b = asm(|a| {
            a.ud2()?;
            a.nop()?;
            a.nop()?;
            a.nop()?;
            a.ret()
        });
        let e = relocate(F, &b, 0, T, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::Trap { addr: F, .. }), "{e}");
        // int3 (a kprobe).
        let e = relocate(F, &[0xcc, 0x89, 0xe5, 0x90, 0x90, 0xc3], 0, T, &[]).unwrap_err();
        assert_eq!(e, PrologueError::Kprobe { addr: F });
        assert!(e.to_string().contains("kprobe"));
        // Loop back-edge into the moved range (after its first instruction).
        let b = asm(|a| {
            let mut l = a.create_label();
            a.push(rbx)?;
            a.set_label(&mut l)?;
            a.dec(edi)?;
            a.jne(l)?;
            a.pop(rbx)?;
            a.ret()
        });
        let e = relocate(F, &b, 0, T, &[]).unwrap_err();
        assert!(
            matches!(e, PrologueError::BranchIntoMoved { target, .. } if target == F + 1),
            "{e}"
        );
        // A back-edge to the site itself is fine.
        let b = asm(|a| {
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.dec(edi)?;
            a.mov(eax, 1)?;
            a.jne(l)?;
            a.ret()
        });
        relocate(F, &b, 0, T, &[]).unwrap();
        // Forbidden range.
        let e = relocate(F, &b, 0, T, &[(F + 3, F + 4, "__ex_table entry".into())]).unwrap_err();
        assert!(e.to_string().contains("__ex_table entry"), "{e}");
        assert!(
            matches!(e, PrologueError::Forbidden { addr, .. } if addr == F + 2),
            "{e}"
        );
        relocate(F, &b, 0, T, &[(F + 7, F + 8, "after".into())]).unwrap();
        // Out of reach.
        let e = relocate(F, &b, 0, 0xffff_8880_0000_0000, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::Reach { .. }), "{e}");
        // Site not on a boundary.
        let e = relocate(F, &b, 1, T, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::SiteNotBoundary { .. }), "{e}");
        // Site past the end, huge input.
        assert!(matches!(
            relocate(F, &b, 99, T, &[]),
            Err(PrologueError::BadInput { .. })
        ));
        assert!(matches!(
            relocate(u64::MAX - 3, &b, 0, T, &[]),
            Err(PrologueError::BadInput { .. })
        ));
    }

    #[test]
    fn synthetic_unrelocatable_and_references_are_refused() {
        // No real prologue of the images has these: assembled with code_asm.
        // xbegin in the moved range.
        let b = asm(|a| {
            let mut l = a.create_label();
            a.xbegin(l)?;
            a.nop()?;
            a.set_label(&mut l)?;
            a.ret()
        });
        let e = relocate(F, &b, 0, T, &[]).unwrap_err();
        assert!(
            matches!(e, PrologueError::Unrelocatable { addr: F, .. }),
            "{e}"
        );
        // loop (short only).
        let b = asm(|a| {
            let mut l = a.create_label();
            a.set_label(&mut l)?;
            a.nop()?;
            a.loop_(l)?;
            a.mov(eax, 1)?;
            a.ret()
        });
        let e = relocate(F, &b, 0, T, &[]).unwrap_err();
        assert!(matches!(e, PrologueError::Unrelocatable { .. }), "{e}");
        assert!(e.to_string().contains("loop"), "{e}");
        // lea of an address inside the moved bytes (later in the function).
        let mut b = vec![0x53, 0x89, 0xf8, 0x01, 0xf0]; // push rbx; mov eax,edi; add eax,esi
        b.extend([0x48, 0x8d, 0x0d]); // lea rcx,[rip+d] at F+5, next ip F+12
        b.extend((-(12i32 - 1)).to_le_bytes()); // -> F+1
        b.extend([0x5b, 0xc3]);
        let e = relocate(F, &b, 0, T, &[]).unwrap_err();
        assert!(
            matches!(e, PrologueError::RefIntoMoved { target, addr, .. } if target == F + 1 && addr == F + 5),
            "{e}"
        );
        // mov $F+2,%rax: an absolute address inside the moved bytes.
        let abs = asm(|a| {
            a.push(rbx)?;
            a.mov(eax, edi)?;
            a.add(eax, esi)?;
            a.mov(rcx, (F + 2) as i64)?;
            a.pop(rbx)?;
            a.ret()
        });
        let e = relocate(F, &abs, 0, T, &[]).unwrap_err();
        assert!(
            matches!(e, PrologueError::RefIntoMoved { target, .. } if target == F + 2),
            "{e}"
        );
        // Other code (a `.cold` part) jumping into the moved bytes.
        let p = relocate(
            F,
            &b[..5]
                .iter()
                .chain(&[0x5b, 0xc3])
                .copied()
                .collect::<Vec<_>>(),
            0,
            T,
            &[],
        )
        .unwrap();
        let cold = 0xffff_ffff_8190_0000u64;
        let mut a = CodeAssembler::new(64).unwrap();
        a.jmp(F + 3).unwrap();
        let jb = a.assemble(cold).unwrap();
        let e = check_other_code(&p, cold, &jb).unwrap_err();
        assert!(
            matches!(e, PrologueError::BranchIntoMoved { addr, .. } if addr == cold),
            "{e}"
        );
        let mut a = CodeAssembler::new(64).unwrap();
        a.jmp(F).unwrap();
        check_other_code(&p, cold, &a.assemble(cold).unwrap()).unwrap();
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic byte soup at every site offset.
        let mut x: u64 = 0x1234_5678;
        let mut soup = vec![0u8; 256];
        for round in 0..200 {
            for b in soup.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let n = 5 + round % 200;
            for off in 0..8 {
                let _ = relocate(F, &soup[..n], off, T, &[]);
            }
        }
    }
}
