#!/usr/bin/env bash
# Soak: boot the tiny echo guest many times, one after another and many at
# once, and check that nothing is left behind (issue #11, hardening).
#
#   benches/soak.sh [SEQUENTIAL] [BATCHES] [PER_BATCH]     # defaults 1000 50 20
#
# Builds ember (release), saves the echo guest (`ember demo --save-guest F
# --guest echo`), then runs SEQUENTIAL boots one at a time and BATCHES batches
# of PER_BATCH boots at once of `ember run --kernel F --cmdline hi --memory 16M`.
# Each must print `hi` and exit 0. Before and after, it records:
# - this shell's open fds and threads, and ember processes of this build still
#   alive (there must be none);
# - system-wide: entries in /tmp and /dev/shm, tun/tap devices, KVM VMs (from
#   debugfs when mounted, else fds on anon_inode:kvm-vm of every process we
#   may look at), ember processes (pgrep -c ember), MemAvailable.
# It prints a before/after table and exits 1 if a boot failed or something
# leaked. A leak is: an ember process of this build alive, this shell holding
# more fds or threads, its private TMPDIR not empty, or a new entry named
# ember* in /tmp or /dev/shm, a new tun device, a KVM VM held by an ember
# process. Other system-wide changes (other people's builds and tests share
# the machine) are shown but not held against ember; MemAvailable is shown only.
set -uo pipefail
cd "$(dirname "$0")/.."

SEQ=${1:-1000}
BATCHES=${2:-50}
PER=${3:-20}
NICE=${SOAK_NICE:-10}

work=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")
trap 'rm -rf "$work"' EXIT
# ember's own temporary files go here, where they can be counted exactly.
export TMPDIR="$work/tmp"
mkdir -p "$TMPDIR" "$work/out"

