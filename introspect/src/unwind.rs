//! The ORC unwinder: a host-side mirror of the kernel's `unwind_next_frame()` (6.1 and 6.12,
//! arch/x86/kernel/unwind_orc.c) plus the `arch_stack_walk[_reliable]` loops around it.
//!
//! Everything here works on plain inputs — an [`OrcTable`], text ranges, the stacks that may be
//! read and a [`StackReader`] — so it can be tested against synthetic, hostile memory.

use crate::orc::{reg, OrcEntry, OrcTable, OrcType};

/// Maximum number of entries a reliable stack may have (`MAX_STACK_ENTRIES` in livepatch).
pub const MAX_RELIABLE_ENTRIES: usize = 100;
/// Hard cap on frames we ever collect (the walk also stops here).
pub const MAX_FRAMES: usize = 128;

/// `struct pt_regs` layout (BTF-derived offsets; see [`PtRegsLayout::from_btf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtRegsLayout {
    /// sizeof(struct pt_regs).
    pub size: u64,
    /// Offset of `bp`.
    pub bp: u64,
    /// Offset of `r10`.
    pub r10: u64,
    /// Offset of `r13`.
    pub r13: u64,
    /// Offset of `di`.
    pub di: u64,
    /// Offset of `dx`.
    pub dx: u64,
    /// Offset of `ip` (= IRET_FRAME_OFFSET).
    pub ip: u64,
    /// Offset of `cs`.
    pub cs: u64,
    /// Offset of `sp`.
    pub sp: u64,
}

impl PtRegsLayout {
    /// The x86-64 `struct pt_regs` of Linux 4.x to 6.x (what BTF gives for 6.1 and 6.12); for
    /// synthetic stacks in tests and fuzzing. Real guests use [`PtRegsLayout::from_btf`].
    pub const X86_64: PtRegsLayout = PtRegsLayout {
        size: 0xa8,
        bp: 0x20,
        r10: 0x38,
        r13: 0x10,
        di: 0x70,
        dx: 0x60,
        ip: 0x80,
        cs: 0x88,
        sp: 0x98,
    };

    /// Reads the layout from BTF.
    pub fn from_btf(btf: &crate::btf::Btf) -> Result<Self, crate::btf::BtfError> {
        let m = |f: &str| btf.member_offset("pt_regs", f);
        Ok(PtRegsLayout {
            size: btf.struct_size("pt_regs")?,
            bp: m("bp")?,
            r10: m("r10")?,
            r13: m("r13")?,
            di: m("di")?,
            dx: m("dx")?,
            ip: m("ip")?,
            cs: m("cs")?,
            sp: m("sp")?,
        })
    }

    /// Size of the iret frame (ip, cs, flags, sp, ss) = size - ip offset.
    fn iret_size(&self) -> u64 {
        self.size.saturating_sub(self.ip)
    }
}

/// What kind of stack a range is (the kernel's `enum stack_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackType {
    /// The task's own kernel stack.
    Task,
    /// The per-CPU hardirq stack.
    Irq,
    /// An exception (IST) stack in the cpu_entry_area.
    Exception,
    /// The per-CPU entry (trampoline) stack.
    Entry,
}

/// One readable stack: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackRange {
    /// Lowest address.
    pub start: u64,
    /// One past the highest address.
    pub end: u64,
    /// Stack type.
    pub ty: StackType,
}

impl StackRange {
    fn contains(&self, addr: u64, len: u64) -> bool {
        match addr.checked_add(len) {
            Some(e) => addr >= self.start && e <= self.end,
            None => false,
        }
    }
}

/// Reads guest kernel virtual memory for the unwinder.
pub trait StackReader {
    /// Reads the u64 at kernel virtual address `va`, or `None` if unmapped.
    fn read_u64(&self, va: u64) -> Option<u64>;
}

/// Module text and ORC data, consulted only for ips outside the vmlinux ranges.
pub trait ModuleOrc {
    /// Whether `ip` is in the text of a loaded module.
    fn is_text(&self, ip: u64) -> bool;
    /// The ORC entry of the module containing `ip`, if any.
    fn find(&self, ip: u64) -> Option<OrcEntry>;
}

