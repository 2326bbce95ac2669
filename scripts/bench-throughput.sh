#!/usr/bin/env bash
# Usage: scripts/bench-throughput.sh [--quick] [--runs R] [--size BYTES] [--no-build]
#
# The throughput floor of issue 2: curl downloads one big file from nginx on loopback
#   - directly,
#   - through our pair (anytls-client SOCKS5 -> anytls-server), and
#   - through the crates.io `anytls` 0.5.3 pair, when scripts/install-peers.sh installed it,
# interleaved in ONE run (the order rotates every round), R rounds. Prints medians in
# GB/s (10^9 bytes/s), the ratios ours/peer and ours/direct, the machine, and writes
# results/throughput.json. Default: 5 rounds of 1 GiB; --quick: 3 rounds of 256 MiB.
# Goal (issue 2): ours >= 1.3 x peer, and about a quarter of direct.
#
# nginx comes from PATH or /usr/sbin (apt-get install -y nginx is tried when missing
# and we are root); without it the file is served by `anytls-bench target`'s HTTP port
# (GET /bytes/N), which is noted in the output and the JSON.
# Everything started here is stopped on exit (KEEP=1 keeps the temp dir and logs).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/bench-lib.sh
. "$here/bench-lib.sh"

runs=5 size=$((1 << 30)) build=1 quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; runs=3; size=$((256 << 20)) ;;
        --runs) runs=$2; shift ;;
        --size) size=$2; shift ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

bench_init anytls-throughput
[ $build = 1 ] && { build_release || exit 1; }
for b in anytls-server anytls-client anytls-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (build with cargo build --release)"
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
declare -A socks=([direct]="")
start_our_pair ours "" "" || die "our pair did not start: $PAIR_ERROR"
socks[ours]=$PAIR_SOCKS
if peer_installed; then
    if start_peer_pair peer; then
        variants+=(peer)
        socks[peer]=$PAIR_SOCKS
    else
        echo "SKIP peer: $PAIR_ERROR" >&2
    fi
else
    echo "SKIP peer: crates.io anytls not installed (scripts/install-peers.sh)" >&2
fi

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
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$samples"; } # round variant speed bytes status
echo "throughput: $runs round(s) of $((size >> 20)) MiB, file served by $server_kind; $(machine_info)" >&2
for round in $(seq "$runs"); do
    # Rotate the order so no variant always runs first (after an idle pause) or last.
    n=${#variants[@]}
    for i in $(seq 0 $((n - 1))); do
        v=${variants[$(((i + round - 1) % n))]}
        out=$(fetch "$v" 2>"$BENCH_WORK/curl.err")
        rc=$?
        read -r speed got <<<"${out:-0 0}"
        if [ $rc = 0 ] && [ "$got" = "$size" ]; then
            status=ok
        elif [ "$got" -ge "$partial_min" ] 2>/dev/null; then
            status=partial
        else
            status=fail
        fi
        record "$round" "$v" "$speed" "$got" "$status"
        awk -v r="$round" -v v="$v" -v s="$speed" -v g="$got" -v st="$status" -v e="$(head -c 200 "$BENCH_WORK/curl.err")" \
            'BEGIN { printf "  round %s %-6s %.3f GB/s  %s (%.0f MiB)%s\n", r, v, s / 1e9, st, g / 1048576, (st == "ok" ? "" : "  " e) }' >&2
    done
done

mkdir -p "$BENCH_REPO/results"
python3 "$here/throughput-report.py" "$samples" "$BENCH_REPO/results/throughput.json" \
    --size "$size" --runs "$runs" --server "$server_kind" --nproc "$(nproc)" \
    --cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" --quick "$quick"
