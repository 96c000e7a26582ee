#!/usr/bin/env bash
# initramfs.sh: build the root file system of ember's default guest.
#
# A gzip-compressed newc cpio archive (the format of the kernel's
# Documentation/driver-api/early-userspace/buffer-format.rst) holding:
#   /bin/busybox       Debian's busybox-static, with a symlink per applet
#   /init              ember-init (the `init` script beside this file)
#   /sbin/ember-exit   the exit-port helper, compiled from ember-exit.c
#   /sbin/ember-getpid a getpid(2) loop, the syscall-cost workload of `ember bench`
#   /sbin/ember-mounts the init's pseudo file system mounts in one exec
#   /sbin/ember-session the command's session leader: drains the console before the session ends
#   /sbin/ember-exec   enters a container image's root as its user (ember run IMAGE)
#   /etc/...           passwd, group, profile: enough for a root shell
#   /dev/console       a char device node 5:1, so the kernel can open the
#                      console for PID 1 (it runs before devtmpfs is mounted)
#
# The result is cached in ${XDG_CACHE_HOME:-~/.cache}/ember/initramfs-<hash>/
# where <hash> covers every input: the busybox-static package version, gcc's
# version, init, ember-exit.c, ember-getpid.c, ember-mounts.c, ember-session.c, ember-exec.c and this script. A cached build is reused
# as is; a new one is made in a temporary directory and renamed into place,
# so an interrupted build leaves no half-made cache entry.
#
# On success, prints one line on stdout (everything else goes to stderr):
#   EMBER_INITRAMFS=/abs/path/initramfs.cpio.gz
#
# Sibling files are found relative to this script, so the directory can be
# copied anywhere (ember writes it to a temporary directory and runs it).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"

usage() {
	cat <<EOF
usage: $(basename "$0") [--help]

Builds (or reuses from the cache) the initramfs of ember's default guest and
prints EMBER_INITRAMFS=<path> on stdout.

Inputs: $here/init, $here/ember-{exit,getpid,mounts,exec}.c, /bin/busybox from busybox-static
(installed with apt-get when missing). Cache: \${XDG_CACHE_HOME:-~/.cache}/ember.
EOF
}

case "${1:-}" in
-h | --help) usage; exit 0 ;;
"") ;;
*) usage >&2; exit 2 ;;
esac

stage() { printf 'ember: initramfs: %s\n' "$*" >&2; }
die() { printf 'ember: initramfs: error: %s\n' "$*" >&2; exit 1; }

# ensure_packages: install what is missing (lib.sh).
. "$here/lib.sh"

ensure_packages busybox-static gcc libc6-dev cpio gzip
[ -x /bin/busybox ] || die "/bin/busybox missing although busybox-static is installed"

busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
key=$(
	{
		echo "busybox-static $busybox_version"
		gcc -dumpfullversion
		cat "$here/init" "$here/freestanding.h" "$here/ember-exit.c" "$here/ember-getpid.c" "$here/ember-mounts.c" "$here/ember-session.c" "$here/ember-exec.c" "$self"
	} | sha256sum | cut -c1-16
)
# One builder per key at a time; a second one waits and then finds the cache.
lock_cache_entry initramfs "$key"
out="$cache_root/initramfs-$key"
image="$out/initramfs.cpio.gz"

if [ -f "$image" ]; then
	stage "cached: $out"
	echo "EMBER_INITRAMFS=$image"
	exit 0
fi

tmp=$(mktemp -d "$cache_root/.initramfs-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# bash skips the EXIT trap when a signal kills it: turn signals into exit.
trap 'exit 130' INT TERM HUP
root="$tmp/root"
mkdir -p "$root"

stage "building with busybox-static $busybox_version"

# busybox and its applets. --list-full names each applet with its usual
# directory (bin/sh, sbin/reboot, usr/bin/awk, ...).
mkdir -p "$root/bin"
cp /bin/busybox "$root/bin/busybox"
/bin/busybox --list-full | while IFS= read -r applet; do
	[ "$applet" = bin/busybox ] && continue
	mkdir -p "$root/$(dirname "$applet")"
	ln -sf /bin/busybox "$root/$applet"
done

mkdir -p "$root/sbin"
for prog in ember-exit ember-getpid ember-mounts ember-session; do
	gcc -Os -static -nostdlib -ffreestanding -fno-pie -no-pie -fno-stack-protector \
		-fno-asynchronous-unwind-tables -Wall -Wextra -Werror -Wl,--build-id=none -s \
		-o "$root/sbin/$prog" "$here/$prog.c"
done

# ember-exec uses libc (stdio, the passwd parsing), linked statically: it runs
# inside images that may have no libc of their own.
gcc -Os -static -Wall -Wextra -Werror -s -o "$root/sbin/ember-exec" "$here/ember-exec.c"

install -m 0755 "$here/init" "$root/init"

# Mount points (init mounts onto them) and the usual skeleton.
for d in dev proc sys tmp run root etc mnt newroot; do mkdir -p "$root/$d"; done
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
echo ember >"$root/etc/hostname"
cat >"$root/etc/profile" <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
PS1='\u@\h:\w\$ '
EOF

# A fixed date and sorted names make the archive depend only on its inputs.
find "$root" -exec touch -h -d @0 {} +

# newc header of one file without data (c_filesize 0), then its NUL-ended name
# padded so that header + name is a multiple of 4 bytes (buffer-format.rst).
newc_entry() { # name mode(octal) nlink rdevmajor rdevminor
	local name=$1 namesize=$((${#1} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		0 "$((8#$2))" 0 0 "$3" 0 0 0 0 "$4" "$5" "$namesize" 0
	printf '%s\0' "$name"
	local pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# The kernel opens /dev/console for PID 1 before anything mounts devtmpfs,
# and creating the node with mknod would need root here: so it is written
# as a first, tiny archive by hand. The kernel unpacks concatenated archives
# in order, and cpio's own archive of the tree follows.
{
	newc_entry dev 040755 2 0 0
	newc_entry dev/console 020600 1 5 1
	newc_entry 'TRAILER!!!' 0 1 0 0
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc --owner=0:0 --reproducible)
} | gzip -9 -n >"$tmp/initramfs.cpio.gz"

rm -rf "$root"
rm -rf "$out" # an incomplete leftover; we hold the lock
chmod 0755 "$tmp" # mktemp made it private; the result is not secret
mv "$tmp" "$out"
trap - EXIT INT TERM HUP
stage "built $(du -h "$image" | cut -f1) in $out"
echo "EMBER_INITRAMFS=$image"