/// Static inputs of an unwind.
#[derive(Clone, Copy)]
pub struct UnwindEnv<'a> {
    /// The vmlinux ORC table.
    pub orc: &'a OrcTable,
    /// Ranges covered by the vmlinux ORC table (`_stext.._etext`, init text).
    pub orc_ranges: &'a [(u64, u64)],
    /// vmlinux ranges accepted as kernel text (`__kernel_text_address`): core and init text.
    pub text_ranges: &'a [(u64, u64)],
    /// Loaded modules (text ranges and ORC tables), if known.
    pub modules: Option<&'a dyn ModuleOrc>,
    /// `struct pt_regs` layout.
    pub regs: PtRegsLayout,
    /// Code outside the kernel's ORC that keeps frame pointers (hvpatch's patch functions):
    /// accepted as text and unwound through `rbp` at return addresses. An interrupted ip in it
    /// (the prologue or epilogue may be half done) makes the stack unreliable.
    pub fp_text: &'a [(u64, u64)],
    /// Return addresses that stand for others, `(at, as_if)`: a return address `at` read from
    /// the stack (a call moved into hvpatch's prologue trampoline) continues the walk, and is
    /// reported, as `as_if` (the return address of the same call in the original function,
    /// whose ORC entry describes the same frame). Code outside the kernel text that is not
    /// listed stays not text (unreliable).
    pub aliases: &'a [(u64, u64)],
}

impl std::fmt::Debug for UnwindEnv<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnwindEnv").finish_non_exhaustive()
    }
}

impl UnwindEnv<'_> {
    /// `__kernel_text_address(ip)`: vmlinux core/init text or module text.
    pub fn is_text(&self, ip: u64) -> bool {
        self.text_ranges.iter().any(|&(s, e)| ip >= s && ip < e)
            || self.modules.is_some_and(|m| m.is_text(ip))
            || self.is_fp_text(ip)
    }

    /// Whether `ip` is in [`UnwindEnv::fp_text`].
    pub fn is_fp_text(&self, ip: u64) -> bool {
        self.fp_text.iter().any(|&(s, e)| ip >= s && ip < e)
    }

    /// `orc_find()`: vmlinux table for vmlinux text, else the module's table.
    fn orc_find(&self, ip: u64) -> Option<OrcEntry> {
        if ip == 0 {
            return Some(OrcEntry::NULL_IP);
        }
        if self.orc_ranges.iter().any(|&(s, e)| ip >= s && ip < e) {
            return self.orc.find(ip);
        }
        self.modules.and_then(|m| m.find(ip))
    }
}

/// Where an unwind starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnwindStart {
    /// First ip.
    pub ip: u64,
    /// Stack pointer.
    pub sp: u64,
    /// Frame pointer.
    pub bp: u64,
    /// Whether `ip` is exact (interrupted) rather than a return address.
    pub signal: bool,
}

/// How a walk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkEnd {
    /// Reached the user-mode `pt_regs` at the top of the task stack.
    UserRegs,
    /// Reached an ORC END_OF_STACK entry.
    EndOfStack,
    /// Stopped on an error (message).
    Error(String),
    /// Hit [`MAX_FRAMES`].
    TooDeep,
}

/// The result of a walk: the return addresses and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    /// ips in order, innermost first (as `arch_stack_walk` reports them).
    pub frames: Vec<u64>,
    /// How it ended.
    pub end: WalkEnd,
    /// `None` if `arch_stack_walk_reliable` would succeed, else why not.
    pub unreliable: Option<String>,
}

struct State {
    ip: u64,
    sp: u64,
    bp: u64,
    regs: Option<u64>,
    prev_regs: Option<u64>,
    full_regs: bool,
    signal: bool,
    /// Index into the stack list of the stack `sp` is on; `None` = done (STACK_TYPE_UNKNOWN).
    stack: Option<usize>,
    visit_mask: u32,
    error: Option<String>,
    end: Option<WalkEnd>,
}

struct Walker<'a> {
    env: UnwindEnv<'a>,
    stacks: &'a [StackRange],
    mem: &'a dyn StackReader,
}

