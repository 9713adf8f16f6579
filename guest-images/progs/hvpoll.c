/* hvpoll: park this task in poll() forever, on a pipe nobody writes.
 * In the guest kernel the task sleeps in do_sys_poll (via __x64_sys_poll). */
#include <poll.h>
#include <stdio.h>
#include <unistd.h>

int main(void)
{
	int fds[2];
	struct pollfd p;

	if (pipe(fds) != 0) {
		perror("hvpoll: pipe");
		return 1;
	}
	p.fd = fds[0];
	p.events = POLLIN;
	/* The write end stays open, so the read end never sees data or POLLHUP. */
	printf("hvpoll: pid %d polling\n", (int)getpid());
	fflush(stdout);
	for (;;) {
		p.revents = 0;
		if (poll(&p, 1, -1) < 0)
			perror("hvpoll: poll");
	}
}
