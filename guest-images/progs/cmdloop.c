/* cmdloop N [DELAY_MS]: read /proc/cmdline N times (N = 0: forever) and print each result as
 * "cmdloop <i>: <contents>". Between reads it sleeps DELAY_MS milliseconds (default: 0 when N
 * is given, 200 when looping forever, so the serial console is not flooded). Exercises
 * cmdline_proc_show, a convenient target for live-patch tests. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 0) : 1;
	long delay_ms = argc > 2 ? strtol(argv[2], NULL, 0) : (n == 0 ? 200 : 0);
	char buf[4096];
	unsigned long i;

	for (i = 1; n == 0 || i <= n; i++) {
		int fd = open("/proc/cmdline", O_RDONLY);
		ssize_t len;

		if (fd < 0) {
			perror("cmdloop: open /proc/cmdline");
			return 1;
		}
		len = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (len < 0) {
			perror("cmdloop: read");
			return 1;
		}
		buf[len] = '\0';
		if (len > 0 && buf[len - 1] == '\n')
			buf[len - 1] = '\0';
		printf("cmdloop %lu: %s\n", i, buf);
		fflush(stdout);
		if (delay_ms > 0) {
			struct timespec ts = { delay_ms / 1000, (delay_ms % 1000) * 1000000L };
			nanosleep(&ts, NULL);
		}
	}
	return 0;
}
