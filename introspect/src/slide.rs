//! The KASLR slide, from `kallsyms_relative_base`, cross-checked against sources a guest user
//! cannot forge: MSR_LSTAR, the IDT, and the kernel page tables.

use serde::{Deserialize, Serialize};

use crate::error::{PagingError, SlideError};
use crate::kallsyms::KallsymsLayout;
use crate::memory::PhysMemory;
use crate::paging::{self, PageRoot};
use crate::regs::VcpuRegs;
use crate::symbols::Symbols;

/// Link-time address of `_text` (`__START_KERNEL_map + LOAD_PHYSICAL_ADDR`).
pub const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;
/// `__START_KERNEL_map`: the kernel-image mapping base.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// CONFIG_PHYSICAL_ALIGN: KASLR granularity.
pub const KASLR_ALIGN: u64 = 0x20_0000;
/// Fixed address of the read-only IDT alias in the cpu_entry_area.
pub const CEA_IDT: u64 = 0xffff_fe00_0000_0000;

/// Which independent check confirmed (or could not test) the slide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// MSR_LSTAR == runtime `entry_SYSCALL_64`.
    Lstar,
    /// IDT gate 14 == `asm_exc_page_fault`.
    IdtPageFault,
    /// IDT gate 0 == `asm_exc_divide_error`.
    IdtDivideError,
    /// The page walk of runtime `_text` lands where the scan found the tables.
    PhysLayout,
}

/// Outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckOutcome {
    /// The check ran and agreed.
    Passed,
    /// The check could not run (reason).
    Skipped(String),
}

/// One check and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlideCheck {
    /// The check.
    pub kind: CheckKind,
    /// What happened.
    pub outcome: CheckOutcome,
}

/// The slide and where the kernel image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlideReport {
    /// Runtime `_text`.
    #[serde(with = "crate::hex")]
    pub text: u64,
    /// `text - LINK_TEXT` (a multiple of 2 MiB).
    #[serde(with = "crate::hex")]
    pub slide: u64,
    /// Guest-physical address of `_text`.
    #[serde(with = "crate::hex")]
    pub text_pa: u64,
    /// The kernel's `phys_base`: `text_pa - (text - START_KERNEL_MAP)` (mod 2^64).
    #[serde(with = "crate::hex")]
    pub phys_base: u64,
    /// The checks run.
    pub checks: Vec<SlideCheck>,
}

impl SlideReport {
    /// Number of checks that passed.
    pub fn passed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.outcome == CheckOutcome::Passed)
            .count()
    }

    /// Whether `kind` passed.
    pub fn passed_check(&self, kind: CheckKind) -> bool {
        self.checks
            .iter()
            .any(|c| c.kind == kind && c.outcome == CheckOutcome::Passed)
    }
}

/// Decodes the handler address of a 16-byte IDT gate.
pub fn idt_gate_target(gate: &[u8; 16]) -> u64 {
    let lo = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    lo | (mid << 16) | (hi << 32)
}

fn sym(symbols: &Symbols, name: &'static str) -> Result<u64, SlideError> {
    symbols
        .lookup(name, None)
        .map_err(|_| SlideError::MissingSymbol(name))
}

fn paging_err(what: &'static str) -> impl FnOnce(PagingError) -> SlideError {
    move |source| SlideError::Paging { what, source }
}

