/* pipewait: a parent/child pair parked in two more places: the child blocks in read() on a
 * pipe nobody writes (pipe_read), the parent in waitpid() for the child (do_wait). */
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
	int fds[2];
	pid_t child;
	char c;

	if (pipe(fds) != 0) {
		perror("pipewait: pipe");
		return 1;
	}
	child = fork();
	if (child < 0) {
		perror("pipewait: fork");
		return 1;
	}
	if (child == 0) {
		/* The parent keeps the write end open and never writes: read() blocks forever. */
		for (;;)
			if (read(fds[0], &c, 1) <= 0)
				perror("pipewait: read");
	}
	printf("pipewait: parent %d waiting for child %d reading a pipe\n", (int)getpid(), (int)child);
	fflush(stdout);
	for (;;)
		if (waitpid(child, NULL, 0) == child)
			return 0;
}
