#!/usr/bin/env bash
# Memory over repeated waves of load, and the CPU cost of bulk transfer: the numbers
# behind the choice of global allocator (docs/memory.md). Measures the release binaries
# in BIN_DIR (default target/release, not rebuilt) and prints one markdown table row.
#
#   scripts/bench-memory.sh [--label NAME] [--bin-dir DIR] [--streams N] [--waves W] [--idle S]
#
# Sequence, through our client and server on loopback: a warm-up wave, 10 s idle (the
# baseline), W waves (default 6), S s idle (default 45). A wave is anytls-bench hold:
# N streams (default 1,000) to one echo target, open together for 8 s with a 64-byte echo
# every second. RSS of server and client is read 2 s after each wave and after each idle.
# Then three bulk runs (512 MiB down + 512 MiB up over 4 streams): CPU seconds of server +
# client per GiB moved (from /proc/PID/stat), and throughput (median of the three).
# Environment passed to both binaries as it is (e.g. MALLOC_ARENA_MAX=2 to tune glibc).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"

label=current streams=1000 waves=6 idle=45
while [ $# -gt 0 ]; do
    case "$1" in
        --label) label=$2; shift ;;
        --bin-dir) BIN=$2; shift ;;
        --streams) streams=$2; shift ;;
        --waves) waves=$2; shift ;;
        --idle) idle=$2; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
bench_init anytls-bench-memory
raise_fd_limit 65536
for b in anytls-server anytls-client anytls-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (cargo build --release --workspace --bins)"
done
log() { echo "[bench-memory $label $(date +%T)] $*" >&2; }
start_targets target
# --max-outbound-connections: above the wave, so that the pool's cap never refuses here.
start_our_pair "$label" "--max-outbound-connections $((streams * 2)) --max-sessions $((streams * 2))" "" ||
    die "our pair: $PAIR_ERROR"
spid=$PAIR_SERVER_PID cpid=$PAIR_CLIENT_PID

wave() { # wave NAME: one hold wave, then RSS 2 s later into RSS_S/RSS_C
    local out
    out=$("$BIN/anytls-bench" hold --socks "$PAIR_SOCKS" --target "$TARGET_ECHO" --streams "$streams" --seconds 8 \
        --interval-ms 1000 --max-seconds 60 2>&1)
    sleep 2
    RSS_S=$(rss_kib "$spid") RSS_C=$(rss_kib "$cpid")
    log "$1: server $(mib "$RSS_S") MiB, client $(mib "$RSS_C") MiB; $out"
}

wave warm-up
sleep 10
base_s=$(rss_kib "$spid") base_c=$(rss_kib "$cpid")
log "baseline: server $(mib "$base_s") MiB, client $(mib "$base_c") MiB"
server_waves="" client_waves=""
for w in $(seq 1 "$waves"); do
    wave "wave $w"
    server_waves+=" $(mib "$RSS_S") |" client_waves+=" $(mib "$RSS_C") |"
done
sleep "$idle"
final_s=$(rss_kib "$spid") final_c=$(rss_kib "$cpid")
log "after $idle s idle: server $(mib "$final_s") MiB, client $(mib "$final_c") MiB"

cpu=() down=() up=()
for _ in 1 2 3; do
    t0=$(awk -v s="$(cpu_seconds "$spid")" -v c="$(cpu_seconds "$cpid")" 'BEGIN { print s + c }')
    out=$("$BIN/anytls-bench" bulk --socks "$PAIR_SOCKS" --target "$TARGET_BULK" --bytes 512M --streams 4 \
        --max-seconds 120 --json)
    t1=$(awk -v s="$(cpu_seconds "$spid")" -v c="$(cpu_seconds "$cpid")" 'BEGIN { print s + c }')
    cpu+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')") # 1 GiB moved
    down+=("$(grep -oE '"download":\{[^}]*' <<<"$out" | grep -oE '"gbit_per_sec":[0-9.]+' | cut -d: -f2)")
    up+=("$(grep -oE '"upload":\{[^}]*' <<<"$out" | grep -oE '"gbit_per_sec":[0-9.]+' | cut -d: -f2)")
done
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
size_kib() { echo $(($(stat -c %s "$1") / 1024)); }
log "bulk: CPU s/GiB ${cpu[*]}; down ${down[*]}; up ${up[*]} Gbit/s"

echo "| allocator | server RSS baseline | after waves 1..$waves | after ${idle} s idle | client RSS baseline | after waves 1..$waves | after idle | CPU s/GiB | down Gbit/s | up Gbit/s | server binary KiB |"
echo "| $label | $(mib "$base_s") |$server_waves $(mib "$final_s") | $(mib "$base_c") |$client_waves $(mib "$final_c") | \
$(median "${cpu[@]}") | $(median "${down[@]}") | $(median "${up[@]}") | $(size_kib "$BIN/anytls-server") |"