echo "soak: building ember (release)"
nice -n "$NICE" cargo build --release -q || { echo "soak: build failed"; exit 1; }
# The binary: target/<triple>/release when .cargo/config.toml names a build target.
tdir=${CARGO_TARGET_DIR:-target}
ember=$(ls -t "$tdir"/release/ember "$tdir"/*/release/ember 2>/dev/null | head -1)
[ -x "$ember" ] || { echo "soak: no release ember under $tdir"; exit 1; }
ember=$(realpath "$ember")
guest="$work/echo.elf"
"$ember" demo --save-guest "$guest" --guest echo >/dev/null || { echo "soak: cannot save the echo guest"; exit 1; }

# --- measurements -----------------------------------------------------------
our_embers() { # pids of processes running this build's binary
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$ember" ] && echo "${p#/proc/}"
    done
}
kvm_vms() { # one line per live VM: "pid"
    if [ -d /sys/kernel/debug/kvm ]; then
        ls /sys/kernel/debug/kvm | sed -n 's/^\([0-9]\+\)-.*/\1/p'
    else
        local fd
        for fd in /proc/[0-9]*/fd/*; do
            [ "$(readlink "$fd" 2>/dev/null)" = "anon_inode:kvm-vm" ] && { fd=${fd#/proc/}; echo "${fd%%/*}"; }
        done
    fi
}
declare -A M
measure() { # $1: before|after
    local s=$1
    M[$s.shell_fds]=$(find /proc/$$/fd -mindepth 1 -maxdepth 1 | wc -l)
    M[$s.shell_threads]=$(awk '/^Threads:/ {print $2}' /proc/$$/status)
    M[$s.our_embers]=$(our_embers | wc -l)
    M[$s.tmpdir]=$(find "$TMPDIR" -mindepth 1 -maxdepth 1 | wc -l)
    M[$s.tmp]=$(ls -A /tmp | wc -l)
    ls -A /tmp | sort >"$work/tmp.$s"
    M[$s.shm]=$(ls -A /dev/shm | wc -l)
    ls -A /dev/shm | sort >"$work/shm.$s"
    ip -o link show type tun 2>/dev/null | awk -F': ' '{print $2}' | sort >"$work/tun.$s"
    M[$s.tun]=$(wc -l <"$work/tun.$s")
    kvm_vms | sort >"$work/kvm.$s"
    M[$s.kvm_vms]=$(wc -l <"$work/kvm.$s")
    M[$s.pgrep_ember]=$(pgrep -c ember || true)
    M[$s.mem_avail_mib]=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
}

# --- boots ------------------------------------------------------------------
fail=0
boot() { # $1: output file; runs one VM, returns non-zero unless it printed hi and exited 0
    "$ember" run --kernel "$guest" --cmdline hi --memory 16M >"$1" 2>&1 </dev/null || return 1
    grep -qx 'hi' "$1"
}

measure before
t0=$(date +%s.%N)
echo "soak: $SEQ sequential boots"
for ((i = 0; i < SEQ; i++)); do
    if ! boot "$work/out/seq"; then
        fail=$((fail + 1))
        echo "soak: sequential boot $i failed:"; head -5 "$work/out/seq"
    fi
done
t1=$(date +%s.%N)
echo "soak: $BATCHES batches of $PER parallel boots"
for ((b = 0; b < BATCHES; b++)); do
    pids=()
    for ((j = 0; j < PER; j++)); do
        boot "$work/out/par.$j" &
        pids+=($!)
    done
    for j in "${!pids[@]}"; do
        if ! wait "${pids[$j]}"; then
            fail=$((fail + 1))
            echo "soak: batch $b boot $j failed:"; head -5 "$work/out/par.$j"
        fi
    done
done
t2=$(date +%s.%N)
sleep 1 # let the kernel finish tearing down the last VMs
measure after

# --- report -----------------------------------------------------------------
leaks=()
printf '\n%-34s %12s %12s\n' "measure" "before" "after"
for k in shell_fds shell_threads our_embers tmpdir tmp shm tun kvm_vms pgrep_ember mem_avail_mib; do
    printf '%-34s %12s %12s\n' "$k" "${M[before.$k]}" "${M[after.$k]}"
done
((M[after.shell_fds] > M[before.shell_fds])) && leaks+=("this shell holds more fds")
((M[after.shell_threads] > M[before.shell_threads])) && leaks+=("this shell has more threads")
((M[after.our_embers] > 0)) && leaks+=("ember processes left: $(our_embers | tr '\n' ' ')")
((M[after.tmpdir] > 0)) && leaks+=("files left in ember's TMPDIR: $(ls -A "$TMPDIR" | head -5 | tr '\n' ' ')")
for d in tmp shm; do
    new=$(comm -13 "$work/$d.before" "$work/$d.after")
    [ -n "$new" ] && echo "new in /$d (not necessarily ember's): $(echo "$new" | head -10 | tr '\n' ' ')"
    grep -i '^ember' <<<"$new" >/dev/null && leaks+=("new ember entries in /$d: $(grep -i '^ember' <<<"$new" | tr '\n' ' ')")
done
new_tun=$(comm -13 "$work/tun.before" "$work/tun.after")
[ -n "$new_tun" ] && leaks+=("new tun devices: $(echo "$new_tun" | tr '\n' ' ')")
for pid in $(comm -13 "$work/kvm.before" "$work/kvm.after" | sort -u); do
    comm_name=$(cat "/proc/$pid/comm" 2>/dev/null || echo gone)
    [[ $comm_name == ember* ]] && leaks+=("a KVM VM held by ember process $pid")
done

seconds=$(echo "$t2 - $t0" | bc)
boots=$((SEQ + BATCHES * PER))
printf '\nboots: %d (%d sequential in %.1f s, %d parallel in %.1f s), failed: %d\n' \
    "$boots" "$SEQ" "$(echo "$t1 - $t0" | bc)" "$((BATCHES * PER))" "$(echo "$t2 - $t1" | bc)" "$fail"
printf 'total: %.1f s, %.1f boots/s (sequential %.1f/s, parallel %.1f/s)\n' "$seconds" \
    "$(echo "$boots / $seconds" | bc -l)" "$(echo "$SEQ / ($t1 - $t0 + 0.000001)" | bc -l)" \
    "$(echo "$BATCHES * $PER / ($t2 - $t1 + 0.000001)" | bc -l)"
if ((${#leaks[@]})); then
    printf 'LEAK: %s\n' "${leaks[@]}"
fi
if ((fail > 0 || ${#leaks[@]} > 0)); then
    echo "soak: FAILED"
    exit 1
fi
echo "soak: OK, nothing leaked"
