#!/usr/bin/env bash
# rootfs.sh: build an ext4 root file system image for ember's default guest,
# for `ember run --root-disk IMAGE` (a virtio-blk disk, root=/dev/vda).
#
# The tree is the initramfs's (initramfs.sh beside this script: busybox,
# ember-init, ember-exit, /etc), unpacked, with ember-init also installed as
# /sbin/init (the kernel runs /sbin/init from a disk root; the initramfs's
# /sbin/init is busybox's). `mkfs.ext4 -d` writes it into a sparse image of
# ${EMBER_ROOTFS_SIZE:-64M}; no loop mount, no root needed.
#
# On a disk root the kernel mounts devtmpfs on /dev itself
# (CONFIG_DEVTMPFS_MOUNT), so /dev/console exists before init runs. The root
# is mounted rw or ro as the command line says (ember adds `root=/dev/vda rw`,
# or `ro` for `--root-disk PATH,ro`); the init never remounts it.
#
# Cache: ${XDG_CACHE_HOME:-~/.cache}/ember/rootfs-<hash>/rootfs.ext4, where
# <hash> covers the initramfs (whose own cache key covers busybox, init,
# ember-exit.c), the e2fsprogs version, the image size and this script. Built
# in a temporary directory and renamed into place. The cached image is the
# pristine copy: users should boot a copy of it (it is written to when
# mounted rw).
#
# On success, prints one line on stdout (everything else goes to stderr):
#   EMBER_ROOTFS=/abs/path/rootfs.ext4

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
size=${EMBER_ROOTFS_SIZE:-64M}

case "${1:-}" in
-h | --help)
	echo "usage: $(basename "$0")   builds (or reuses) the ext4 root image; prints EMBER_ROOTFS=<path>"
	exit 0
	;;
"") ;;
*) echo "usage: $(basename "$0") [--help]" >&2; exit 2 ;;
esac

stage() { printf 'ember: rootfs: %s\n' "$*" >&2; }
die() { printf 'ember: rootfs: error: %s\n' "$*" >&2; exit 1; }

# ensure_packages: install what is missing (lib.sh).
. "$here/lib.sh"
ensure_packages e2fsprogs cpio

initramfs=$(bash "$here/initramfs.sh" | sed -n 's/^EMBER_INITRAMFS=//p')
[ -f "$initramfs" ] || die "initramfs.sh printed no EMBER_INITRAMFS line"

e2fs_version=$(mkfs.ext4 -V 2>&1 | sed -n 1p)
key=$(
	{
		echo "$initramfs"
		sha256sum <"$initramfs"
		echo "$e2fs_version $size"
		cat "$self"
	} | sha256sum | cut -c1-16
)
lock_cache_entry rootfs "$key"
out="$cache_root/rootfs-$key"
image="$out/rootfs.ext4"

if [ -f "$image" ]; then
	stage "cached: $out"
	echo "EMBER_ROOTFS=$image"
	exit 0
fi

tmp=$(mktemp -d "$cache_root/.rootfs-$key.XXXXXX")
chmod 0755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"

# The initramfs is two concatenated newc archives (initramfs.sh): a tiny
# hand-written one with /dev/console, then cpio's archive of the tree. GNU
# cpio stops at the first trailer, so skip to the second archive: the first
# "070701" magic after the first "TRAILER!!!".
gzip -dc "$initramfs" >"$tmp/initramfs.cpio"
# Each awk reads its whole input: a reader that quits early (head, awk's exit) makes the writer die
# of SIGPIPE, which pipefail turns into this script's failure (exit 141, seen in CI; also above).
trailer=$(grep -obUaF 'TRAILER!!!' "$tmp/initramfs.cpio" | awk -F: 'NR == 1 { print $1 }')
[ -n "$trailer" ] || die "no cpio trailer in $initramfs"
start=$(grep -obUaF '070701' "$tmp/initramfs.cpio" | cut -d: -f1 | awk -v t="$trailer" '$1 > t && !n++ { print }')
[ -n "$start" ] || die "no second archive in $initramfs"
tail -c +"$((start + 1))" "$tmp/initramfs.cpio" | (cd "$root" && cpio --quiet -id --no-absolute-filenames)
rm "$tmp/initramfs.cpio"
[ -x "$root/init" ] && [ -x "$root/bin/busybox" ] || die "the initramfs tree lacks /init or /bin/busybox"

rm -f "$root/sbin/init"
install -m 0755 "$root/init" "$root/sbin/init"

stage "building a $size ext4 image from $initramfs"
truncate -s "$size" "$tmp/rootfs.ext4"
mkfs.ext4 -q -F -L ember-root -E root_owner=0:0 -d "$root" "$tmp/rootfs.ext4" >&2
rm -rf "$root"
mv "$tmp" "$out"
trap - EXIT
stage "built $image"
echo "EMBER_ROOTFS=$image"
