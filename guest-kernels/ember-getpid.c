/*
 * ember-getpid N: make N getpid(2) system calls, then exit 0.
 *
 * The "syscall cost" workload of `ember bench`: the cheapest system call
 * there is, in a loop, so the time it takes is the price of one round trip
 * user -> kernel -> user. In a VM with hardware virtualization that price
 * is the same as on the host (no VM exit); with software virtualization
 * (kvm_pvm, or the nested lane's TCG) it is not, and the ratio shows it.
 *
 * Freestanding like ember-exit.c: no libc, so the same ~1 KiB static binary
 * runs on the host, in an OCI container's busybox root file system and in
 * the guest's initramfs, built with the same command:
 *   gcc -Os -static -nostdlib -ffreestanding -fno-pie -no-pie \
 *       -fno-stack-protector -o ember-getpid ember-getpid.c
 */

#include "freestanding.h"

__attribute__((used)) static void start_c(long *sp)
{
	static const char usage[] = "usage: ember-getpid N (number of getpid calls)\n";
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long n = 0;
	const char *p;

	if (argc != 2 || !argv[1][0]) {
		syscall3(SYS_write, 2, (long)usage, sizeof(usage) - 1);
		syscall3(SYS_exit, 2, 0, 0);
	}
	for (p = argv[1]; *p >= '0' && *p <= '9'; p++)
		n = n * 10 + (unsigned long)(*p - '0');
	while (n--)
		syscall3(SYS_getpid, 0, 0, 0);
	syscall3(SYS_exit, 0, 0, 0);
	__builtin_unreachable();
}
