#!/usr/bin/env bash
# Usage: ./test_connection_pool.sh [--no-build] [--pool-types "TYPE ..."]  (default: every engine,
#        as `anytls-server --list-pool-types` prints them)
#
# Functional test of the pools, end to end over loopback (< 2 minutes). Builds the release
# binaries once, starts three `anytls-bench target`s, then for each --pool-type starts
# anytls-server and anytls-client with that pool type (stats every 1 s, warm/idle time 2 s,
# 2 warm connections per target) and checks, from their [Pool Stats] / [Pool Status] lines:
#   - sequential and concurrent requests to one target succeed; the server reuses warm
#     connections (Reused > 0, "Reuse rate:" printed, New a minority of Total);
#   - concurrent requests to three targets succeed; the status line lists all three;
#   - the client reuses its sessions (Reused > 0);
#   - after more than 2 s without traffic the warm connections are cleaned (Cleaned grows)
#     and the status line becomes {};
#   - a request to a dead target (a closed loopback port) fails with a SOCKS5 error, and a
#     following request to a live target works; both processes are still running.
# Prints one PASS/FAIL line per check and "test_connection_pool: N passed, M failed";
# exits 1 when a check failed, 2 when the test could not run. Everything started here is
# stopped on exit (KEEP=1 keeps the temp dir with the logs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"

build=1 pool_types=""
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --pool-types) pool_types=$2; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done

bench_init anytls-pool-test
started=$SECONDS
if [ $build = 1 ]; then build_release || die "cannot build"; fi
for b in anytls-server anytls-client anytls-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (build with cargo build --release --workspace --bins)"
done
# The engines come from the binary, so a new one is tested without editing this script.
[ -n "$pool_types" ] || pool_types=$("$BIN/anytls-server" --list-pool-types | tr '\n' ' ') ||
    die "anytls-server --list-pool-types failed"

passed=0 failed=0
# check NAME DETAIL CMD...: runs CMD; PASS or FAIL line with DETAIL.
check() {
    local name=$1 detail=$2
    shift 2
    if "$@"; then
        passed=$((passed + 1))
        printf 'PASS %-9s %s (%s)\n' "$pool" "$name" "$detail"
    else
        failed=$((failed + 1))
        printf 'FAIL %-9s %s (%s)\n' "$pool" "$name" "$detail"
    fi
}

# rr NAME TARGET REQUESTS CONCURRENCY: anytls-bench rr through the client; its JSON line
# is in $BENCH_WORK/NAME.json, its stderr in NAME.err; returns its exit status.
rr() {
    "$BIN/anytls-bench" rr --socks "$socks" --target "$2" --requests "$3" --concurrency "$4" --size 1K \
        --max-seconds 20 --json >"$BENCH_WORK/$1.json" 2>"$BENCH_WORK/$1.err"
}
rr_ok() { grep -oE '"ok":[0-9]+' "$BENCH_WORK/$1.json" | cut -d: -f2; }
rr_error() { grep -oE '"first_error":"[^"]*"' "$BENCH_WORK/$1.json" | cut -d'"' -f4; }
rr_summary() { echo "$(rr_ok "$1")/$2 ok$(e=$(rr_error "$1"); [ -z "$e" ] || echo ", first error: $e")"; }

