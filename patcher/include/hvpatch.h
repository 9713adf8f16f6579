/* SPDX-License-Identifier: Apache-2.0 */
/*
 * hvpatch.h — authoring header for hvpatch live patches.
 *
 * A patch is ONE C file compiled to ONE relocatable object (`hvpatch build patch.c -o patch.o`).
 * The macros below record metadata in dedicated ELF sections that the hvpatch linker reads
 * (like klp_func records in a klp module); they emit no code.
 *
 *   #include <hvpatch.h>
 *   HVPATCH_NAME("cmdline-fix");                    // optional; default = object file name
 *   HVPATCH_KERNEL("6.1.0-56-cloud-amd64");         // optional; load refuses another release
 *   static int new_show(struct seq_file *m, void *v) { seq_printf(m, "%s\n", "patched"); return 0; }
 *   HVPATCH_FUNC(cmdline_proc_show, new_show);      // replace cmdline_proc_show by new_show
 *   HVPATCH_FUNC_POS(some_static_fn, 2, new_fn);    // the 2nd `some_static_fn` in kallsyms order
 *   HVPATCH_SYMPOS(dup_static_var, 1);              // which duplicate an undefined reference means
 *   HVPATCH_PATCH_FLAGS(HVPATCH_IMMEDIATE);         // optional: switch every task at once
 *   HVPATCH_FUNC_OBJ(fat, fat_show_options, new_fn); // a function of the loaded module `fat`
 *
 * Calling the original: HVPATCH_ORIG(ret, name, args) declares `hvpatch_orig_<name>`, which
 * runs the guest's original `name` (its body after the patched entry site), e.g. a wrapper:
 *   HVPATCH_ORIG(ssize_t, pipe_read, (struct kiocb *iocb, struct iov_iter *to));
 *   static ssize_t new_pipe_read(struct kiocb *iocb, struct iov_iter *to)
 *   { count++; return hvpatch_orig_pipe_read(iocb, to); }
 * For a function without an ftrace site (an immediate load rewrites its prologue), the original
 * runs from the patch's trampoline: the moved instructions, then the rest of the function.
 *
 * Consistency (like klp's): by default enabling or disabling a patch is a transition. Each
 * task switches to the new functions only when none of the functions the patch changes is on
 * its stack (checked by hvpatch with the vCPUs paused), or when it returns to user space or
 * passes the idle loop. Until then it keeps running the old versions, so functions patched
 * together are always used together within one task. HVPATCH_IMMEDIATE (per function in
 * HVPATCH_FUNC_FLAGS, or for the whole patch in HVPATCH_PATCH_FLAGS) skips this.
 *
 * Symbol resolution: every undefined symbol of the object is resolved against the guest's
 * kallsyms (exported or not, static included). A name that occurs at several addresses is
 * refused unless HVPATCH_SYMPOS gives its position (1-based, kallsyms = address order, as in
 * klp's sympos). Names with dots (`foo.isra.0`, `foo.constprop.0`) can be referenced through
 * an asm label: `extern int foo_isra(int) __asm__("foo.isra.0");`.
 *
 * Objects (klp's `klp_object.name`): HVPATCH_FUNC_OBJ(obj, old, new) replaces `old` in the
 * kernel module `obj` (`fat`, `isofs`, ...; plain HVPATCH_FUNC means vmlinux). If the module
 * is loaded, it is patched at once. A patch whose functions are all in modules that are not
 * loaded waits, and is applied when they load (before any of their code runs), withdrawn when
 * they are removed, applied again at the next load (klp's klp_module_coming/going). A patch
 * mixing a module that is not loaded with vmlinux functions or with a loaded module is refused:
 * split it (one patch per module). A module being loaded or removed at that moment is refused.
 * Undefined symbols resolve in the patch's modules first (a name defined in two of them is
 * refused as ambiguous), then in vmlinux; the sympos of HVPATCH_SYMPOS counts within the
 * object the name is found in. `extern int x(void) HVPATCH_OBJ_SYM(fat, fat_helper);` names
 * the object explicitly. Module functions are entered through their ftrace NOP (after ENDBR),
 * like vmlinux functions; the module's text must be within rel32 reach of the arena (it is
 * on x86-64 Linux: modules and the kernel image share the top 2 GiB).
 *
 * There are no kernel headers here: declare the prototypes and types you use by hand, exactly
 * as the target kernel defines them (layouts must match the guest!). A few common ones follow.
 *
 * Rules of thumb:
 *   - the replacement must have the same signature as the old function;
 *   - it is entered by a `jmp` from the old function's ftrace site, with the old arguments;
 *   - the consistency model keeps call chains coherent, not data: do not change data layouts;
 *   - static variables in the patch live in the patch's data pages (zeroed on load).
 */
#ifndef HVPATCH_H
#define HVPATCH_H

/* ---- metadata records (read by the hvpatch linker) ------------------------------------- */

/* Per-function flags (struct hvpatch_func.flags). */
#define HVPATCH_IMMEDIATE 0x1UL /* switch this function without any consistency check */

/* One replaced function. `old_name` is resolved in the guest, `new_func` is in this object. */
struct hvpatch_func {
	const char *old_name;
	void *new_func;
	unsigned long sympos;
	unsigned long flags;
};

/* One replaced function of a named object (a kernel module): `struct hvpatch_func` plus the
 * object's name. A separate section, so objects built before it still read. */
struct hvpatch_func_obj {
	const char *old_name;
	void *new_func;
	unsigned long sympos;
	unsigned long flags;
	const char *object;
};

