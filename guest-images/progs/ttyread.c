/* ttyread: park this task in a tty read forever, on the slave side of a fresh pseudo-terminal
 * nobody writes to. In the guest kernel the task sleeps in n_tty_read (via tty_read). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(void)
{
	char buf[64];
	int master = posix_openpt(O_RDWR | O_NOCTTY);

	if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0) {
		perror("ttyread: posix_openpt");
		return 1;
	}
	int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
	if (slave < 0) {
		perror("ttyread: open slave");
		return 1;
	}
	printf("ttyread: pid %d reading %s\n", (int)getpid(), ptsname(master));
	fflush(stdout);
	for (;;) {
		if (read(slave, buf, sizeof(buf)) < 0)
			perror("ttyread: read");
	}
}