/// Computes the slide from the decoded kallsyms and cross-checks it. `vcpus` supply LSTAR and
/// IDTR when the host has them. Every check that can run must agree; at least the physical
/// layout check always runs.
pub fn compute(
    mem: &dyn PhysMemory,
    root: PageRoot,
    layout: &KallsymsLayout,
    symbols: &Symbols,
    vcpus: &[VcpuRegs],
) -> Result<SlideReport, SlideError> {
    let text = layout.relative_base;
    let slide = text.wrapping_sub(LINK_TEXT);
    if slide & (KASLR_ALIGN - 1) != 0 {
        return Err(SlideError::Misaligned { slide, text });
    }
    let text_sym = sym(symbols, "_text")?;
    if text_sym != text {
        return Err(SlideError::Disagree {
            check: "_text symbol",
            expected: text,
            found: text_sym,
        });
    }
    let mut checks = Vec::new();

    // (c) Physical layout: _text translates; the tables lie inside the image as mapped.
    let text_pa = paging::translate(mem, root, text).map_err(paging_err("_text"))?;
    let phys_base = text_pa.wrapping_sub(text.wrapping_sub(START_KERNEL_MAP));
    let end = sym(symbols, "_end")?;
    let tt_off = layout.token_table_pa.wrapping_sub(text_pa);
    if tt_off >= end.wrapping_sub(text) {
        return Err(SlideError::Disagree {
            check: "kallsyms inside the kernel image (pa)",
            expected: text_pa,
            found: layout.token_table_pa,
        });
    }
    let tt_va = text.wrapping_add(tt_off);
    let tt_pa = paging::translate(mem, root, tt_va).map_err(paging_err("kallsyms_token_table"))?;
    if tt_pa != layout.token_table_pa {
        return Err(SlideError::Disagree {
            check: "page walk of kallsyms_token_table",
            expected: layout.token_table_pa,
            found: tt_pa,
        });
    }
    // 6.12+ lists the tables themselves: the symbol must agree too.
    if let Ok(v) = symbols.lookup("kallsyms_token_table", None) {
        if v != tt_va {
            return Err(SlideError::Disagree {
                check: "kallsyms_token_table symbol",
                expected: tt_va,
                found: v,
            });
        }
    }
    checks.push(SlideCheck {
        kind: CheckKind::PhysLayout,
        outcome: CheckOutcome::Passed,
    });

    // (a) MSR_LSTAR.
    let lstars: Vec<u64> = vcpus.iter().filter_map(|v| v.lstar).collect();
    if lstars.is_empty() {
        checks.push(SlideCheck {
            kind: CheckKind::Lstar,
            outcome: CheckOutcome::Skipped("the host did not supply MSR_LSTAR".into()),
        });
    } else {
        let want = sym(symbols, "entry_SYSCALL_64")?;
        for l in lstars {
            if l != want {
                return Err(SlideError::Disagree {
                    check: "MSR_LSTAR vs entry_SYSCALL_64",
                    expected: want,
                    found: l,
                });
            }
        }
        checks.push(SlideCheck {
            kind: CheckKind::Lstar,
            outcome: CheckOutcome::Passed,
        });
    }

    // (b) IDT gates.
    let idt = vcpus.iter().find_map(|v| v.idtr_base).unwrap_or(CEA_IDT);
    for (kind, vector, name, check) in [
        (
            CheckKind::IdtPageFault,
            14u64,
            "asm_exc_page_fault",
            "IDT gate 14 vs asm_exc_page_fault",
        ),
        (
            CheckKind::IdtDivideError,
            0,
            "asm_exc_divide_error",
            "IDT gate 0 vs asm_exc_divide_error",
        ),
    ] {
        let mut gate = [0u8; 16];
        match paging::read_virt(mem, root, idt.wrapping_add(16 * vector), &mut gate) {
            Ok(()) => {
                let want = sym(symbols, name)?;
                let found = idt_gate_target(&gate);
                if found != want {
                    return Err(SlideError::Disagree {
                        check,
                        expected: want,
                        found,
                    });
                }
                checks.push(SlideCheck {
                    kind,
                    outcome: CheckOutcome::Passed,
                });
            }
            Err(e) => checks.push(SlideCheck {
                kind,
                outcome: CheckOutcome::Skipped(format!("IDT at {idt:#x} not readable: {e}")),
            }),
        }
    }
    Ok(SlideReport {
        text,
        slide,
        text_pa,
        phys_base,
        checks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_decoding() {
        // 6.12 run: gate 14 = 0xffffffffbc001280.
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&0x1280u16.to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[4] = 0;
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&0xbc00u16.to_le_bytes());
        g[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        assert_eq!(idt_gate_target(&g), 0xffff_ffff_bc00_1280);
    }
}
