# lib.sh: what the guest-kernels scripts share, sourced by each of them
# (build.sh, initramfs.sh, rootfs.sh, tools.sh). The sourcing script defines
# stage() and die() (its own message prefix) before calling anything here.
#
# It only installs build tools, so it is not part of any cache key: changing
# it never changes what a script builds.

# Install the Debian packages in "$@" that are not installed yet.
ensure_packages() {
	local missing=() pkg
	for pkg in "$@"; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
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
