/* hammer CPU MODE [PATH]: hammer one kernel path from one CPU, forever, and tally what it sees.
 *
 *   hammer 1 read /proc/version   open + read + close PATH in a loop, pinned to CPU 1
 *   hammer 0 getpid               syscall(SYS_getpid) in a loop, pinned to CPU 0
 *   hammer 0 nanosleep            nanosleep(1 ms) in a loop: asleep in the kernel nearly always,
 *                                 back in user space every millisecond
 *
 * It prints nothing while it runs (the serial console stays quiet). SIGUSR1 prints a report,
 * SIGTERM prints it and exits 0: "hammer <pid> cpu <c>: <n> calls, <k> distinct, <e> errors",
 * then one line "  <count> <result>" per distinct result (file contents up to the first newline,
 * or the syscall's return value), at most 16 of them. A failed call counts as an error and is
 * reported too. Live-patch tests use it to see old and new behaviour under load. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_DISTINCT 16
#define MAX_LEN 120

static struct {
	char text[MAX_LEN + 1];
	unsigned long count;
} seen[MAX_DISTINCT];
static int nseen;
static unsigned long calls, errors, other;
static int cpu;
static volatile sig_atomic_t want_report, want_exit;

static void on_usr1(int s) { (void)s; want_report = 1; }
static void on_term(int s) { (void)s; want_report = 1; want_exit = 1; }

static void tally(const char *t, size_t len)
{
	int i;

	if (len > MAX_LEN)
		len = MAX_LEN;
	for (i = 0; i < nseen; i++) {
		if (strlen(seen[i].text) == len && memcmp(seen[i].text, t, len) == 0) {
			seen[i].count++;
			return;
		}
	}
	if (nseen == MAX_DISTINCT) {
		other++;
		return;
	}
	memcpy(seen[nseen].text, t, len);
	seen[nseen].text[len] = '\0';
	seen[nseen].count = 1;
	nseen++;
}

static void report(void)
{
	int i;

	printf("hammer %d cpu %d: %lu calls, %d distinct, %lu errors, %lu other\n", (int)getpid(), cpu,
	       calls, nseen, errors, other);
	for (i = 0; i < nseen; i++)
		printf("  %lu %s\n", seen[i].count, seen[i].text);
	printf("hammer %d end\n", (int)getpid());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 2 ? argv[2] : "";
	const char *path = argc > 3 ? argv[3] : NULL;
	int is_read = strcmp(mode, "read") == 0;
	int is_sleep = strcmp(mode, "nanosleep") == 0;
	cpu_set_t set;
	char buf[4096];

	if (argc < 3 || (is_read && !path) ||
	    (!is_read && !is_sleep && strcmp(mode, "getpid") != 0)) {
		fprintf(stderr, "usage: hammer CPU read PATH | hammer CPU getpid | hammer CPU nanosleep\n");
		return 2;
	}
	cpu = atoi(argv[1]);
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0) {
		perror("hammer: sched_setaffinity");
		return 1;
	}
	signal(SIGUSR1, on_usr1);
	signal(SIGTERM, on_term);
	for (;;) {
		if (want_report) {
			want_report = 0;
			report();
			if (want_exit)
				return 0;
		}
		calls++;
		if (is_read) {
			int fd = open(path, O_RDONLY);
			ssize_t len;
			char *nl;

			if (fd < 0) {
				errors++;
				continue;
			}
			len = read(fd, buf, sizeof(buf) - 1);
			close(fd);
			if (len < 0) {
				errors++;
				continue;
			}
			buf[len] = '\0';
			nl = strchr(buf, '\n');
			tally(buf, nl ? (size_t)(nl - buf) : (size_t)len);
		} else if (is_sleep) {
			struct timespec ts = { 0, 1000000 };
			char t[32];
			int r = nanosleep(&ts, NULL);

			snprintf(t, sizeof(t), "%d", r == 0 ? 0 : errno);
			tally(t, strlen(t));
		} else {
			char t[32];
			long r = syscall(SYS_getpid);

			snprintf(t, sizeof(t), "%ld", r == getpid() ? 0L : r);
			tally(t, strlen(t));
		}
	}
}
