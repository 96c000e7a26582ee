/*
 * ember-session PROG [ARG...]: the leader of the command's console session.
 * It runs PROG as its child, waits for it, waits until the console has sent
 * everything the command wrote, and only then exits, with PROG's status
 * (128+N when signal N killed it, as a shell reports it).
 *
 * Why a leader that outlives the command: when a session leader exits, Linux
 * hangs up its controlling terminal unless that is a pty
 * (drivers/tty/tty_jobctrl.c: disassociate_ctty -> tty_vhangup_session), and
 * a hangup throws away the driver's transmit buffer (drivers/tty/tty_ldisc.c:
 * tty_ldisc_hangup -> tty_driver_flush_buffer). On the 8250 that buffer holds
 * up to 4 KiB that write(2) has accepted but the UART has not sent yet. When
 * the command was the leader itself (cttyhack execs it), a command that
 * printed a lot right before it ended lost its last lines: 4 boots in 25 lost
 * 1-4 KiB of a 45 KiB `dmesg` in the Linux lane, with `--output console`, as
 * on a terminal. tcdrain (ioctl TCSBRK with a non-zero argument, tty_ioctl(4))
 * from the still-living leader waits for those bytes instead.
 *
 * The keyboard's signals (Ctrl-C, Ctrl-\, Ctrl-Z) reach the whole foreground
 * process group, this helper included. It blocks them, and SIGTTOU so that its
 * tcdrain is allowed when the command left another group in the foreground
 * (tty_check_change ignores a blocked SIGTTOU); the child gets the original
 * mask back before exec, so the command is interrupted as before.
 *
 * PROG without a '/' is looked up in PATH like execvp(3): 127 when it is not
 * found, 126 when it is found but cannot be run, with a message on stderr.
 *
 * Freestanding like ember-exit.c: no libc, a few KiB, one exec.
 */

#include "freestanding.h"

#define SYS_rt_sigprocmask 14
#define SYS_fork 57
#define SYS_execve 59
#define SYS_wait4 61

#define SIG_BLOCK 0
#define SIG_SETMASK 2
#define SIGHUP 1
#define SIGINT 2
#define SIGQUIT 3
#define SIGTERM 15
#define SIGTSTP 20
#define SIGTTOU 22
#define EINTR 4
#define ENOENT 2
#define ENOTDIR 20
#define EACCES 13
#define TCSBRK 0x5409
#define O_RDWR_NOCTTY_NONBLOCK (02 | 0400 | 04000)

static unsigned long len(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void say(const char *a, const char *b, const char *c)
{
	syscall3(SYS_write, 2, (long)a, (long)len(a));
	syscall3(SYS_write, 2, (long)b, (long)len(b));
	syscall3(SYS_write, 2, (long)c, (long)len(c));
}

static __attribute__((noreturn)) void leave(long status)
{
	syscall3(SYS_exit, status, 0, 0);
	__builtin_unreachable();
}

/* "NAME=" in envp, or 0. */
static const char *env(char **envp, const char *name)
{
	unsigned long n = len(name);

	for (; *envp; envp++) {
		const char *e = *envp;
		unsigned long i = 0;

		while (i < n && e[i] == name[i])
			i++;
		if (i == n && e[n] == '=')
			return e + n + 1;
	}
	return 0;
}

/* execvp(3) without libc: returns only on failure, with its exit status. */
static long run(char **argv, char **envp)
{
	static char path[4096];
	const char *prog = argv[0];
	const char *dirs;
	unsigned long n = len(prog);
	long err = -ENOENT;
	int denied = 0;

	for (const char *p = prog; *p; p++) {
		if (*p == '/') {
			err = syscall3(SYS_execve, (long)prog, (long)argv, (long)envp);
			goto failed;
		}
	}
	dirs = env(envp, "PATH");
	if (!dirs)
		dirs = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	while (n) {
		const char *end = dirs;
		unsigned long d, i = 0;

		while (*end && *end != ':')
			end++;
		d = (unsigned long)(end - dirs);
		if (d + 1 + n + 1 <= sizeof(path)) {
			/* An empty entry is the current directory. */
			for (; i < d; i++)
				path[i] = dirs[i];
			if (d)
				path[i++] = '/';
			for (unsigned long j = 0; j <= n; j++)
				path[i + j] = prog[j];
			err = syscall3(SYS_execve, (long)path, (long)argv, (long)envp);
			if (err == -EACCES)
				denied = 1;
			else if (err != -ENOENT && err != -ENOTDIR)
				goto failed;
		}
		if (!*end)
			break;
		dirs = end + 1;
	}
	if (denied)
		err = -EACCES;
failed:
	if (err == -ENOENT) {
		say("ember: ", prog, ": command not found\n");
		return 127;
	}
	say("ember: ", prog, err == -EACCES ? ": permission denied\n" : ": cannot be executed\n");
	return 126;
}

__attribute__((used)) static void start_c(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	unsigned long blocked = 1UL << (SIGHUP - 1) | 1UL << (SIGINT - 1) | 1UL << (SIGQUIT - 1) |
				1UL << (SIGTERM - 1) | 1UL << (SIGTSTP - 1) | 1UL << (SIGTTOU - 1);
	unsigned long old = 0;
	long pid, tty;
	int status = 0;

	if (argc < 2) {
		say("usage: ember-session PROG [ARG...]", "", "\n");
		leave(2);
	}
	syscall5(SYS_rt_sigprocmask, SIG_BLOCK, (long)&blocked, (long)&old, 8, 0);
	pid = syscall3(SYS_fork, 0, 0, 0);
	if (pid == 0) {
		syscall5(SYS_rt_sigprocmask, SIG_SETMASK, (long)&old, 0, 8, 0);
		leave(run(argv + 1, envp));
	}
	if (pid < 0) {
		say("ember-session: fork failed", "", "\n");
		leave(126);
	}
	while (syscall5(SYS_wait4, pid, (long)&status, 0, 0, 0) == -EINTR)
		;
	/* The controlling terminal, whichever it is (cttyhack chose it). */
	tty = syscall3(SYS_open, (long)"/dev/tty", O_RDWR_NOCTTY_NONBLOCK, 0);
	if (tty >= 0)
		syscall3(SYS_ioctl, tty, TCSBRK, 1);
	/* wait(2) status: exit code in bits 8-15, or the killing signal in bits 0-6. */
	if ((status & 0x7f) == 0)
		leave((status >> 8) & 0xff);
	leave(128 + (status & 0x7f));
}
