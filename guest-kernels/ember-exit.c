/*
 * ember-exit STATUS: end the VM with exit code STATUS (0-255).
 *
 * ember's exit device is a 1-byte I/O port at 0x501: a write of byte B stops
 * the VM and ember exits with code B. QEMU's `isa-debug-exit,iobase=0x501`
 * is the same port, except that QEMU exits with (B << 1) | 1.
 *
 * This helper exists because a shell cannot execute OUT. The usual way,
 * `dd of=/dev/port`, needs CONFIG_DEVPORT, which on x86_64 depends on
 * CONFIG_PCI (drivers/char/Kconfig), and ember's microVM has no PCI. So we
 * ask for the one port with ioperm(2) (needs CONFIG_X86_IOPL_IOPERM and
 * CAP_SYS_RAWIO, i.e. root) and write it ourselves.
 *
 * Freestanding on purpose: no libc, so it builds with any gcc into a 9 KiB
 * static binary and cannot depend on the guest's libraries.
 *   gcc -Os -static -nostdlib -ffreestanding -fno-pie -no-pie \
 *       -fno-stack-protector -o ember-exit ember-exit.c
 *
 * Returns only on failure (exit code 1 after a message on stderr); the init
 * then falls back to `reboot -f`.
 */

#define EMBER_EXIT_PORT 0x501
/* ioctl TCSBRK with a non-zero argument is tcdrain(3) (tty_ioctl(4)). */
#define TCSBRK 0x5409
#define O_RDWR_NOCTTY_NONBLOCK (02 | 0400 | 04000)

#include "freestanding.h"

static void die(const char *msg, unsigned long len)
{
	syscall3(SYS_write, 2, (long)msg, (long)len);
	syscall3(SYS_exit, 1, 0, 0);
	__builtin_unreachable();
}

#define DIE(s) die(s, sizeof(s) - 1)

__attribute__((used)) static void start_c(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long status = 0;
	const char *p;

	if (argc != 2 || !argv[1][0])
		DIE("usage: ember-exit STATUS (0-255)\n");
	for (p = argv[1]; *p; p++) {
		if (*p < '0' || *p > '9' || status > 255)
			DIE("ember-exit: STATUS must be a number from 0 to 255\n");
		status = status * 10 + (unsigned long)(*p - '0');
	}
	if (status > 255)
		DIE("ember-exit: STATUS must be a number from 0 to 255\n");

	/* Disks must be clean before the VMM goes away under them (the init
	 * used to run sync(1) first: one exec less). */
	syscall3(SYS_sync, 0, 0, 0);

	/*
	 * The console's output is sent by the 8250 driver from its transmit
	 * interrupt, after write(2) has returned: what a command printed last
	 * may still be in the driver's buffer. Wait until it has left the UART
	 * (tcdrain), or stopping the VM would cut it off.
	 */
	long con = syscall3(SYS_open, (long)"/dev/console", O_RDWR_NOCTTY_NONBLOCK, 0);
	if (con >= 0)
		syscall3(SYS_ioctl, con, TCSBRK, 1);

	if (syscall3(SYS_ioperm, EMBER_EXIT_PORT, 1, 1) != 0)
		DIE("ember-exit: ioperm(0x501) failed (not root, or kernel without CONFIG_X86_IOPL_IOPERM)\n");

	__asm__ volatile("outb %b0, %w1" : : "a"((unsigned char)status), "Nd"(EMBER_EXIT_PORT));

	/* The VMM stopped us in the OUT above; reaching here means no exit device. */
	DIE("ember-exit: port 0x501 did not stop the VM (no exit device?)\n");
}
