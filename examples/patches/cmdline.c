/* The kernel's own livepatch sample (samples/livepatch/livepatch-sample.c), as an hvpatch patch:
 * replace cmdline_proc_show() so that `cat /proc/cmdline` says it was patched.
 *
 *   hvpatch build examples/patches/cmdline.c -o cmdline.o
 *   hvpatch --api-socket /tmp/hvpatch.sock patch load cmdline.o
 */
#include <hvpatch.h>

HVPATCH_NAME("livepatch-sample");

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}

HVPATCH_FUNC(cmdline_proc_show, livepatch_cmdline_proc_show);
