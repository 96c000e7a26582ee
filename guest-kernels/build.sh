#!/usr/bin/env bash
# build.sh: build ember's default Linux guest (kernel + initramfs).
#
# The kernel is Debian's linux-source-6.1, configured as `make tinyconfig`
# plus the fragment microvm.config beside this script (merged with the
# kernel's scripts/kconfig/merge_config.sh, then `make olddefconfig`), and
# built as both vmlinux (ELF with a PVH entry note) and bzImage (Linux x86
# boot protocol, Documentation/x86/boot.rst). The initramfs comes from
# initramfs.sh beside this script.
#
# Cache: ${XDG_CACHE_HOME:-~/.cache}/ember/kernel-<hash>/, where <hash> covers
# the config fragment, the installed linux-source-6.1 package version and
# this script. It holds bzImage, vmlinux, config (the full .config),
# kernelrelease and build.log. A build runs in a temporary directory beside
# it and is renamed into place only when complete, so an interrupted build
# never leaves a half-made cache entry; a cached build returns at once.
#
# stdout, on success, is exactly (everything else goes to stderr):
#   EMBER_BZIMAGE=/abs/path/bzImage
#   EMBER_VMLINUX=/abs/path/vmlinux
#   EMBER_INITRAMFS=/abs/path/initramfs.cpio.gz
#   EMBER_KERNEL_RELEASE=6.1.xxx
#
# Sibling files are found relative to this script, so the directory can be
# copied anywhere (ember writes it to a temporary directory and runs it).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/microvm.config"
tarball=/usr/src/linux-source-6.1.tar.xz

usage() {
	cat <<EOF
usage: $(basename "$0") [--help]

Builds (or reuses from the cache) ember's default guest: Linux 6.1 from
Debian's linux-source-6.1, configured by $fragment,
and the initramfs from initramfs.sh. Missing Debian packages are installed
with apt-get (as root, or through sudo).

On success prints on stdout:
  EMBER_BZIMAGE=<path>  EMBER_VMLINUX=<path>  EMBER_INITRAMFS=<path>
  EMBER_KERNEL_RELEASE=<release>        (one per line)
Progress goes to stderr; the make output goes to build.log in the cache.

Environment:
  XDG_CACHE_HOME     cache root (default ~/.cache); entries live in \$XDG_CACHE_HOME/ember
  EMBER_BUILD_JOBS   parallel make jobs (default: number of CPUs)
EOF
}

case "${1:-}" in
-h | --help) usage; exit 0 ;;
"") ;;
*) usage >&2; exit 2 ;;
esac

start=$SECONDS
stage() { printf 'ember: kernel: [%3ds] %s\n' $((SECONDS - start)) "$*" >&2; }
die() { printf 'ember: kernel: error: %s\n' "$*" >&2; exit 1; }

# ensure_packages: install what is missing (lib.sh).
. "$here/lib.sh"

[ -f "$fragment" ] || die "config fragment $fragment not found"
[ -f "$here/initramfs.sh" ] || die "$here/initramfs.sh not found"

ensure_packages linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
[ -f "$tarball" ] || die "$tarball missing although linux-source-6.1 is installed"

source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$(
	{
		echo "linux-source-6.1 $source_version"
		cat "$fragment" "$self"
	} | sha256sum | cut -c1-16
)
cache_root=${XDG_CACHE_HOME:-${HOME:?set HOME or XDG_CACHE_HOME}/.cache}/ember
out="$cache_root/kernel-$key"
mkdir -p "$cache_root"

# One builder per key at a time; a second one waits and then finds the cache.
exec 9>"$cache_root/.kernel-$key.lock"
if ! flock -n 9; then
	stage "waiting for another build of kernel-$key"
	flock 9
fi

if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ] && [ -f "$out/kernelrelease" ]; then
	stage "cached: $out"
