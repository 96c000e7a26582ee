#!/usr/bin/env bash
# Build the *outer machine* of ember's Linux lane: the QEMU TCG machine (emulated AMD SVM) inside which
# /dev/kvm is real KVM (kvm_amd), so ember can boot Linux guests on hosts whose own KVM cannot
# (kvm_pvm). See src/lane/nested.rs for how the machine is started and driven.
#
# Inputs : Debian's linux-image-amd64 kernel (/boot/vmlinuz-<ver> + its modules), busybox-static, and
#          `init` beside this script (the outer machine's PID 1 and agent).
# Output : `KEY=value` lines on stdout:
#            LANE_KERNEL=<cache>/vmlinux           the outer kernel: Debian's stock one, decompressed for
#                                                  PVH boot (or /boot/vmlinuz-<ver> if that fails)
#            LANE_INITRAMFS=<cache>/initramfs.cpio.gz
#            LANE_KERNEL_VERSION=<ver>
#            LANE_QEMU=/usr/bin/qemu-system-x86_64
#          The initramfs is cached in ${XDG_CACHE_HOME:-$HOME/.cache}/ember/lane-<hash>/, keyed by a hash of
#          everything that goes into it, and published atomically (temp dir + rename).
#
# Why the outer machine shares the host's root read-only (9p) instead of copying binaries in: ember is
# dynamically linked against the host's glibc, and the invocations name host paths (kernels, initramfs,
# disk images, test files). Chrooting into a read-only 9p view of `/` makes every host path and every
# shared library work unchanged inside; writes go to a few writable 9p shares (the lane's work dir and
# /tmp by default) or to tmpfs. The initramfs therefore only holds busybox, the modules and `init`.
#
# This script may be copied elsewhere (ember embeds it): sibling files are found relative to itself.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
init_src="$here/init"
log() { echo "build-outer: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -f "$init_src" ]] || die "missing $init_src (the outer init/agent must sit beside this script)"

# --- 1. packages: install only what is missing -------------------------------------------------------
missing=()
for pkg in linux-image-amd64 busybox-static qemu-system-x86; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        die "packages missing: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}"
    fi
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; } ||
        die "apt-get install ${missing[*]} failed"
fi

# --- 2. which kernel: the one linux-image-amd64 depends on ---------------------------------------------
kpkg="$(dpkg-query -W -f='${Depends}' linux-image-amd64 | tr ',|' '\n\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | sed -n 1p)"
[[ -n "$kpkg" ]] || die "cannot tell which kernel linux-image-amd64 depends on"
kver="${kpkg#linux-image-}"
kernel="/boot/vmlinuz-$kver"
moddir="/lib/modules/$kver"
[[ -r "$kernel" ]] || die "$kernel missing; run: apt-get install --reinstall $kpkg"
[[ -f "$moddir/modules.dep" ]] || die "$moddir/modules.dep missing; run: apt-get install --reinstall $kpkg"
kpkg_version="$(dpkg-query -W -f='${Version}' "$kpkg")"
busybox=/bin/busybox; [[ -x "$busybox" ]] || busybox="$(command -v busybox || true)"
[[ -n "$busybox" ]] || die "busybox missing; run: apt-get install -y busybox-static"
if command -v file >/dev/null && file -L "$busybox" | grep -q 'dynamically linked'; then
    die "$busybox is not static; run: apt-get install -y busybox-static"
fi
qemu="$(command -v qemu-system-x86_64 || true)"
[[ -n "$qemu" ]] || die "qemu-system-x86_64 missing; run: apt-get install -y qemu-system-x86"

# --- 3. cache key ---------------------------------------------------------------------------------------
# name[:params] in load order; each module's dependencies are added before it from modules.dep.
# kvm_amd npt=0: the inner guests run on shadow page tables, not on nested paging. QEMU 7.2's TCG
# emulation of nested paging (AMD APM vol. 2, 15.25) corrupts a suspended guest's translation now and
# then: a dmesg boot into `| cat` triple-faulted or hung in 8 of 40 loops with npt=1, 0 of 40 with
# npt=0, whose boots took 1.12x as long (README, "Hosts whose KVM cannot run Linux"; issue #15).
wanted=(virtio_pci virtio_console 9pnet_virtio 9p irqbypass "kvm:nx_huge_pages=never" ccp "kvm_amd:npt=0")
# Loaded by the agent only when a run hands host taps to the machine (`net` on the control port): the
# NIC driver, the inner taps and the bridges between them. Dependencies already loaded above are skipped.
wanted_net=(virtio_net tun bridge)
key="$( {
    echo "$kpkg $kpkg_version"
    dpkg-query -W -f='${Version}' busybox-static; echo
    printf '%s\n' "${wanted[@]}" -- "${wanted_net[@]}"
    cat "${BASH_SOURCE[0]}" "$init_src"
} | sha256sum | cut -c1-16)"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/ember"
out="$cache_root/lane-$key"

