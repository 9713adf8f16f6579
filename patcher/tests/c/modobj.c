/* A patch with a vmlinux function and two functions of module `fat`; it calls one module
 * function by an explicit `module:name` label. */
#include <hvpatch.h>
HVPATCH_NAME("modobj");
extern int fat_helper(int) HVPATCH_OBJ_SYM(fat, fat_helper);
static int new_show(struct seq_file *m, void *v) { seq_printf(m, "x\n"); return 0; }
static int new_fat_a(int x) { return fat_helper(x) + 1; }
static int new_fat_b(int x) { return x; }
HVPATCH_FUNC(cmdline_proc_show, new_show);
HVPATCH_FUNC_OBJ(fat, fat_a, new_fat_a);
HVPATCH_FUNC_OBJ_POS(fat, fat_b, 2, new_fat_b);
