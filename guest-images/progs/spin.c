/* spin: busy loop in user mode forever, keeping a vCPU in ring 3. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
	volatile unsigned long counter = 0;

	printf("spin: pid %d spinning\n", (int)getpid());
	fflush(stdout);
	for (;;)
		counter++;
}
