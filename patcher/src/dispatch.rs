//! The per-task dispatcher of a transition (klp's `klp_ftrace_handler`, as arena code).
//!
//! While a patch is in transition, each of its entry sites jumps to a small stub instead of
//! straight to the new function. The stub reads the current task's `patch_state` and continues
//! in the old version (0, unpatched) or the new one (anything else, as klp does for -1):
//!
//! ```text
//! push rax
//! mov  rax, gs:[current_task]        ; per-CPU `current` (6.1: current_task, 6.12: pcpu_hot)
//! cmp  dword [rax + patch_state], 0
//! pop  rax                           ; flags survive the pop
//! je   old                           ; the original body after the site, or the patch below
//! jmp  new
//! ```
//!
//! Every register is preserved (only flags change, which no call preserves), so the arguments
//! reach either version untouched. An interrupt runs in the state of the task it interrupted,
//! because `current` is that task. The stub makes no call and owns no frame: a task
//! interrupted inside it has an unreliable stack (no unwind info), which only delays its switch.

use iced_x86::code_asm::{dword_ptr, qword_ptr, rax, CodeAssembler};
use thiserror::Error;

/// Bytes reserved per stub (the stub is 31 bytes; the rest is int3).
pub const STUB_SIZE: u64 = 32;

/// Bytes reserved per guard stub (see [`guard_stub`]).
pub const GUARD_SIZE: u64 = 16;

/// `-EBUSY`.
pub const EBUSY: i32 = 16;

/// Errors generating stubs.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DispatchError {
    /// A field does not fit its encoding.
    #[error("{what} {value:#x} does not fit a 32-bit displacement")]
    Displacement {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A target is out of rel32 reach of the stub.
    #[error("target {target:#x} is out of rel32 reach of the stub at {stub:#x}")]
    Reach {
        /// The stub.
        stub: u64,
        /// The target.
        target: u64,
    },
    /// iced-x86 refused.
    #[error("assembling the stub: {0}")]
    Asm(String),
}

/// Where the dispatcher finds the current task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskStateLayout {
    /// Per-CPU offset of `current` (zero-based, `%gs`-relative).
    pub current_task: u64,
    /// Offset of `task_struct.patch_state` (an `int`).
    pub patch_state: u64,
}

fn asm_err(e: iced_x86::IcedError) -> DispatchError {
    DispatchError::Asm(e.to_string())
}

fn disp32(what: &'static str, value: u64) -> Result<i64, DispatchError> {
    i32::try_from(value)
        .map(i64::from)
        .map_err(|_| DispatchError::Displacement { what, value })
}

fn reach(stub: u64, target: u64) -> Result<(), DispatchError> {
    let d = target.wrapping_sub(stub) as i64;
    if d.unsigned_abs() < (1 << 31) - 64 {
        Ok(())
    } else {
        Err(DispatchError::Reach { stub, target })
    }
}

/// The stub at `at`, continuing in `old` for unpatched tasks and in `new` otherwise; padded
/// with int3 to [`STUB_SIZE`].
pub fn stub(
    layout: TaskStateLayout,
    at: u64,
    old: u64,
    new: u64,
) -> Result<Vec<u8>, DispatchError> {
    reach(at, old)?;
    reach(at, new)?;
    let cur = disp32("current_task offset", layout.current_task)?;
    let st = disp32("patch_state offset", layout.patch_state)?;
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    a.push(rax).map_err(asm_err)?;
    a.mov(rax, qword_ptr(cur).gs()).map_err(asm_err)?;
    a.cmp(dword_ptr(rax + st), 0).map_err(asm_err)?;
    a.pop(rax).map_err(asm_err)?;
    a.set_prefer_short_branch(false);
    a.je(old).map_err(asm_err)?;
    a.jmp(new).map_err(asm_err)?;
    let mut b = a.assemble(at).map_err(asm_err)?;
    if b.len() as u64 > STUB_SIZE {
        return Err(DispatchError::Asm(format!("stub is {} bytes", b.len())));
    }
    b.resize(STUB_SIZE as usize, 0xcc);
    Ok(b)
}

/// A function body that returns `-EBUSY` (as `int` and as `ssize_t`): entered in place of the
/// guest's own `klp_enable_patch` / livepatch `enabled_store` while a transition of ours runs,
/// so the guest's livepatch cannot start a transition of its own on top of it. `thunk` is the
/// guest's return thunk (`None`: plain `ret`).
pub fn guard_stub(at: u64, thunk: Option<u64>) -> Result<Vec<u8>, DispatchError> {
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    a.mov(rax, -i64::from(EBUSY)).map_err(asm_err)?;
    match thunk {
        None => {
            a.ret().map_err(asm_err)?;
            a.int3().map_err(asm_err)?;
        }
        Some(t) => {
            reach(at, t)?;
            a.set_prefer_short_branch(false);
            a.jmp(t).map_err(asm_err)?;
            a.int3().map_err(asm_err)?;
        }
    }
    let mut b = a.assemble(at).map_err(asm_err)?;
    if b.len() as u64 > GUARD_SIZE {
        return Err(DispatchError::Asm(format!("guard is {} bytes", b.len())));
    }
    b.resize(GUARD_SIZE as usize, 0xcc);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disasm(bytes: &[u8], ip: u64) -> Vec<String> {
        let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        f.options_mut().set_hex_prefix("0x");
        f.options_mut().set_hex_suffix("");
        let mut out = Vec::new();
        for ins in &mut d {
            let mut s = String::new();
            f.format(&ins, &mut s);
            out.push(s);
        }
        out
    }

    const AT: u64 = 0xffff_ffff_c040_0800;

    #[test]
    fn stub_reads_the_current_tasks_state() {
        // 6.1 offsets (KERNEL-FACTS §5).
        let l = TaskStateLayout {
            current_task: 0x1fb80,
            patch_state: 0x145c,
        };
        let old = 0xffff_ffff_8123_4565;
        let new = AT + 0x1000;
        let b = stub(l, AT, old, new).unwrap();
        assert_eq!(b.len(), STUB_SIZE as usize);
        let d = disasm(&b, AT);
        assert_eq!(
            d,
            vec![
                "push rax",
                "mov rax,gs:[0x1FB80]",
                "cmp dword ptr [rax+0x145C],0",
                "pop rax",
                "je 0xFFFFFFFF81234565",
                "jmp 0xFFFFFFFFC0401800",
                "int3",
            ]
        );
    }

    #[test]
    fn out_of_reach_and_bad_offsets_are_refused() {
        let l = TaskStateLayout {
            current_task: 0x35000,
            patch_state: 0x145c,
        };
        assert!(matches!(
            stub(l, AT, 0xffff_8880_0000_0000, AT + 64),
            Err(DispatchError::Reach { .. })
        ));
        let bad = TaskStateLayout {
            current_task: 1 << 33,
            ..l
        };
        assert!(matches!(
            stub(bad, AT, AT + 64, AT + 128),
            Err(DispatchError::Displacement { .. })
        ));
    }

    #[test]
    fn guard_returns_ebusy() {
        let b = guard_stub(AT, None).unwrap();
        assert_eq!(
            disasm(&b, AT)[..3],
            ["mov rax,0xFFFFFFFFFFFFFFF0", "ret", "int3"]
        );
        let t = 0xffff_ffff_8200_0000;
        let b = guard_stub(AT, Some(t)).unwrap();
        assert_eq!(disasm(&b, AT)[1], "jmp 0xFFFFFFFF82000000");
    }
}