# wait_stats LOG: waits for a stats line newer than now (the interval is 1 s).
wait_stats() {
    local before
    before=$(pool_stats_count "$1")
    for _ in $(seq 40); do
        [ "$(pool_stats_count "$1")" -gt "$before" ] && return 0
        sleep 0.1
    done
    return 1
}
is_gt() { [ -n "$1" ] && awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }
is_lt() { [ -n "$1" ] && awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
is_true() { [ "$1" = 1 ]; }
lists_targets() { local t; for t in "${http[@]}"; do grep -qF "\"$t\": " <<<"$1" || return 1; done; }
both_alive() { kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; }
failed_with_socks_error() { [ "$1" = 1 ] && grep -q 'SOCKS5 CONNECT.*failed' <<<"$2"; }

pool=setup
http=()
for i in 1 2 3; do
    start_targets "target$i"
    http+=("$TARGET_HTTP")
done
read -r dead_port < <(free_ports 1) # nothing listens there: connections are refused
dead="127.0.0.1:$dead_port"
echo "test_connection_pool: pool types $pool_types; targets ${http[*]}; dead target $dead; $(machine_info)"

for pool in $pool_types; do
    server_args="--pool-type $pool --stats-interval-secs 1 --max-idle-time-secs 2 --min-idle-connections 2"
    client_args="--pool-type $pool --stats-interval-secs 1 --idle-session-timeout-secs 2"
    client_args+=" --idle-session-check-interval-secs 1 --min-idle-session 2"
    if ! start_our_pair "$pool" "$server_args" "$client_args"; then
        check "pair starts" "$PAIR_ERROR" false
        continue
    fi
    socks=$PAIR_SOCKS slog="$BENCH_WORK/$pool-server.log" clog="$BENCH_WORK/$pool-client.log"
    check "server logs its pool type" "$(grep -o 'outbound pool: type [a-z]*' "$slog" || echo 'no pool line')" \
        grep -q "outbound pool: type $pool," "$slog"

    # --- one target, then three ---------------------------------------------------------
    rr "$pool-seq" "${http[0]}" 20 1 && ok=1 || ok=0
    check "20 sequential requests, one target" "$(rr_summary "$pool-seq" 20)" is_true "$ok"
    rr "$pool-conc" "${http[0]}" 40 4 && ok=1 || ok=0
    check "40 requests 4 at a time, one target" "$(rr_summary "$pool-conc" 40)" is_true "$ok"
    ok=1 pids=()
    for i in 0 1 2; do
        rr "$pool-multi$i" "${http[$i]}" 15 2 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || ok=0; done
    check "15 requests each to three targets at once" \
        "$(for i in 0 1 2; do rr_summary "$pool-multi$i" 15; done | paste -sd';' | sed 's/;/; /g')" is_true "$ok"

    wait_stats "$slog" || true
    wait_stats "$clog" || true
    line=$(pool_stats_line "$slog")
    check "server stats line printed" "${line:-none}" grep -q 'Reuse rate: [0-9.]*%' <<<"$line"
    total=$(pool_stat "$slog" Total) new=$(pool_stat "$slog" New)
    check "server reuses warm connections" "Reused $(pool_stat "$slog" Reused)" is_gt "$(pool_stat "$slog" Reused)" 0
    check "server dials few on demand" "New $new of Total $total" is_lt "${new:-999999}" "$(((${total:-0} + 1) / 2))"
    status=$(pool_status "$slog")
    check "server status lists the three targets" "${status:-none}" lists_targets "$status"
    check "client reuses sessions" "$(pool_stats_line "$clog" | sed 's/.*\] //')" \
        is_gt "$(pool_stat "$clog" Reused)" 0

    # --- idle: warm connections are cleaned, targets let go --------------------------------
    cleaned0=$(pool_stat "$slog" Cleaned)
    for _ in $(seq 80); do # up to 8 s; 2 s idle time + sweep + stats interval
        [ "$(pool_status "$slog")" = "{}" ] && is_gt "$(pool_stat "$slog" Cleaned)" "$cleaned0" && break
        sleep 0.1
    done
    check "idle warm connections cleaned" "Cleaned $cleaned0 -> $(pool_stat "$slog" Cleaned)" \
        is_gt "$(pool_stat "$slog" Cleaned)" "${cleaned0:-0}"
    check "status empty after idling" "$(pool_status "$slog")" [ "$(pool_status "$slog")" = "{}" ]

    # --- a dead target -----------------------------------------------------------------
    rr "$pool-dead" "$dead" 1 1 && ok=0 || ok=1
    check "request to a dead target fails with a SOCKS5 error" "$(rr_error "$pool-dead" || echo 'no error')" \
        failed_with_socks_error $ok "$(rr_error "$pool-dead")"
    rr "$pool-after" "${http[1]}" 5 1 && ok=1 || ok=0
    check "a live target works after the dead one" "$(rr_summary "$pool-after" 5)" is_true "$ok"
    check "server and client still running" "pids $PAIR_SERVER_PID $PAIR_CLIENT_PID" \
        both_alive "$PAIR_SERVER_PID" "$PAIR_CLIENT_PID"

    kill "$PAIR_SERVER_PID" "$PAIR_CLIENT_PID" 2>/dev/null || true
done

echo "test_connection_pool: $passed passed, $failed failed ($((SECONDS - started)) s)"
if [ $failed -gt 0 ]; then
    echo "logs: rerun with KEEP=1 to keep $BENCH_WORK" >&2
    exit 1
fi