impl Walker<'_> {
    /// `get_stack_info`: the stack holding `addr`, once per stack type.
    fn get_stack_info(&self, st: &mut State, addr: u64) -> bool {
        for (i, s) in self.stacks.iter().enumerate() {
            if s.contains(addr, 8) {
                let bit = 1u32 << (s.ty as u32);
                if st.visit_mask & bit != 0 {
                    return false;
                }
                st.visit_mask |= bit;
                st.stack = Some(i);
                return true;
            }
        }
        false
    }

    fn on_current(&self, st: &State, addr: u64, len: u64) -> bool {
        st.stack
            .and_then(|i| self.stacks.get(i))
            .is_some_and(|s| s.contains(addr, len))
    }

    fn access_ok(&self, st: &mut State, addr: u64, len: u64) -> bool {
        if self.on_current(st, addr, len) {
            return true;
        }
        let keep = st.stack;
        if self.get_stack_info(st, addr) && self.on_current(st, addr, len) {
            return true;
        }
        // The kernel clobbers stack_info on failure; keep the old one (only affects the
        // wrong-direction check, which then sees a stack change and is skipped).
        if st.stack.is_none() {
            st.stack = keep;
        }
        false
    }

    fn deref(&self, st: &mut State, addr: u64) -> Option<u64> {
        if !self.access_ok(st, addr, 8) {
            return None;
        }
        self.mem.read_u64(addr)
    }

    fn get_reg(&self, st: &State, off: u64) -> Option<u64> {
        let regs = st.regs?;
        let base = if st.full_regs { regs } else { st.prev_regs? };
        self.mem.read_u64(base.checked_add(off)?)
    }

    fn user_mode(&self, regs: u64) -> bool {
        regs.checked_add(self.env.regs.cs)
            .and_then(|a| self.mem.read_u64(a))
            .is_some_and(|cs| cs & 3 != 0)
    }

    fn err(&self, st: &mut State, msg: String) {
        if st.error.is_none() {
            st.error = Some(msg);
        }
        st.end = Some(WalkEnd::Error(st.error.clone().unwrap_or_default()));
        st.stack = None;
    }

    fn the_end(&self, st: &mut State, how: WalkEnd) {
        st.end = Some(how);
        st.stack = None;
    }

    /// `unwind_next_frame()`.
    fn next_frame(&self, st: &mut State) {
        if st.stack.is_none() {
            return;
        }
        let orig_ip = st.ip;
        let prev_sp = st.sp;
        let prev_stack = st.stack;
        if let Some(r) = st.regs {
            if self.user_mode(r) {
                return self.the_end(st, WalkEnd::UserRegs);
            }
        }
        let lookup = if st.signal {
            st.ip
        } else {
            st.ip.wrapping_sub(1)
        };
        let orc = match self.env.orc_find(lookup) {
            None if self.env.is_fp_text(lookup) => {
                if st.signal {
                    return self.err(
                        st,
                        format!("interrupted at {orig_ip:#x} in patch code (no unwind info)"),
                    );
                }
                OrcEntry::FP_GUESS
            }
            Some(o) => {
                match o.ty {
                    OrcType::Undefined => {
                        return self.err(st, format!("no unwind info at {orig_ip:#x}"))
                    }
                    OrcType::EndOfStack => return self.the_end(st, WalkEnd::EndOfStack),
                    _ => {}
                }
                o
            }
            None => {
                if st.error.is_none() {
                    st.error = Some(format!(
                        "no ORC entry for {orig_ip:#x}; guessed frame pointer"
                    ));
                }
                OrcEntry::FP_GUESS
            }
        };
        st.signal = orc.signal;
        let off = orc.sp_offset as i64 as u64;
        let pr = self.env.regs;
        let mut indirect = false;
        let mut sp = match orc.sp_reg {
            reg::SP => st.sp.wrapping_add(off),
            reg::BP => st.bp.wrapping_add(off),
            reg::SP_INDIRECT => {
                indirect = true;
                st.sp
            }
            reg::BP_INDIRECT => {
                indirect = true;
                st.bp.wrapping_add(off)
            }
            r @ (reg::R10 | reg::R13 | reg::DI | reg::DX) => {
                let o = match r {
                    reg::R10 => pr.r10,
                    reg::R13 => pr.r13,
                    reg::DI => pr.di,
                    _ => pr.dx,
                };
                match self.get_reg(st, o) {
                    Some(v) => v,
                    None => return self.err(st, format!("missing register {r} at {orig_ip:#x}")),
                }
            }
            r => return self.err(st, format!("unknown SP base reg {r} at {orig_ip:#x}")),
        };
        if indirect {
            sp = match self.deref(st, sp) {
                Some(v) => v,
                None => return self.err(st, format!("bad indirect sp at {orig_ip:#x}")),
            };
            if orc.sp_reg == reg::SP_INDIRECT {
                sp = sp.wrapping_add(off);
            }
        }
        match orc.ty {
            OrcType::Call => {
                let ip_p = sp.wrapping_sub(8);
                match self.deref(st, ip_p) {
                    Some(ip) => {
                        st.ip = self
                            .env
                            .aliases
                            .iter()
                            .find(|a| a.0 == ip)
                            .map_or(ip, |a| a.1)
                    }
                    None => return self.err(st, format!("can't read return address at {ip_p:#x}")),
                }
                st.sp = sp;
                st.regs = None;
                st.prev_regs = None;
            }
            OrcType::Regs => {
                if !self.access_ok(st, sp, pr.size) {
                    return self.err(st, format!("can't access registers at {orig_ip:#x}"));
                }
                let (Some(ip), Some(nsp)) = (
                    self.mem.read_u64(sp.wrapping_add(pr.ip)),
                    self.mem.read_u64(sp.wrapping_add(pr.sp)),
                ) else {
                    return self.err(st, format!("can't read registers at {orig_ip:#x}"));
                };
                st.ip = ip;
                st.sp = nsp;
                st.regs = Some(sp);
                st.prev_regs = None;
                st.full_regs = true;
            }
            OrcType::RegsPartial => {
                if !self.access_ok(st, sp, pr.iret_size()) {
                    return self.err(st, format!("can't access iret registers at {orig_ip:#x}"));
                }
                let base = sp.wrapping_sub(pr.ip);
                let (Some(ip), Some(nsp)) = (
                    self.mem.read_u64(base.wrapping_add(pr.ip)),
                    self.mem.read_u64(base.wrapping_add(pr.sp)),
                ) else {
                    return self.err(st, format!("can't read iret registers at {orig_ip:#x}"));
                };
                st.ip = ip;
                st.sp = nsp;
                if st.full_regs {
                    st.prev_regs = st.regs;
                }
                st.regs = Some(base);
                st.full_regs = false;
            }
            t => return self.err(st, format!("unknown ORC type {t:?} at {orig_ip:#x}")),
        }
        match orc.bp_reg {
            reg::UNDEFINED => {
                if let Some(v) = self.get_reg(st, pr.bp) {
                    st.bp = v;
                }
            }
            reg::PREV_SP => match self.deref(st, sp.wrapping_add(orc.bp_offset as i64 as u64)) {
                Some(v) => st.bp = v,
                None => return self.err(st, format!("can't read saved bp at {orig_ip:#x}")),
            },
            reg::BP => match self.deref(st, st.bp.wrapping_add(orc.bp_offset as i64 as u64)) {
                Some(v) => st.bp = v,
                None => return self.err(st, format!("can't read saved bp at {orig_ip:#x}")),
            },
            r => return self.err(st, format!("unknown BP base reg {r} at {orig_ip:#x}")),
        }
        if st.stack == prev_stack && self.on_current(st, st.sp, 8) && st.sp <= prev_sp {
            self.err(
                st,
                format!("stack going in the wrong direction at {orig_ip:#x}"),
            );
        }
    }
}