else
	tmp=$(mktemp -d "$cache_root/.kernel-$key.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	# bash skips the EXIT trap when a signal kills it: turn signals into exit.
	trap 'exit 130' INT TERM HUP
	log="$tmp/build.log"
	src="$tmp/linux"

	# On failure, show the end of the log and keep a copy next to the cache
	# (the temporary directory goes away).
	fail() {
		printf 'ember: kernel: %s; last lines of the log:\n' "$1" >&2
		tail -n 40 "$log" >&2
		cp "$log" "$cache_root/kernel-$key.failed.log"
		die "full log: $cache_root/kernel-$key.failed.log"
	}
	# Run make in the source tree with its output in the log.
	kmake() {
		make -C "$src" ARCH=x86_64 "$@" >>"$log" 2>&1 || fail "make $* failed"
	}

	stage "extracting linux-source-6.1 $source_version"
	mkdir -p "$src"
	tar -xJf "$tarball" -C "$src" --strip-components=1

	stage "configuring: tinyconfig + $(basename "$fragment")"
	kmake tinyconfig
	(cd "$src" && ARCH=x86_64 ./scripts/kconfig/merge_config.sh -m .config "$fragment") >>"$log" 2>&1 ||
		fail "merge_config.sh failed"
	kmake olddefconfig
	# olddefconfig silently drops an option whose dependencies are not met:
	# insist that every line of the fragment made it into the final config.
	dropped=$(grep -E '^(CONFIG_|# CONFIG_.* is not set)' "$fragment" | while IFS= read -r line; do
		grep -qxF "$line" "$src/.config" || echo "  $line"
	done)
	[ -z "$dropped" ] || die "options of $(basename "$fragment") not in the final config:
$dropped"

	jobs=${EMBER_BUILD_JOBS:-$(nproc)}
	stage "compiling vmlinux and bzImage with make -j$jobs (log: $out/build.log)"
	make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux bzImage >>"$log" 2>&1 &
	make_pid=$!
	# Stopped by a signal sent to this script alone (not to its process
	# group, as a terminal's Ctrl-C would): stop make too, which stops its
	# own children, then exit, and the EXIT trap removes the half build.
	trap 'kill "$make_pid" 2>/dev/null; wait "$make_pid"; exit 130' INT TERM HUP
	# A heartbeat instead of make's output: objects compiled so far.
	while kill -0 "$make_pid" 2>/dev/null; do
		for _ in $(seq 30); do
			sleep 1
			kill -0 "$make_pid" 2>/dev/null || break 2
		done
		stage "  ... $(grep -c '^  CC ' "$log" || true) files compiled"
	done
	wait "$make_pid" || fail "make vmlinux bzImage failed"
	trap 'exit 130' INT TERM HUP

	release=$(make -s -C "$src" ARCH=x86_64 kernelrelease)
	cp "$src/arch/x86/boot/bzImage" "$src/vmlinux" "$tmp/"
	cp "$src/.config" "$tmp/config"
	echo "$release" >"$tmp/kernelrelease"
	rm -rf "$src"
	# A leftover incomplete entry (files deleted by hand) would make mv move
	# tmp inside it; we hold the lock, so nobody else is using it.
	rm -rf "$out"
	chmod 0755 "$tmp" # mktemp made it private; the result is not secret
	mv "$tmp" "$out"
	trap - EXIT INT TERM HUP
	stage "built Linux $release: bzImage $(du -h --apparent-size "$out/bzImage" | cut -f1), vmlinux $(du -h --apparent-size "$out/vmlinux" | cut -f1)"
fi

initramfs=$("$here/initramfs.sh" | sed -n 's/^EMBER_INITRAMFS=//p')
[ -n "$initramfs" ] || die "initramfs.sh printed no EMBER_INITRAMFS line"

echo "EMBER_BZIMAGE=$out/bzImage"
echo "EMBER_VMLINUX=$out/vmlinux"
echo "EMBER_INITRAMFS=$initramfs"
echo "EMBER_KERNEL_RELEASE=$(cat "$out/kernelrelease")"
