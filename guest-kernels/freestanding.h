/*
 * freestanding.h: what ember's tiny guest helpers (ember-exit.c,
 * ember-getpid.c, ember-mounts.c) share: a raw x86_64 Linux system call and the ELF entry
 * point, so they need no libc and build into ~1 KiB static binaries.
 * A program includes this and defines `static void start_c(long *sp)`.
 */
#ifndef EMBER_FREESTANDING_H
#define EMBER_FREESTANDING_H

/* x86_64 Linux system call numbers (arch/x86/entry/syscalls/syscall_64.tbl). */
#define SYS_write 1
#define SYS_open 2
#define SYS_stat 4
#define SYS_ioctl 16
#define SYS_getpid 39
#define SYS_exit 60
#define SYS_mkdir 83
#define SYS_sync 162
#define SYS_mount 165
#define SYS_sethostname 170
#define SYS_ioperm 173

static long syscall3(long nr, long a, long b, long c)
{
	long ret;

	/* The syscall instruction clobbers rcx (return rip) and r11 (rflags). */
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

/* Five arguments: the fourth and fifth go in r10 and r8 (not rcx, which the
 * syscall instruction overwrites). */
__attribute__((unused)) static long syscall5(long nr, long a, long b, long c, long d, long e)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

/* Called from _start with the initial stack: argc, argv[0], argv[1], ... */
static void start_c(long *sp);

/* The ELF entry point: pass the initial stack pointer to start_c, with the
 * stack aligned to 16 bytes as the SysV ABI requires at a call. */
__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	hlt\n");

#endif