/// Walks a stack like `arch_stack_walk()` (the frames `/proc/PID/stack` prints, before its
/// `__sched` filter) and judges it like `arch_stack_walk_reliable()`.
///
/// `stacks` are the stacks the walk may read (for a sleeping task only its task stack, like the
/// kernel; for a running vCPU also that CPU's IRQ and exception stacks). With `from_regs`, the
/// start state is an interrupted context (`signal = true`) and its ip is the first frame.
pub fn walk(
    env: UnwindEnv<'_>,
    stacks: &[StackRange],
    mem: &dyn StackReader,
    start: UnwindStart,
) -> Walk {
    let w = Walker { env, stacks, mem };
    let mut st = State {
        ip: start.ip,
        sp: start.sp,
        bp: start.bp,
        regs: None,
        prev_regs: None,
        full_regs: false,
        signal: start.signal,
        stack: None,
        visit_mask: 0,
        error: None,
        end: None,
    };
    if !w.get_stack_info(&mut st, start.sp) {
        // Maybe overflowed into a guard page: try the next page up, as the kernel does.
        let next_page = st.sp.checked_add(0xfff).map(|x| x & !0xfff).unwrap_or(0);
        st.error = Some(format!("sp {:#x} is not on a known stack", start.sp));
        if !w.get_stack_info(&mut st, next_page) {
            let msg = st.error.clone().unwrap_or_default();
            return Walk {
                frames: vec![],
                end: WalkEnd::Error(msg.clone()),
                unreliable: Some(msg),
            };
        }
    }
    let mut frames = Vec::new();
    let mut unreliable: Option<String> = None;
    loop {
        if st.stack.is_none() {
            break;
        }
        // arch_stack_walk_reliable: user pt_regs end the walk successfully.
        if st.full_regs {
            if let Some(r) = st.regs {
                if w.user_mode(r) {
                    st.end = Some(WalkEnd::UserRegs);
                    break;
                }
            }
        }
        if !w.env.is_text(st.ip) {
            if unreliable.is_none() {
                unreliable = Some(format!("ip {:#x} is not kernel text", st.ip));
            }
            if st.end.is_none() {
                st.end = Some(WalkEnd::Error(format!(
                    "ip {:#x} is not kernel text",
                    st.ip
                )));
            }
            break;
        }
        frames.push(st.ip);
        if frames.len() >= MAX_RELIABLE_ENTRIES && unreliable.is_none() {
            unreliable = Some(format!("more than {} entries", MAX_RELIABLE_ENTRIES - 1));
        }
        if frames.len() >= MAX_FRAMES {
            st.end = Some(WalkEnd::TooDeep);
            break;
        }
        w.next_frame(&mut st);
        if let (Some(e), None) = (&st.error, &unreliable) {
            unreliable = Some(e.clone());
        }
    }
    let end = st
        .end
        .unwrap_or_else(|| WalkEnd::Error("unwind stopped".into()));
    if unreliable.is_none() {
        match &end {
            WalkEnd::UserRegs | WalkEnd::EndOfStack => {}
            WalkEnd::Error(e) => unreliable = Some(e.clone()),
            WalkEnd::TooDeep => unreliable = Some("stack too deep".into()),
        }
    }
    Walk {
        frames,
        end,
        unreliable,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::orc::OrcFormat;
    use std::collections::HashMap;

    /// Synthetic stack memory: u64 values by address.
    pub(crate) struct Mem(pub(crate) HashMap<u64, u64>);
    impl StackReader for Mem {
        fn read_u64(&self, va: u64) -> Option<u64> {
            self.0.get(&va).copied()
        }
    }

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const STACK: u64 = 0xffff_c900_0000_0000;

    fn layout() -> PtRegsLayout {
        PtRegsLayout::X86_64
    }

    /// Table: [TEXT, +0x100) CALL sp+16; [+0x100,+0x200) CALL sp+8; +0x200 END; +0x300 UNDEF;
    /// +0x400 CALL sp=SP+0x7ff0 (huge); +0x500 REGS sp+0.
    fn table(entries: &[(u64, [u8; 6])]) -> OrcTable {
        let va = TEXT + 0x10_0000;
        let mut ipb = Vec::new();
        let mut eb = Vec::new();
        for (i, (ip, e)) in entries.iter().enumerate() {
            let rel = ip.wrapping_sub(va + 4 * i as u64) as i64 as i32;
            ipb.extend_from_slice(&rel.to_le_bytes());
            eb.extend_from_slice(e);
        }
        OrcTable::new(&ipb, va, eb, OrcFormat::Current).unwrap()
    }

    fn call(off: i16) -> [u8; 6] {
        let o = off.to_le_bytes();
        [o[0], o[1], 0, 0, 0x05, 0x02]
    }

    fn std_table() -> OrcTable {
        table(&[
            (TEXT, call(16)),
            (TEXT + 0x100, call(8)),
            (TEXT + 0x200, [0, 0, 0, 0, 0, 0x01]),
            (TEXT + 0x300, [0; 6]),
            (TEXT + 0x400, call(0x7ff0)),
            (TEXT + 0x500, [0, 0, 0, 0, 0x05, 0x0b]),
            (TEXT + 0x600, [0, 0, 0, 0, 0, 0]),
        ])
    }

    fn run(t: &OrcTable, mem: HashMap<u64, u64>, start: UnwindStart) -> Walk {
        let ranges = [(TEXT, TEXT + 0x1000)];
        let env = UnwindEnv {
            orc: t,
            orc_ranges: &ranges,
            text_ranges: &ranges,
            modules: None,
            regs: layout(),
            fp_text: &[(TEXT + 0x2000, TEXT + 0x3000)],
            aliases: &[(TEXT + 0x5010, TEXT + 0x110)],
        };
        let stacks = [StackRange {
            start: STACK,
            end: STACK + 0x4000,
            ty: StackType::Task,
        }];
        walk(env, &stacks, &Mem(mem), start)
    }

    #[test]
    fn simple_chain_to_end() {
        let sp = STACK + 0x3000;
        // frame 0: ip in +0x10 (CALL sp+16) -> ret at sp+8 = +0x110 (CALL sp+8) -> ret = +0x201
        // whose ip-1 = +0x200 -> END.
        let mem = HashMap::from([(sp + 8, TEXT + 0x110), (sp + 16, TEXT + 0x201)]);
        let w = run(
            &std_table(),
            mem,
            UnwindStart {
                ip: TEXT + 0x10,
                sp,
                bp: 0,
                signal: true,
            },
        );
        assert_eq!(w.frames, vec![TEXT + 0x10, TEXT + 0x110, TEXT + 0x201]);
        assert_eq!(w.end, WalkEnd::EndOfStack);
        assert_eq!(w.unreliable, None);
    }

    #[test]
    fn frame_pointer_text_unwinds_at_return_addresses_only() {
        let sp = STACK + 0x3000;
        let bp = STACK + 0x3100;
        // ORC frame -> return into fp text -> bp chain -> END.
        let mem = HashMap::from([(sp + 8, TEXT + 0x2010), (bp, 0), (bp + 8, TEXT + 0x201)]);
        let w = run(
            &std_table(),
            mem.clone(),
            UnwindStart {
                ip: TEXT + 0x10,
                sp,
                bp,
                signal: true,
            },
        );
        assert_eq!(w.frames, vec![TEXT + 0x10, TEXT + 0x2010, TEXT + 0x201]);
        assert_eq!(w.end, WalkEnd::EndOfStack);
        assert_eq!(w.unreliable, None);
        // Interrupted inside the fp text: unreliable.
        let w = run(
            &std_table(),
            mem,
            UnwindStart {
                ip: TEXT + 0x2010,
                sp,
                bp,
                signal: true,
            },
        );
        assert!(w.unreliable.unwrap().contains("patch code"));
    }

    /// A return address in a prologue trampoline (outside the text) is unwound as the return
    /// address of the same call in the original function; an unlisted one is not text.
    #[test]
    fn aliased_return_addresses_unwind_as_the_original() {
        let sp = STACK + 0x3000;
        let start = UnwindStart {
            ip: TEXT + 0x10,
            sp,
            bp: 0,
            signal: true,
        };
        // As simple_chain_to_end, with the first return address in the "trampoline".
        let mem = HashMap::from([(sp + 8, TEXT + 0x5010), (sp + 16, TEXT + 0x201)]);
        let w = run(&std_table(), mem, start);
        assert_eq!(w.frames, vec![TEXT + 0x10, TEXT + 0x110, TEXT + 0x201]);
        assert_eq!(w.unreliable, None);
        let mem = HashMap::from([(sp + 8, TEXT + 0x5018), (sp + 16, TEXT + 0x201)]);
        let w = run(&std_table(), mem, start);
        assert!(w.unreliable.unwrap().contains("not kernel text"));
    }

    #[test]
    fn user_regs_end() {
        let sp = STACK + 0x3f00;
        let regs = sp;
        let mem = HashMap::from([
            (regs + 0x80, 0x40_1000),
            (regs + 0x88, 0x33),
            (regs + 0x98, 0x7fff_0000),
        ]);
        let w = run(
            &std_table(),
            mem,
            UnwindStart {
                ip: TEXT + 0x500,
                sp,
                bp: 0,
                signal: true,
            },
        );
        assert_eq!(w.frames, vec![TEXT + 0x500]);
        assert_eq!(w.end, WalkEnd::UserRegs);
        assert_eq!(w.unreliable, None);
    }

    #[test]
    fn hostile_cases() {
        let sp = STACK + 0x3000;
        let t = std_table();
        // Undefined entry.
        let w = run(
            &t,
            HashMap::new(),
            UnwindStart {
                ip: TEXT + 0x300,
                sp,
                bp: 0,
                signal: true,
            },
        );
        assert!(w.unreliable.is_some());
        // Huge sp offset: off the stack -> error.
        let w = run(
            &t,
            HashMap::new(),
            UnwindStart {
                ip: TEXT + 0x400,
                sp,
                bp: 0,
                signal: true,
            },
        );
        assert!(matches!(w.end, WalkEnd::Error(_)));
        // Return address outside text.
        let mem = HashMap::from([(sp + 8, 0xdead_beef)]);
        let w = run(
            &t,
            mem,
            UnwindStart {
                ip: TEXT + 0x10,
                sp,
                bp: 0,
                signal: true,
            },
        );
        assert!(w.unreliable.unwrap().contains("not kernel text"));
        // Self loop: frame returns to itself with the same sp -> wrong direction.
        let mem = HashMap::from([(sp - 8, TEXT + 0x1)]);
        let t2 = table(&[(TEXT, [0, 0, 0, 0, 0x05, 0x02])]);
        let w = run(
            &t2,
            mem,
            UnwindStart {
                ip: TEXT + 0x1,
                sp,
                bp: 0,
                signal: true,
            },
        );
        assert!(w.unreliable.unwrap().contains("wrong direction"));
        // sp unmapped / not a stack.
        let w = run(
            &t,
            HashMap::new(),
            UnwindStart {
                ip: TEXT + 0x10,
                sp: 0x1234,
                bp: 0,
                signal: true,
            },
        );
        assert!(w.frames.is_empty() && w.unreliable.is_some());
        // ip outside ORC ranges -> frame pointer guess with bp garbage -> error, unreliable.
        let w = run(
            &t,
            HashMap::new(),
            UnwindStart {
                ip: TEXT + 0x5000,
                sp,
                bp: u64::MAX,
                signal: true,
            },
        );
        assert!(w.unreliable.is_some());
    }

    /// Random tables and memory: always terminates, never panics.
    #[test]
    fn fuzz_random_stacks() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut ents = Vec::new();
            let mut ip = TEXT;
            for _ in 0..8 {
                let r = rnd().to_le_bytes();
                ents.push((ip, [r[0], r[1] & 0x3f, r[2], r[3], r[4], r[5]]));
                ip += rnd() % 0x200;
            }
            let t = table(&ents);
            let mut mem = HashMap::new();
            for i in 0..0x800u64 {
                let v = match rnd() % 4 {
                    0 => TEXT + rnd() % 0x1000,
                    1 => STACK + rnd() % 0x4000,
                    2 => 0x33,
                    _ => rnd(),
                };
                mem.insert(STACK + 8 * i, v);
            }
            let w = run(
                &t,
                mem,
                UnwindStart {
                    ip: TEXT + rnd() % 0x1000,
                    sp: STACK + rnd() % 0x4000,
                    bp: STACK + rnd() % 0x4000,
                    signal: rnd() % 2 == 0,
                },
            );
            assert!(w.frames.len() <= MAX_FRAMES);
        }
    }
}
