# lib.sh: what the guest-kernels scripts share, sourced by each of them
# (build.sh, initramfs.sh, rootfs.sh, tools.sh). The sourcing script defines
# stage() and die() (its own message prefix) before calling anything here.
#
# It only installs build tools and takes the cache's locks, so it is not part
# of any cache key: changing it never changes what a script builds.

# Install the Debian packages in "$@" that are not installed yet.
ensure_packages() {
	local missing=() pkg
	for pkg in "$@"; do
		# No pipe into an early-quitting reader under pipefail: compare the whole answer.
		[[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) == *'install ok installed'* ]] ||
			missing+=("$pkg")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	stage "installing ${missing[*]} with apt-get"
	# Wait for another apt/dpkg to finish instead of failing on its lock.
	local apt=(apt-get -y -q -o DPkg::Lock::Timeout=600)
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || die "need root to install: ${missing[*]}"
		apt=(sudo "${apt[@]}")
	fi
	if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >&2; then
		DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2
		DEBIAN_FRONTEND=noninteractive "${apt[@]}" install "${missing[@]}" >&2 ||
			die "apt-get install ${missing[*]} failed"
	fi
}

# Sets cache_root (${XDG_CACHE_HOME:-~/.cache}/ember, created) and takes the
# lock of cache entry KIND-KEY on descriptor 9, held until the script exits:
# one builder per entry at a time; a second one says so, waits, and then finds
# the entry in the cache. (build.sh keeps its own copy of these lines on
# purpose: its whole text is the kernel's cache key, and a change to it costs
# every machine a kernel build of 15 minutes or more, for no change in the
# kernel.)
lock_cache_entry() {
	local kind=$1 key=$2
	cache_root=${XDG_CACHE_HOME:-${HOME:?set HOME or XDG_CACHE_HOME}/.cache}/ember
	mkdir -p "$cache_root"
	exec 9>"$cache_root/.$kind-$key.lock"
	if ! flock -n 9; then
		stage "waiting for another build of $kind-$key"
		flock 9
	fi
}
