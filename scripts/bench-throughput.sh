#!/usr/bin/env bash
# Usage: scripts/bench-throughput.sh [--quick] [--runs R] [--size BYTES] [--no-build] [--baseline DIR]
#
# Bulk download through each AnyTLS pair: curl downloads one big file from nginx on loopback
#   - directly,
#   - through our pair (anytls-client SOCKS5 -> anytls-server),
#   - through the sing-box pair, the mihomo pair and the crates.io `anytls` 0.5.3 pair,
#     each when scripts/install-peers.sh installed it ("SKIP <peer>: why" otherwise),
# interleaved in ONE run (the order rotates every round), R rounds. Around every download
# the CPU time (user + system, /proc/PID/stat) of the pair's server and client is read, so
# each process's CPU seconds per GiB is known: unlike GB/s, it barely moves when other work
# shares the machine. Prints medians (GB/s = 10^9 bytes/s; CPU s/GiB per process and for
# the pair), ours against the best peer and against direct, the machine and its load; writes
# results/throughput.json and results/throughput.svg.
# Default: 5 rounds of 1 GiB; --quick: 3 rounds of 256 MiB. --baseline DIR adds our pair
# built from another commit (anytls-server and anytls-client in DIR) as variant "baseline",
# for a before/after comparison in the same interleaved run.
# Goals (issue 13): ours >= 1.5 x the best peer and >= 0.5 x direct; pair CPU <= 1.4 s/GiB,
# server <= 0.7 s/GiB. Reported, never fatal: the exit status is 0 unless set-up fails.
#
# nginx comes from PATH or /usr/sbin (apt-get install -y nginx is tried when missing
# and we are root); without it the file is served by `anytls-bench target`'s HTTP port
# (GET /bytes/N), which is noted in the output and the JSON.
# Everything started here is stopped on exit (KEEP=1 keeps the temp dir and logs).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/bench-lib.sh
. "$here/bench-lib.sh"

runs=5 size=$((1 << 30)) build=1 quick=0 baseline=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; runs=3; size=$((256 << 20)) ;;
        --runs) runs=$2; shift ;;
        --size) size=$2; shift ;;
        --no-build) build=0 ;;
        --baseline) baseline=$2; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

bench_init anytls-throughput
[ $build = 1 ] && { build_release || exit 1; }
for b in anytls-server anytls-client anytls-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (build with cargo build --release --workspace --bins)"
done

# --- the file server ---------------------------------------------------------------
nginx_bin=$(ensure_nginx)
read -r http_port < <(free_ports 1)
if [ -n "$nginx_bin" ]; then
    server_kind="nginx $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///')"
    start_nginx_file "$nginx_bin" "$size" "$http_port" || { cat "$BENCH_WORK/nginx.log" >&2; die "nginx did not start"; }
    url="http://127.0.0.1:$http_port/file.bin"
else
    server_kind="anytls-bench target (nginx unavailable)"
    echo "NOTE: nginx could not be installed; serving the file with anytls-bench's HTTP target" >&2
    start_bg target "$BIN/anytls-bench" target --listen "127.0.0.1:$http_port"
    wait_port "$http_port" 20 "$BG_PID" || die "anytls-bench target did not start"
    url="http://127.0.0.1:$http_port/bytes/$size"
fi

# --- the proxies -------------------------------------------------------------------
variants=(direct ours)
declare -A socks=([direct]="") server_pid=() client_pid=()
start_our_pair ours "" "" || die "our pair did not start: $PAIR_ERROR"
socks[ours]=$PAIR_SOCKS server_pid[ours]=$PAIR_SERVER_PID client_pid[ours]=$PAIR_CLIENT_PID
if [ -n "$baseline" ]; then
    BIN_OURS=$BIN BIN=$baseline
    start_our_pair baseline "" "" || die "the baseline pair ($baseline) did not start: $PAIR_ERROR"
    BIN=$BIN_OURS
    variants+=(baseline)
    socks[baseline]=$PAIR_SOCKS server_pid[baseline]=$PAIR_SERVER_PID client_pid[baseline]=$PAIR_CLIENT_PID
