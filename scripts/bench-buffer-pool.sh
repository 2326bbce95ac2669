#!/usr/bin/env bash
# Usage: scripts/bench-buffer-pool.sh [--quick] [--runs R] [--size BYTES] [--no-build]
#
# The relay with and without the buffer pool (--buffer-pool on|off), in ONE run: two of our
# pairs side by side, curl downloading one file from nginx on loopback through each, the
# order alternating every round. Prints per variant the median throughput (GB/s, 10^9 B/s),
# the relay's read-buffer allocations (from /api/memory-pool-stats of both binaries: with
# the pool off every read allocates; with it on only a get that finds its tier empty does)
# and the peak RSS of the server and client (VmHWM). Default: 7 rounds of 512 MiB;
# --quick: 3 rounds of 256 MiB. Needs nginx (apt-get install -y nginx is tried as root).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/bench-lib.sh"

runs=7 size=$((512 << 20)) build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) runs=3; size=$((256 << 20)) ;;
        --runs) runs=$2; shift ;;
        --size) size=$2; shift ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

bench_init anytls-buffer-pool
[ $build = 1 ] && { build_release || exit 1; }
nginx_bin=$(ensure_nginx)
[ -n "$nginx_bin" ] || die "nginx not found"
read -r http_port < <(free_ports 1)
start_nginx_file "$nginx_bin" "$size" "$http_port" || die "nginx did not start"
url="http://127.0.0.1:$http_port/file.bin"

variants=(off on)
declare -A socks pids
for v in "${variants[@]}"; do
    args="--buffer-pool $v --api 127.0.0.1:0"
    start_our_pair "pool-$v" "$args" "$args" || die "pair $v did not start: $PAIR_ERROR"
    socks[$v]=$PAIR_SOCKS
    pids[$v]="$PAIR_SERVER_PID $PAIR_CLIENT_PID"
done

fetch() { curl -sS -o /dev/null -m 300 -w '%{speed_download} %{size_download}\n' --socks5-hostname "${socks[$1]}" "$url"; }
for v in "${variants[@]}"; do fetch "$v" >/dev/null || die "warm-up via $v failed"; done

samples="$BENCH_WORK/samples.tsv"
: >"$samples"
echo "buffer pool: $runs round(s) of $((size >> 20)) MiB; $(machine_info)" >&2
for round in $(seq "$runs"); do
    for i in 0 1; do
        v=${variants[$(((i + round) % 2))]}
        read -r speed got < <(fetch "$v" || echo "0 0")
        [ "$got" = "$size" ] || echo "  round $round $v: short transfer ($got bytes)" >&2
        printf '%s\t%s\n' "$v" "$speed" >>"$samples"
        awk -v r="$round" -v v="$v" -v s="$speed" 'BEGIN { printf "  round %s pool %-3s %.3f GB/s\n", r, v, s / 1e9 }' >&2
    done
done

api_of() { grep -o 'api on [0-9.:]*' "$BENCH_WORK/$1.log" | head -n1 | cut -d' ' -f3; }
for v in "${variants[@]}"; do
    median=$(awk -v v="$v" '$1 == v { print $2 }' "$samples" | sort -g |
        awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.3f", m / 1e9 }')
    line="pool $v: median $median GB/s"
    for side in server client; do
        stats=$(curl -sS "http://$(api_of "pool-$v-$side")/api/memory-pool-stats")
        read -r allocated reused < <(python3 -c 'import json,sys; t=json.load(sys.stdin)["tiers"][1]; print(t["total_allocated"], t["total_reused"])' <<<"$stats")
        if [ "$v" = on ]; then
            line+="; $side: $allocated buffers allocated for $((allocated + reused)) reads"
        else # the relay's own buffer: how often it had to be reserved again (≤ one allocation each)
            line+="; $side: own read buffer reserved $allocated times"
        fi
    done
    for pid in ${pids[$v]}; do
        line+="; VmHWM($pid) $(awk '/VmHWM/ { print $2 " " $3 }' "/proc/$pid/status")"
    done
    echo "$line"
done
