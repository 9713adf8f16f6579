#include <hvpatch.h>

HVPATCH_KERNEL("6.1.0-56-cloud-amd64");

/* Non-exported kernel function and a duplicated static name. */
extern unsigned long nr_processes(void);
extern int dup_static(int);
HVPATCH_SYMPOS(dup_static, 2);

static unsigned long counter;
static unsigned long table[4] = { 1, 2, 3, 4 };

static int new_show(struct seq_file *m, void *v)
{
	counter++;
	seq_printf(m, "calls=%lu procs=%lu t=%lu d=%d\n", counter, nr_processes(), table[counter & 3],
		   dup_static(1));
	return 0;
}

static int new_other(int x)
{
	int (*volatile fp)(int) = dup_static;
	return fp(x) + 1;
}

HVPATCH_FUNC(cmdline_proc_show, new_show);
HVPATCH_FUNC_FLAGS_POS(other_fn, 1, new_other, HVPATCH_IMMEDIATE);
