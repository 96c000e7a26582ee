#!/usr/bin/env bash
# test-qemu.sh: check the default guest (kernel + initramfs + ember-init)
# under QEMU, without ember: a reference for what ember must reproduce.
#
# Boots the output of build.sh in `qemu-system-x86_64 -M microvm` with TCG
# (no KVM needed) and QEMU's isa-debug-exit on ember's exit port 0x501. QEMU
# exits with (byte << 1) | 1, truncated to 8 bits, so statuses of 128 and
# up are read from QEMU's trace of the port write instead.
#
# Prints one line per check and ends with "N passed, N failed"; exits 1 if
# any check failed.
#
# The checks are strings that `check` evals later, single-quoted on purpose.
# shellcheck disable=SC2016,SC2034

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

case "${1:-}" in
-h | --help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac

command -v qemu-system-x86_64 >/dev/null || {
	echo "test-qemu.sh: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2
	exit 1
}

eval "$("$here/build.sh")"
encode() { "$here/encode-argv.sh" "$@"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# boot KERNEL APPEND [STDIN-SCRIPT]: boot and set $out (console output, CRs
# removed), $rc (QEMU's exit code) and $byte (the byte written to 0x501, or
# empty). STDIN-SCRIPT is a shell snippet whose output feeds the serial port.
boot() {
	local kernel=$1 append=$2 input=${3:-}
	local machine=${MACHINE:-microvm,isa-serial=on}
	# The feeder runs beside QEMU (not in a pipeline, which would wait for
	# its sleeps) and is stopped when QEMU has exited.
	rm -f "$work/in"
	mkfifo "$work/in"
	(if [ -n "$input" ]; then eval "$input"; else sleep 120; fi) >"$work/in" 2>/dev/null &
	local feeder=$!
	set +e
	timeout "${TIMEOUT:-90}" qemu-system-x86_64 -M "$machine" -accel tcg -m 256M \
		-nodefaults -no-user-config -nographic -serial stdio -no-reboot \
		-kernel "$kernel" -initrd "$EMBER_INITRAMFS" \
		-append "console=ttyS0 reboot=k panic=-1 quiet $append" \
		-device isa-debug-exit,iobase=0x501,iosize=1 \
		-d trace:memory_region_ops_write -D "$work/trace" \
		<"$work/in" >"$work/out" 2>&1
	rc=$?
	kill "$feeder" 2>/dev/null
	wait "$feeder" 2>/dev/null
	set -e
	out=$(tr -d '\r' <"$work/out")
	byte=$(grep -o 'addr 0x501 value 0x[0-9a-f]*' "$work/trace" | head -n1 | awk '{print $4}' || true)
	[ -n "$byte" ] && byte=$((byte))
	return 0
}

check() { # NAME CONDITION...
	local name=$1
	shift
	if "$@"; then
		echo "ok    $name"
		passed=$((passed + 1))
	else
		echo "FAIL  $name (qemu rc=$rc, exit byte=${byte:-none})"
		printf '%s\n' "$out" | tail -n 15 | sed 's/^/      | /'
		failed=$((failed + 1))
	fi
}

# The exit device saw STATUS (and QEMU's own exit code agrees).
status_is() { [ "$byte" = "$1" ] && [ "$rc" -eq $(((($1 << 1) | 1) & 255)) ]; }

boot "$EMBER_BZIMAGE" "$(encode uname -a)"
check "bzImage: uname -a, status 0" eval 'status_is 0 && [[ $out == "Linux ember 6.1."* ]]'

boot "$EMBER_VMLINUX" "$(encode sh -c 'exit 7')"
check "vmlinux (PVH entry): sh -c 'exit 7' gives 7" status_is 7

boot "$EMBER_BZIMAGE" "$(encode sh -c 'exit 255')"
check "sh -c 'exit 255' gives 255" status_is 255

boot "$EMBER_BZIMAGE" "$(encode sh -c 'kill -9 $$')"
check "killed by SIGKILL gives 137, nothing printed" eval 'status_is 137 && [ -z "$out" ]'

boot "$EMBER_BZIMAGE" "$(encode true)"
check "quiet: a silent command prints nothing" eval 'status_is 0 && [ -z "$out" ]'

boot "$EMBER_BZIMAGE" "ember.debug $(encode true)"
check "ember.debug prints ember-init: ready" eval 'status_is 0 && [ "$out" = "ember-init: ready" ]'

args=('a b' "it's \"q\"" '$HOME' 'back\slash\n' $'trail\n\n' '' '*' $'\xc3\xa9t\xc3\xa9' '-n' ' ')
boot "$EMBER_BZIMAGE" "$(encode printf '[%s]\n' "${args[@]}")"
expected=$(printf '[%s]\n' "${args[@]}")
check "arguments round-trip byte for byte" eval 'status_is 0 && [ "$out" = "$expected" ]'

boot "$EMBER_BZIMAGE" "$(encode no-such-command)"
check "unknown command gives 127" status_is 127

boot "$EMBER_BZIMAGE" "ember.argv=x6g"
check "malformed ember.argv gives 125" status_is 125

boot "$EMBER_BZIMAGE" "$(encode sleep 100)" "sleep 8; printf '\\003'"
check "Ctrl-C interrupts the command: 130" status_is 130

boot "$EMBER_BZIMAGE" "" "sleep 8; echo 'echo hi \$((6*7))'; echo 'exit 3'; sleep 30"
check "interactive shell runs commands, exit 3 gives 3" eval 'status_is 3 && [[ $out == *"hi 42"* ]]'

for cmd in reboot poweroff halt; do
	boot "$EMBER_BZIMAGE" "" "sleep 8; echo $cmd; sleep 60"
	check "interactive shell: $cmd ends the VM with 0" status_is 0
done

# QEMU's microvm has no i8042, so reboot=k cannot reset it: use a triple
# fault there (ember emulates the i8042 and keeps reboot=k).
boot "$EMBER_BZIMAGE" "reboot=t $(encode sh -c 'echo c >/proc/sysrq-trigger')"
check "sysrq-c panics and panic=-1 resets the VM" eval '[ "$rc" -eq 0 ] && [ -z "$byte" ] && [[ $out == *"Kernel panic"* ]]'

MACHINE=pc boot "$EMBER_BZIMAGE" "$(encode reboot -f)"
check "-M pc: reboot -f resets through the i8042 (reboot=k)" eval '[ "$rc" -eq 0 ] && [ -z "$byte" ]'

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
