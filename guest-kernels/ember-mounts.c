/*
 * ember-mounts: the first thing ember-init does, in one process: mount the
 * pseudo file systems a Linux user space expects and set the host name.
 *
 *   /proc     proc      nosuid,nodev,noexec
 *   /sys      sysfs     nosuid,nodev,noexec
 *   /dev      devtmpfs  nosuid,mode=0755
 *   /dev/pts  devpts    nosuid,noexec,gid=5,mode=0620,ptmxmode=0666
 *   /dev/shm  tmpfs     nosuid,nodev,mode=1777
 *   /tmp      tmpfs     nosuid,nodev,mode=1777
 *   /run      tmpfs     nosuid,nodev,mode=0755
 *   host name ember
 *
 * Each directory is created if missing and mounted unless something already
 * is on it (on a disk root the kernel has put devtmpfs on /dev itself:
 * CONFIG_DEVTMPFS_MOUNT; on the initramfs root it has not). "Something is
 * on it" is what mountpoint(1) tests: the directory and its parent are on
 * different devices.
 *
 * Why a program and not the shell: the init used to do this with busybox
 * `grep` and `mount`, 17 fork+execs. Under the nested lane's emulation each
 * costs 12-16 ms in the guest, so that alone was 0.2-0.4 s of every boot;
 * this is one exec. Freestanding like ember-exit.c (no libc):
 *   gcc -Os -static -nostdlib -ffreestanding -fno-pie -no-pie \
 *       -fno-stack-protector -o ember-mounts ember-mounts.c
 *
 * Exit status: 0, or 1 after a message on stderr for each mount that failed
 * (the others are still done; the init carries on as it did with mount(8)).
 */

#include "freestanding.h"

/* include/uapi/linux/mount.h */
#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8
#define EEXIST 17

struct pseudo_fs {
	const char *dir, *parent, *type;
	unsigned long flags;
	const char *data;
};

static const struct pseudo_fs table[] = {
	{ "/proc", "/", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0 },
	{ "/sys", "/", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0 },
	{ "/dev", "/", "devtmpfs", MS_NOSUID, "mode=0755" },
	{ "/dev/pts", "/dev", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666" },
	{ "/dev/shm", "/dev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" },
	{ "/tmp", "/", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" },
	{ "/run", "/", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755" },
};

static unsigned long len(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void say(const char *s)
{
	syscall3(SYS_write, 2, (long)s, (long)len(s));
}

/* st_dev of PATH, or -1: the first field of x86_64's struct stat
 * (arch/x86/include/uapi/asm/stat.h, 144 bytes). */
static long device_of(const char *path)
{
	unsigned long st[18];

	if (syscall3(SYS_stat, (long)path, (long)st, 0) != 0)
		return -1;
	return (long)st[0];
}

__attribute__((used)) static void start_c(long *sp)
{
	static const char hostname[] = "ember";
	long status = 0;
	unsigned long i;

	(void)sp;
	for (i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
		const struct pseudo_fs *fs = &table[i];
		long r = syscall3(SYS_mkdir, (long)fs->dir, 0755, 0);
		long dev;

		if (r != 0 && r != -EEXIST) {
			say("ember-mounts: cannot create ");
			say(fs->dir);
			say("\n");
			status = 1;
			continue;
		}
		dev = device_of(fs->dir);
		if (dev != -1 && dev != device_of(fs->parent))
			continue; /* already a mount point */
		if (syscall5(SYS_mount, (long)fs->type, (long)fs->dir, (long)fs->type, (long)fs->flags,
			     (long)fs->data) != 0) {
			say("ember-mounts: cannot mount ");
			say(fs->type);
			say(" on ");
			say(fs->dir);
			say("\n");
			status = 1;
		}
	}
	if (syscall3(SYS_sethostname, (long)hostname, sizeof(hostname) - 1, 0) != 0) {
		say("ember-mounts: cannot set the host name\n");
		status = 1;
	}
	syscall3(SYS_exit, status, 0, 0);
}