emit() {
    if [[ -f "$out/vmlinux" ]]; then echo "LANE_KERNEL=$out/vmlinux"; else echo "LANE_KERNEL=$kernel"; fi
    echo "LANE_INITRAMFS=$out/initramfs.cpio.gz"
    echo "LANE_KERNEL_VERSION=$kver"
    echo "LANE_QEMU=$qemu"
}
if [[ -f "$out/initramfs.cpio.gz" ]]; then
    emit
    exit 0
fi

# --- 4. build in a temp dir, publish by rename -----------------------------------------------------------
mkdir -p "$cache_root"
tmp="$(mktemp -d "$cache_root/.lane-$key.XXXXXX")"
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,host,lib/modules}

cp "$busybox" "$root/bin/busybox"
install -m 0755 "$init_src" "$root/init"

# Resolve the dependency closure from modules.dep (paths relative to $moddir), dependencies first.
declare -A seen=()
order=()
dep_line() { # module name -> "path: dep dep ..." (names may use - or _)
    local alt="${1//_/[-_]}"
    grep -E "/${alt}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | sed -n 1p
}
add_module() {
    local name="$1" line path deps d
    line="$(dep_line "$name")" || die "module $name not found in $moddir/modules.dep"
    [[ -n "$line" ]] || die "module $name not found in $moddir/modules.dep"
    path="${line%%:*}"
    [[ -n "${seen[$path]:-}" ]] && return 0
    seen[$path]=1
    deps="${line#*:}"
    for d in $deps; do
        d="$(basename "$d")"; d="${d%%.ko*}"
        add_module "$d"
    done
    order+=("$path")
}
declare -A params=()
# Copies (decompressed) the modules in "${order[@]}" and writes their names and parameters to $1.
write_load_order() {
    local list="$1" path base
    : > "$list"
    for path in "${order[@]}"; do
        base="$(basename "$path")"
        case "$base" in
            *.ko) cp "$moddir/$path" "$root/lib/modules/$base" ;;
            *.ko.xz) xz -dc "$moddir/$path" > "$root/lib/modules/${base%.xz}"; base="${base%.xz}" ;;
            *.ko.zst) zstd -qdc "$moddir/$path" > "$root/lib/modules/${base%.zst}"; base="${base%.zst}" ;;
            *.ko.gz) gzip -dc "$moddir/$path" > "$root/lib/modules/${base%.gz}"; base="${base%.gz}" ;;
            *) die "unknown module format: $path" ;;
        esac
        echo "$base ${params[$path]:-}" >> "$list"
    done
}
for w in "${wanted[@]}"; do
    name="${w%%:*}"
    add_module "$name"
    [[ "$w" == *:* ]] && params[$(dep_line "$name" | cut -d: -f1)]="${w#*:}"
done
write_load_order "$root/lib/modules/load-order"
order=()
for name in "${wanted_net[@]}"; do add_module "$name"; done
write_load_order "$root/lib/modules/load-order-net"
log "modules: $(cut -d' ' -f1 "$root/lib/modules/load-order" | tr '\n' ' ')+ for networking: $(cut -d' ' -f1 "$root/lib/modules/load-order-net" | tr '\n' ' ')"

# The same kernel, decompressed: an ELF vmlinux with a PVH entry note (CONFIG_PVH=y), which QEMU
# starts directly, skipping the firmware's bzImage path and the XZ decompression that takes ~2 s under
# TCG (outer boot 5 s -> 2.5-3 s). Best effort: without it, /boot/vmlinuz is used as is.
extract_vmlinux() {
    local off
    for off in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$kernel" 2>/dev/null | cut -d: -f1); do
        tail -c +$((off + 1)) "$kernel" | xz -dc 2>/dev/null > "$tmp/vmlinux" || true
        if [[ "$(head -c 4 "$tmp/vmlinux" | od -An -c | tr -d ' ')" == '177ELF' ]] &&
            grep -q "CONFIG_PVH=y" "/boot/config-$kver" 2>/dev/null; then
            return 0
        fi
    done
    rm -f "$tmp/vmlinux"
    log "note: could not extract a PVH vmlinux from $kernel; booting the bzImage (slower)"
}
if command -v xz >/dev/null; then extract_vmlinux; fi

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > "$tmp/initramfs.cpio.gz"
rm -rf "$root"
echo "$kpkg $kpkg_version" > "$tmp/inputs"

# Publish: if another build won the race, keep theirs.
if mv -T "$tmp" "$out" 2>/dev/null; then
    trap - EXIT
    # Older builds (other kernel or script versions) unused for a day go.
    find "$cache_root" -maxdepth 1 -name 'lane-*' ! -name "lane-$key" -mtime +1 -exec rm -rf {} + 2>/dev/null || true
fi
[[ -f "$out/initramfs.cpio.gz" ]] || die "publishing $out failed"
emit
