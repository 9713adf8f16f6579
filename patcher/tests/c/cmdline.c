#include <hvpatch.h>

HVPATCH_NAME("cmdline-fix");

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

HVPATCH_FUNC(cmdline_proc_show, livepatch_cmdline_proc_show);
