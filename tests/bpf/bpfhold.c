/* Loads a trivial BPF socket filter named "hvpatch_test" and holds it. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(void)
{
	uint64_t insns[2] = {
		0x00000000000000b7ull, /* r0 = 0 */
		0x0000000000000095ull, /* exit */
	};
	static const char license[] = "GPL";
	unsigned char attr[128];
	memset(attr, 0, sizeof(attr));
	uint32_t type = 1, cnt = 2; /* BPF_PROG_TYPE_SOCKET_FILTER */
	uint64_t pi = (uint64_t)(uintptr_t)insns, pl = (uint64_t)(uintptr_t)license;
	memcpy(attr + 0, &type, 4);
	memcpy(attr + 4, &cnt, 4);
	memcpy(attr + 8, &pi, 8);
	memcpy(attr + 16, &pl, 8);
	memcpy(attr + 48, "hvpatch_test", 12);
	long fd = syscall(321 /* __NR_bpf */, 5 /* BPF_PROG_LOAD */, attr, sizeof(attr));
	if (fd < 0) {
		perror("bpf(BPF_PROG_LOAD)");
		return 1;
	}
	printf("bpf prog fd %ld\n", fd);
	fflush(stdout);
	for (;;)
		pause();
}
