#!/usr/bin/env bash
# tools.sh: build an ext4 image holding fio and iperf3 for ember's default
# guest, whose own user space is busybox only. The benchmarks mount it as a
# second, read-only disk:
#
#   ember run --disk data.img --disk tools.ext4,ro -- \
#       sh -c 'mount -o ro /dev/vdb /mnt && /mnt/bin/fio --version'
#
# (disks become /dev/vda, /dev/vdb, ... in the order given; the guest kernel
# has ext4, virtio-blk and AIO built in, no io_uring).
#
# Debian's fio and iperf3 are dynamically linked and the guest has no libc,
# so the image carries them with every shared library they load. Layout:
#
#   /bin/fio, /bin/iperf3   sh wrappers (what users run)
#   /libexec/fio, iperf3    the Debian binaries, unchanged
#   /lib/                   ld-linux-x86-64.so.2 and every library `ldd` names
#
# A wrapper runs the binary through the dynamic loader explicitly:
#   lib/ld-linux-x86-64.so.2 --library-path lib --argv0 "$0" libexec/fio ...
# with paths found from the wrapper's own location. This needs no files at
# fixed paths in the guest (no /lib64, no /etc/ld.so.cache), works wherever the
# image is mounted (or bind-mounted into a container), and leaves the guest's
# own root untouched; the loader uses only the libraries it is given, so
# the copies are consistent with each other whatever the guest has. (Copying
# the libraries to their real paths would need a chroot or writes to the
# guest's root, and a chroot would hide the guest's /dev.)
#
# Containers and the host use the same files without a loop mount: the tree
# the image was made from stays beside it, as tools-<hash>/tree/ (bind-mount
# it, e.g. at /opt/tools, and run /opt/tools/bin/fio).
#
# Cache: ${XDG_CACHE_HOME:-~/.cache}/ember/tools-<hash>/tools.ext4, where
# <hash> covers the fio, iperf3 and libc6 package versions, e2fsprogs'
# version, the list of libraries and this script. The image is self-contained,
# so a later update of some library on the host cannot break a cached image.
# Built in a temporary directory and renamed into place.
#
# Missing packages (fio iperf3 e2fsprogs) are installed with apt-get.
#
# On success, prints one line on stdout (everything else goes to stderr):
#   EMBER_TOOLS=/abs/path/tools.ext4

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"

case "${1:-}" in
-h | --help)
	echo "usage: $(basename "$0")   builds (or reuses) the fio + iperf3 ext4 image; prints EMBER_TOOLS=<path>"
	exit 0
	;;
"") ;;
*) echo "usage: $(basename "$0") [--help]" >&2; exit 2 ;;
esac

stage() { printf 'ember: tools: %s\n' "$*" >&2; }
die() { printf 'ember: tools: error: %s\n' "$*" >&2; exit 1; }

# ensure_packages: install what is missing (lib.sh).
. "$here/lib.sh"
ensure_packages e2fsprogs fio iperf3

tools=(fio iperf3)
loader=/lib64/ld-linux-x86-64.so.2
[ -e "$loader" ] || die "no $loader (an x86_64 glibc host is needed)"

# Every library the tools load: the `name => /path (addr)` lines of ldd
# (vdso has no path; the loader's line has no `=>`).
libs=$(for t in "${tools[@]}"; do ldd "$(command -v "$t")"; done |
	awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)
[ -n "$libs" ] || die "ldd found no libraries"

version() { dpkg-query -W -f='${Package} ${Version}\n' "$1" 2>/dev/null || echo "$1 unknown"; }
key=$(
	{
		for p in fio iperf3 libc6; do version "$p"; done
		mkfs.ext4 -V 2>&1 | sed -n 1p
		echo "$libs"
		cat "$self"
	} | sha256sum | cut -c1-16
)
lock_cache_entry tools "$key"
out="$cache_root/tools-$key"
image="$out/tools.ext4"

if [ -f "$image" ]; then
	stage "cached: $out"
	echo "EMBER_TOOLS=$image"
	exit 0
fi

tmp=$(mktemp -d "$cache_root/.tools-$key.XXXXXX")
chmod 0755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/tree"
mkdir -p "$root/bin" "$root/libexec" "$root/lib"

stage "collecting fio, iperf3 and $(echo "$libs" | wc -l) libraries"
cp -L "$loader" "$root/lib/ld-linux-x86-64.so.2"
for l in $libs; do
	cp -L "$l" "$root/lib/$(basename "$l")"
done
for t in "${tools[@]}"; do
	cp -L "$(command -v "$t")" "$root/libexec/$t"
	cat >"$root/bin/$t" <<-EOF
		#!/bin/sh
		# $t from the ember tools image (tools.sh): run through the image's own loader and libraries.
		d=\$(cd "\$(dirname "\$0")/.." && pwd)
		exec "\$d/lib/ld-linux-x86-64.so.2" --library-path "\$d/lib" --argv0 "\$0" "\$d/libexec/$t" "\$@"
	EOF
	chmod 0755 "$root/bin/$t" "$root/libexec/$t"
done
{
	for p in fio iperf3 libc6; do version "$p"; done
} >"$root/VERSIONS"

# The image: the tree's size plus a quarter and 8 MiB for ext4's own metadata.
kib=$(du -sk "$root" | cut -f1)
size_kib=$((kib + kib / 4 + 8192))
stage "building a $((size_kib / 1024)) MiB ext4 image"
truncate -s "${size_kib}K" "$tmp/tools.ext4"
mkfs.ext4 -q -F -L ember-tools -E root_owner=0:0 -d "$root" "$tmp/tools.ext4" >&2
# Smoke test on the host, outside the host's own library paths.
"$root/bin/fio" --version >/dev/null || die "the packaged fio does not start"
"$root/bin/iperf3" --version >/dev/null || die "the packaged iperf3 does not start"
mv "$tmp" "$out"
trap - EXIT
stage "built $image"
echo "EMBER_TOOLS=$image"