fi
add_peer_variants

fetch() { # fetch VARIANT [curl args...]: prints "speed_bytes_per_s size_bytes", rc of curl
    local via=()
    [ -n "${socks[$1]}" ] && via=(--socks5-hostname "${socks[$1]}")
    shift
    curl -sS -o /dev/null -m 300 -w '%{speed_download} %{size_download}\n' "${via[@]}" "$@" "$url"
}

# Warm-up: the whole file once directly (page cache), one small request through each
# proxy (sessions set up).
fetch direct >/dev/null || die "warm-up download failed"
for v in "${variants[@]}"; do
    fetch "$v" -r 0-65535 >/dev/null || die "warm-up via $v failed (logs: KEEP=1)"
done

# A transfer cut short (curl exit 18) still measured a rate over what it delivered. The
# crates.io client closes a stream whose unread data passes 1 MiB (0.5.3 has no flow
# control: "inbound PUSH limit reached; closing stream"), so its big downloads rarely
# finish. Such a run is kept as "partial" when at least PARTIAL_MIN bytes came through.
partial_min=$((16 << 20))
samples="$BENCH_WORK/samples.tsv"
: >"$samples"
# round variant speed bytes status server_cpu_s client_cpu_s loadavg
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$samples"; }
cpu_of() { [ -n "${1:-}" ] && cpu_seconds "$1"; } # cpu_of [PID]: "" for direct
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "throughput: $runs round(s) of $((size >> 20)) MiB, file served by $server_kind; $(machine_info); load $load_before" >&2
for round in $(seq "$runs"); do
    # Rotate the order so no variant always runs first (after an idle pause) or last.
    n=${#variants[@]}
    for i in $(seq 0 $((n - 1))); do
        v=${variants[$(((i + round - 1) % n))]}
        s0=$(cpu_of "${server_pid[$v]:-}") c0=$(cpu_of "${client_pid[$v]:-}")
        out=$(fetch "$v" 2>"$BENCH_WORK/curl.err")
        rc=$?
        s1=$(cpu_of "${server_pid[$v]:-}") c1=$(cpu_of "${client_pid[$v]:-}")
        scpu=$(awk -v a="$s0" -v b="$s1" 'BEGIN { print (a == "" || b == "") ? "" : b - a }')
        ccpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { print (a == "" || b == "") ? "" : b - a }')
        read -r speed got <<<"${out:-0 0}"
        if [ $rc = 0 ] && [ "$got" = "$size" ]; then
            status=ok
        elif [ "$got" -ge "$partial_min" ] 2>/dev/null; then
            status=partial
        else
            status=fail
        fi
        record "$round" "$v" "$speed" "$got" "$status" "$scpu" "$ccpu" "$(cut -d' ' -f1 /proc/loadavg)"
        awk -v r="$round" -v v="$v" -v s="$speed" -v g="$got" -v st="$status" -v sc="$scpu" -v cc="$ccpu" \
            -v e="$(head -c 200 "$BENCH_WORK/curl.err")" 'BEGIN {
                gib = g / 1073741824
                cpu = (sc == "" || gib == 0) ? "" : sprintf("  CPU s/GiB server %.2f client %.2f", sc / gib, cc / gib)
                printf "  round %s %-8s %.3f GB/s  %s (%.0f MiB)%s%s\n", r, v, s / 1e9, st, g / 1048576, cpu, (st == "ok" ? "" : "  " e)
            }' >&2
    done
done

mkdir -p "$BENCH_REPO/results"
python3 "$here/throughput-report.py" "$samples" "$BENCH_REPO/results/throughput.json" \
    --svg "$BENCH_REPO/results/throughput.svg" --load "$load_before -> $(cut -d' ' -f1-3 /proc/loadavg)" \
    --size "$size" --runs "$runs" --server "$server_kind" --nproc "$(nproc)" \
    --cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" --quick "$quick"