/* Whole-patch flags (HVPATCH_IMMEDIATE: every function switches at once, no transition). */
#define HVPATCH_PATCH_FLAGS(fl)                                                              \
	static const unsigned long __hvpatch_flags                                            \
		__attribute__((section(".hvpatch.flags"), used, aligned(8))) = (fl)

/* Set by `hvpatch build`, which compiles with frame pointers: stacks through patch code unwind. */
#ifdef __HVPATCH_FRAME_POINTERS
static const char __hvpatch_unwind[]
	__attribute__((section(".hvpatch.unwind"), used, aligned(1))) = "frame-pointer";
#endif

/* `extern int f(void) HVPATCH_OBJ_SYM(fat, fat_helper);` binds `f` to `fat_helper` of module `fat`
 * (the object name `fat:fat_helper`, quoted for the assembler). */
#define HVPATCH_OBJ_SYM(obj, sym) __asm__("\"" #obj ":" #sym "\"")

/* `hvpatch_orig_<name>(args)` runs the guest's original `name`, past its patched entry. */
#define HVPATCH_ORIG(ret, name, args) extern ret hvpatch_orig_##name args __asm__("__hvpatch_orig_" #name)

/* Position of an ambiguous undefined symbol among its duplicates in kallsyms. */
struct hvpatch_sympos {
	const char *name;
	unsigned long sympos;
};

#define __HVPATCH_CAT2(a, b) a##b
#define __HVPATCH_CAT(a, b) __HVPATCH_CAT2(a, b)
#define __HVPATCH_UNIQUE(p) __HVPATCH_CAT(p, __COUNTER__)

/* Patch name (at most one per object). */
#define HVPATCH_NAME(str)                                                                    \
	static const char __hvpatch_name[]                                                    \
		__attribute__((section(".hvpatch.name"), used, aligned(1))) = str

/* Target kernel release (`uname -r` of the guest; at most one per object). */
#define HVPATCH_KERNEL(str)                                                                  \
	static const char __hvpatch_kernel[]                                                  \
		__attribute__((section(".hvpatch.kernel"), used, aligned(1))) = str

/* Replace `old` (a guest symbol name, unquoted) by `new` (a function in this file). */
#define HVPATCH_FUNC_FLAGS_POS(old, pos, new, fl)                                            \
	static const struct hvpatch_func __HVPATCH_UNIQUE(__hvpatch_func_)                    \
		__attribute__((section(".hvpatch.funcs"), used, aligned(8))) = {             \
			.old_name = #old, .new_func = (void *)(new), .sympos = (pos), .flags = (fl) }

/* Replace `old` in kernel module `obj` (both unquoted) by `new`. */
#define HVPATCH_FUNC_OBJ_FLAGS_POS(obj, old, pos, new, fl)                                   \
	static const struct hvpatch_func_obj __HVPATCH_UNIQUE(__hvpatch_func_obj_)            \
		__attribute__((section(".hvpatch.funcs.obj"), used, aligned(8))) = {         \
			.old_name = #old, .new_func = (void *)(new), .sympos = (pos), .flags = (fl), \
			.object = #obj }

#define HVPATCH_FUNC_OBJ(obj, old, new) HVPATCH_FUNC_OBJ_FLAGS_POS(obj, old, 0, new, 0)
#define HVPATCH_FUNC_OBJ_POS(obj, old, pos, new) HVPATCH_FUNC_OBJ_FLAGS_POS(obj, old, pos, new, 0)
#define HVPATCH_FUNC_OBJ_FLAGS(obj, old, new, fl) HVPATCH_FUNC_OBJ_FLAGS_POS(obj, old, 0, new, fl)

#define HVPATCH_FUNC(old, new) HVPATCH_FUNC_FLAGS_POS(old, 0, new, 0)
#define HVPATCH_FUNC_POS(old, pos, new) HVPATCH_FUNC_FLAGS_POS(old, pos, new, 0)
#define HVPATCH_FUNC_FLAGS(old, new, fl) HVPATCH_FUNC_FLAGS_POS(old, 0, new, fl)

/* `sym` (an undefined symbol this file uses) means its `pos`-th occurrence in kallsyms. */
#define HVPATCH_SYMPOS(sym, pos)                                                             \
	static const struct hvpatch_sympos __HVPATCH_UNIQUE(__hvpatch_sympos_)                \
		__attribute__((section(".hvpatch.sympos"), used, aligned(8))) = {            \
			.name = #sym, .sympos = (pos) }

/* ---- small freestanding basics ---------------------------------------------------------- */

#ifndef NULL
#define NULL ((void *)0)
#endif
typedef unsigned long size_t;
typedef long ssize_t;
typedef _Bool bool;
#define true 1
#define false 0
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;

#define __printf(a, b) __attribute__((format(printf, a, b)))
#define noinline __attribute__((noinline))
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))

/* ---- common kernel declarations (opaque types; only pointers are passed around) --------- */

struct seq_file;
struct inode;
struct file;
struct task_struct;

/* Both 6.1 and 6.12. */
extern void seq_printf(struct seq_file *m, const char *fmt, ...) __printf(2, 3);
extern void seq_puts(struct seq_file *m, const char *s);
extern int _printk(const char *fmt, ...) __printf(1, 2);
#define printk(...) _printk(__VA_ARGS__)
#define KERN_INFO "\0016"
#define pr_info(fmt, ...) _printk(KERN_INFO fmt, ##__VA_ARGS__)
extern int sprintf(char *buf, const char *fmt, ...) __printf(2, 3);
extern int snprintf(char *buf, size_t size, const char *fmt, ...) __printf(3, 4);
extern size_t strlen(const char *s);
extern void *memcpy(void *d, const void *s, size_t n);
extern void *memset(void *d, int c, size_t n);

#endif /* HVPATCH_H */
