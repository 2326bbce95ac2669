#!/usr/bin/env bash
# Usage: ./test_pool_performance.sh [--quick] [--runs R] [--no-build] [--workloads "open1 openn"]
#                                   [--extras "conc many names"]
#
# Runs the same anytls-bench workloads
#   bulk   (throughput: download then upload over a few parallel streams),
#   rr     (request/response, a NEW stream per request: streams/s and latency),
#   hold   (many long-lived streams with a trickle of traffic: failures),
#   open1 / openN  (new-stream latency on warm sessions: `hold` streams opened one at a
#          time, then N at once; the time from the SOCKS connect to the proxy's "connected"
#          answer, which for AnyTLS includes the server's SYNACK, so the outbound dial
#          or warm connection; N = 1,000, 200 in --quick)
# against, in one invocation and interleaved round by round:
#   direct                      (no proxy: the baseline),
#   each pool engine            (our pair, --pool-type X given to server and client; the
#                                engines as `anytls-server --list-pool-types` prints them),
#   crate / sing-box / mihomo   (the crates.io `anytls` 0.5.3, sing-box and mihomo pairs,
#                                each when installed; "SKIP <peer>: why" otherwise).
# Per variant: throughput (Gbit/s), new streams/s, latency p50/p90/p99, CPU time of the
# server and of the client (user + system from /proc/PID/stat around every run) per GiB
# moved (bulk) and per 1,000 requests (rr), peak RSS of server and client (VmHWM),
# TIME_WAIT sockets added by the rr workload, and TCP connections opened per 1,000 rr
# requests (/proc/net/snmp ActiveOpens: system-wide, so other activity adds noise).
# Our server runs with --max-outbound-connections 1000 (hold opens 400 streams to one target;
# the default cap of 100 would fail some of them by design).
# Both of our binaries log pool statistics every 2 s (--stats-interval-secs 2); the table
# shows the reuse rate of the server's last [Pool Stats] line (counted over the whole run).
# Prints a markdown table with ratios against direct; writes results/pool-performance.json
# and results/pool-performance.svg. Medians over R rounds; the load average is recorded
# with every run.
#   default: 3 rounds (a few minutes);  --quick: smaller workloads, 2 rounds, ~2 minutes.
# A workload is one name in `workloads` plus its case in run_one (and its numbers in
# scripts/pool-report.py). --workloads "" runs none of them (no main table), e.g. with
# --extras names to run only the many-names block. --extras picks the blocks run after
# the main table (concurrency, many targets, many names: see below); default all three.
# A pool type the binaries reject is reported as "SKIP pool-type X: <error>".
# Exit status: 0 when the runs happened (slow numbers or failed requests are reported, not
# fatal), 1 when no variant of ours could run or a row measured nothing (every round of a
# workload failed: a 0.00 there compares nothing), 2 on a build or set-up error.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"

runs=3 quick=0 build=1 runs_given=0 workloads=(bulk rr hold open1 openn) extras=(conc many names)
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --runs) runs=$2; runs_given=1; shift ;;
        --no-build) build=0 ;;
        --workloads) read -ra workloads <<<"$2"; shift ;; # a subset, in this order
        --extras) read -ra extras <<<"$2"; shift ;;
        -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
if [ $quick = 1 ]; then
    [ "$runs_given" = 1 ] || runs=2
    bulk=(--bytes 128M --streams 2) rr=(--requests 400 --concurrency 16 --size 1K)
    hold=(--streams 100 --seconds 2 --interval-ms 250) max_seconds=20
    open1=(--streams 30 --open-concurrency 1 --seconds 1 --interval-ms 1000)
    openn=(--streams 200 --open-concurrency 200 --seconds 1 --interval-ms 1000)
else
    bulk=(--bytes 512M --streams 4) rr=(--requests 2000 --concurrency 32 --size 1K)
    hold=(--streams 400 --seconds 6 --interval-ms 500) max_seconds=45
    open1=(--streams 200 --open-concurrency 1 --seconds 2 --interval-ms 1000)
    openn=(--streams 1000 --open-concurrency 1000 --seconds 3 --interval-ms 1000)
fi
rr_requests=${rr[1]}

bench_init anytls-pool-perf
started=$SECONDS
if [ $build = 1 ]; then build_release || die "cannot build"; fi
for b in anytls-server anytls-client anytls-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (build with cargo build --release --workspace --bins)"
done
# The engines come from the binary, so a new one is measured without editing this script.
pool_types_text=$("$BIN/anytls-server" --list-pool-types) || die "anytls-server --list-pool-types failed"
read -ra pool_types <<<"$(tr '\n' ' ' <<<"$pool_types_text")"

# --- targets and proxies ----------------------------------------------------------
start_targets target
echo_addr=$TARGET_ECHO http_addr=$TARGET_HTTP bulk_addr=$TARGET_BULK

stats_interval=2
variants=(direct)
declare -A socks=([direct]="") server_pid=() client_pid=()
for pool in "${pool_types[@]}"; do
    pool_args="--pool-type $pool --stats-interval-secs $stats_interval"
    # Default flags otherwise: the per-target cap (100) no longer refuses the hold
    # workload's streams beyond it, they are dialed outside the pool.
    if ! start_our_pair "$pool" "$pool_args" "$pool_args"; then
        echo "SKIP pool-type $pool: $PAIR_ERROR" >&2
        continue
    fi
    variants+=("$pool")
    socks[$pool]=$PAIR_SOCKS server_pid[$pool]=$PAIR_SERVER_PID client_pid[$pool]=$PAIR_CLIENT_PID
done
[ ${#variants[@]} -gt 1 ] || { echo "no pool type of ours could run" >&2; exit 1; }
add_peer_variants

# --- measuring ---------------------------------------------------------------------
results="$BENCH_WORK/results.jsonl"
: >"$results"
time_wait() { ss -tan state time-wait 2>/dev/null | tail -n +2 | wc -l; }
active_opens() { awk '/^Tcp:/ { if (h) { print $6; exit } h = 1 }' /proc/net/snmp; }
# field KEY JSON [PREFIX]: the first number after "KEY": (after PREFIX when given), 2 decimals.
field() {
    local v
    v=$(grep -oE "${3:-}[^}]*\"$1\":[0-9.]+" <<<"$2" | head -n1 | sed -E 's/.*://')
    [ -n "$v" ] && printf '%.2f' "$v" || printf '?'
}

mode_of() { case "$1" in open*) echo hold ;; *) echo "$1" ;; esac; } # workload -> anytls-bench mode
has_extra() { [[ " ${extras[*]} " == *" $1 "* ]]; } # has_extra conc|many|names: asked by --extras
is_ours() { [[ " ${pool_types[*]} " == *" $1 "* ]]; } # is_ours VARIANT: one of our engines
cpu_of() { [ -n "${1:-}" ] && cpu_seconds "$1"; } # cpu_of [PID]: "" for direct
delta() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "null"; else printf "%.2f", b - a }'; }

run_one() { # run_one ROUND VARIANT WORKLOAD: one anytls-bench run, one JSONL line
    local round=$1 v=$2 w=$3 route target args tw0 ao0 out rc summary s0 c0 scpu ccpu
    if [ -n "${socks[$v]}" ]; then route=(--socks "${socks[$v]}"); else route=(--direct); fi
    case "$w" in
        bulk) target=$bulk_addr args=("${bulk[@]}") ;;
        rr) target=$http_addr args=("${rr[@]}") ;;
        hold) target=$echo_addr args=("${hold[@]}") ;;
        open1) target=$echo_addr args=("${open1[@]}") ;;
        openn) target=$echo_addr args=("${openn[@]}") ;;
    esac
    tw0=$(time_wait) ao0=$(active_opens)
    s0=$(cpu_of "${server_pid[$v]:-}") c0=$(cpu_of "${client_pid[$v]:-}")
    out=$("$BIN/anytls-bench" "$(mode_of "$w")" "${route[@]}" --target "$target" "${args[@]}" --json --max-seconds "$max_seconds" \
        2>>"$BENCH_WORK/bench-stderr.log")
    rc=$?
    scpu=$(delta "$s0" "$(cpu_of "${server_pid[$v]:-}")") ccpu=$(delta "$c0" "$(cpu_of "${client_pid[$v]:-}")")
    local tw=$(($(time_wait) - tw0)) ao=$(($(active_opens) - ao0))
    [ -n "$out" ] || out='{"failed":1,"first_error":"anytls-bench printed nothing"}'
    printf '{"round":%s,"variant":"%s","workload":"%s","exit":%s,"time_wait_delta":%s,"active_opens_delta":%s,"server_cpu_s":%s,"client_cpu_s":%s,"loadavg":%s,"result":%s}\n' \
        "$round" "$v" "$w" "$rc" "$tw" "$ao" "$scpu" "$ccpu" "$(cut -d' ' -f1 /proc/loadavg)" "$out" >>"$results"
    case "$w" in
        bulk) summary="down $(field gbit_per_sec "$out" '"download":\{') Gbit/s, up $(field gbit_per_sec "$out" '"upload":\{') Gbit/s" ;;
        rr) summary="$(field streams_per_sec "$out") streams/s, p99 $(field p99 "$out") ms, +$tw TIME_WAIT, $ao opens" ;;
        hold) summary="$(field opened "$out") opened, echo p99 $(field p99 "$out" '"echo_ms":\{') ms" ;;
        open*) summary="$(field opened "$out") opened, open p50 $(field p50 "$out" '"open_ms":\{') ms p99 $(field p99 "$out" '"open_ms":\{') ms" ;;
    esac
    local failed
    failed=$(grep -oE '"failed":[0-9]+' <<<"$out" | tail -n1 | cut -d: -f2)
    [ "${failed:-0}" != 0 ] && summary+=", $failed FAILED"
    [ "$scpu" != null ] && summary+=", CPU s server $scpu client $ccpu"
    step=$((step + 1))
    printf '[%3d/%d %3ds] round %d %-8s %-4s %s\n' "$step" "$total" $((SECONDS - started)) "$round" "$v" "$w" "$summary" >&2
}

n=${#variants[@]}
total=$((runs * n * ${#workloads[@]})) step=0
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "pool performance: variants ${variants[*]}; $runs round(s)$([ $quick = 1 ] && echo ' (quick)'); $(machine_info); load $load_before" >&2
for round in $(seq "$runs"); do
    for w in "${workloads[@]}"; do
        # Rotate the order every round so no variant always goes first.
        for i in $(seq 0 $((n - 1))); do
            run_one "$round" "${variants[$(((i + round - 1) % n))]}" "$w"
        done
    done
done

# --- peak memory, pool statistics, report --------------------------------------------
vm_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo null; }
# One more stats interval, so that the last [Pool Stats] lines count every run.
[ ${#workloads[@]} = 0 ] || sleep $((stats_interval + 1))
rss="$BENCH_WORK/rss.tsv"
: >"$rss"
for v in "${variants[@]}"; do
    [ "$v" = direct ] && continue
    slog="$BENCH_WORK/$v-server.log" clog="$BENCH_WORK/$v-client.log"
    # variant, VmHWM server/client, note, server reuse %, server/client stats lines
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$(vm_hwm_kib "${server_pid[$v]}")" "$(vm_hwm_kib "${client_pid[$v]}")" \
        "" "$(pool_stat "$slog" "Reuse rate")" "$(pool_stats_line "$slog" | sed 's/.*\[Pool Stats\] //')" \
        "$(pool_stats_line "$clog" | sed 's/.*\[Pool Stats\] //')" >>"$rss"
    [ ${#workloads[@]} = 0 ] || ! is_ours "$v" || [ -n "$(pool_stats_line "$slog")" ] ||
        echo "NOTE $v: the server logged no [Pool Stats] line" >&2
done
mkdir -p "$here/results"
if [ ${#workloads[@]} = 0 ]; then
    echo "no main workloads (--workloads \"\"): no main table" >&2
else
    python3 "$here/scripts/pool-report.py" "$results" "$rss" --out-dir "$here/results" --rr-requests "$rr_requests" \
        --quick "$quick" --runs "$runs" --nproc "$(nproc)" --load "$load_before -> $(cut -d' ' -f1-3 /proc/loadavg)" \
        --cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    report=$?
    # 3: a row measured nothing (its FAIL lines say which); that is no comparison.
    [ $report = 3 ] && measured_nothing=1
    [ $report = 0 ] || [ $report = 3 ] || die "pool-report.py failed"
fi
# Slow numbers and failed requests are reported above; a proxy that died is an error.
dead=()
for v in "${variants[@]}"; do
    [ "$v" = direct ] && continue
    kill -0 "${server_pid[$v]}" 2>/dev/null || dead+=("$v server")
    kill -0 "${client_pid[$v]}" 2>/dev/null || dead+=("$v client")
done
echo "done in $((SECONDS - started)) s" >&2
[ ${#dead[@]} = 0 ] || { echo "ERROR: exited during the run: ${dead[*]} (KEEP=1 keeps the logs)" >&2; exit 1; }
[ "${measured_nothing:-0}" = 0 ] || { echo "ERROR: a comparison row measured nothing (FAIL lines above)" >&2; exit 1; }

# --- concurrency and many targets (new workloads, reported after the table) ----------------
# concurrency: N streams held open together through a FRESH pair with default flags (ours:
#   no flag beyond the listen address and password; sing-box's pair when installed), quiet
#   for 5 s, then echoing again (anytls-bench quiet). Reports refused/dropped streams and
#   RSS per held stream: (RSS with all N held - RSS before) / N, server and client.
#   Full run: 10,000 streams; --quick: 2,000. Needs 2 fds per stream in the client and in the
#   server (one session per stream, as the reference client does): the open-files limit is
#   raised first (up to 65,536 where allowed, else to the hard limit) and, when even that is
#   too low for the server's descriptors shared by connections and streams to cover the
#   wave (2 per stream, plus room for the bench's own and the client's), the wave is cut
#   to fit, with a note.
# many targets: request/response over thousands of distinct destinations (127.x.y.z:PORT of
#   one target listening on 0.0.0.0), through each pair above: per-target pool state is
#   where engines differ. Full run: 8,000 requests over 8,000 targets; --quick: 1,000.
# many names: the same with destinations sent as names t<i>.bench.test (anytls-bench rr
#   --target-names), $names_repeat requests in a row per name (in flight together), through a
#   FRESH pair of ours per engine whose server runs in a private mount namespace with
#   /etc/hosts bind-mounted to a generated file (anytls-bench hosts): the server's name
#   cache resolves every name through getaddrinfo, so its Lookups counter shows one lookup
#   per name (single-flight under the repeats) or not. Direct runs the same count on the
#   matching addresses, for TIME_WAIT. Then, on the same pair, $names_back_n other names
#   (t<i>.back.test) visited $names_back_visits times each, one visit after another: targets
#   that come back, which warming is for. Needs root for unshare --mount; "SKIP many
#   names: why" otherwise. Full run: 4,000 names; --quick: 500.
if [ $quick = 1 ]; then conc_streams=2000 many_targets=1000 names_n=500; else conc_streams=10000 many_targets=8000 names_n=4000; fi
names_repeat=2 names_back_n=50 names_back_visits=20
echo >&2
raise_fd_limit 65536
echo "concurrency and many targets: open-files limit $FD_LIMIT" >&2
conc_note=""
# The server shares its open-files limit, less 64 reserved and 1/32 for warm connections
# (at most 1,024), between client connections and streams (src/resources.rs): one session
# per stream takes 2, so a wave above half of that would be refused by design.
usable=$((FD_LIMIT - 64)) warm=$(((FD_LIMIT - 64) / 32))
[ "$warm" -le 1024 ] || warm=1024
shared=$((usable - warm))
if [ $((conc_streams * 2 + 512)) -gt "$shared" ]; then
    conc_note=" (cut from $conc_streams: the open-files limit $FD_LIMIT leaves the server $shared descriptors for connections and streams, 2 per stream)"
    conc_streams=$(((shared - 512) / 2 / 100 * 100))
fi
start_targets_on wide-target 0.0.0.0:0
wide_echo=$TARGET_ECHO wide_http_port=${TARGET_HTTP##*:}
conc_rows=()
concurrency_of() { # concurrency_of LABEL: PAIR_* set; one quiet wave, one table row
    local label=$1 s0 c0 s1 c1 out log="$BENCH_WORK/conc-$1.err"
    sleep 1
    s0=$(rss_kib "$PAIR_SERVER_PID") c0=$(rss_kib "$PAIR_CLIENT_PID") s1="" c1=""
    "$BIN/anytls-bench" quiet --socks "$PAIR_SOCKS" --target "$wide_echo" --streams "$conc_streams" --quiet-secs 5 \
        --max-seconds 240 --json >"$BENCH_WORK/conc-$label.json" 2>"$log" &
    local qpid=$!
    if wait_log "$log" '^held [0-9]+ streams' 230 "$qpid"; then
        s1=$(rss_kib "$PAIR_SERVER_PID") c1=$(rss_kib "$PAIR_CLIENT_PID")
    fi
    wait "$qpid"
    out=$(cat "$BENCH_WORK/conc-$label.json")
    local why
    why=$(grep -oE '"first_[a-z]+":"[^"]*"' <<<"$out" | head -n1 | cut -d'"' -f4 | cut -c1-80)
    per() { [ -n "$2" ] && awk -v a="$1" -v b="$2" -v n="$conc_streams" 'BEGIN { printf "%.1f", (b - a) / n }' || echo "?"; }
    conc_rows+=("| $label | $conc_streams | $(json_num survived "$out") | $(json_num refused "$out") | \
$(json_num dropped "$out") | $(mib "$s1") | $(per "$s0" "$s1") | $(mib "$c1") | $(per "$c0" "$c1") | $why |")
    echo "concurrency $label: $(sed -E 's/"open_ms".*//' <<<"$out")" >&2
}
if has_extra conc; then
    if start_our_pair conc-ours "" ""; then
        concurrency_of ours
        kill "$PAIR_SERVER_PID" "$PAIR_CLIENT_PID" 2>/dev/null
    else
        echo "SKIP concurrency ours: $PAIR_ERROR" >&2
    fi
    if singbox_installed; then
        if start_singbox_pair conc-singbox; then
            concurrency_of sing-box
            kill "$PAIR_SERVER_PID" "$PAIR_CLIENT_PID" 2>/dev/null
        else
            echo "SKIP concurrency sing-box: $PAIR_ERROR" >&2
        fi
    else
        echo "SKIP concurrency sing-box: not installed (scripts/install-peers.sh)" >&2
    fi
fi
many_rows=() many_variants=()
! has_extra many || many_variants=("${variants[@]}")
for v in "${many_variants[@]}"; do
    if [ -n "${socks[$v]}" ]; then route=(--socks "${socks[$v]}"); else route=(--direct); fi
    # Our servers' warm connections over the workload (counters from their stats lines,
    # logged every $stats_interval s): dialed ahead of demand, and closed unused.
    slog="$BENCH_WORK/$v-server.log" warm0="" unused0=""
    if [ -f "$slog" ]; then warm0=$(pool_stat "$slog" Warmed) unused0=$(pool_stat "$slog" Unused); fi
    tw0=$(time_wait)
    out=$("$BIN/anytls-bench" rr "${route[@]}" --target "127.0.0.1:$wide_http_port" --requests "$many_targets" \
        --distinct-targets "$many_targets" --concurrency 32 --max-seconds 120 --json 2>>"$BENCH_WORK/bench-stderr.log")
    tw_per_k=$(awk -v t="$(($(time_wait) - tw0))" -v n="$many_targets" 'BEGIN { printf "%.0f", t * 1000 / n }')
    warmed="-" unused="-"
    if [ -n "$warm0" ]; then
        sleep $((stats_interval + 1))
        warmed=$(($(pool_stat "$slog" Warmed) - warm0)) unused=$(($(pool_stat "$slog" Unused) - ${unused0:-0}))
    fi
    many_rows+=("| $v | $many_targets | $(json_num ok "$out") | $(json_num failed "$out") | \
$(printf '%.0f' "$(json_num streams_per_sec "$out")") | $(grep -oE '"p99":[0-9.]+' <<<"$out" | head -n1 | cut -d: -f2) | \
$tw_per_k | $warmed | $unused |")
    echo "many targets $v: $out" >&2
done
names_rows=() names_skip=""
names_suffix=bench.test names_hosts="$BENCH_WORK/hosts"
if ! has_extra names; then
    names_skip="not asked (--extras)"
elif [ "$(id -u)" != 0 ]; then
    names_skip="not root (unshare --mount and mount --bind need it)"
elif ! { echo "127.0.0.1 localhost"; "$BIN/anytls-bench" hosts --distinct-targets "$names_n" --target-names "$names_suffix" &&
    "$BIN/anytls-bench" hosts --distinct-targets "$names_back_n" --target-names back.test; } >"$names_hosts"; then
    names_skip="anytls-bench hosts failed"
elif ! unshare --mount sh -c 'mount --bind "$0" /etc/hosts' "$names_hosts" 2>"$BENCH_WORK/unshare.err"; then
    names_skip="unshare --mount failed: $(head -c 200 "$BENCH_WORK/unshare.err")"
fi
names_requests=$((names_n * names_repeat)) names_back_requests=$((names_back_n * names_back_visits))
names_bench=(--target "127.0.0.1:$wide_http_port" --requests "$names_requests" --distinct-targets "$names_n"
    --repeat "$names_repeat" --concurrency 32 --max-seconds 90 --json)
names_back_bench=(--target "127.0.0.1:$wide_http_port" --requests "$names_back_requests"
    --distinct-targets "$names_back_n" --concurrency 32 --max-seconds 90 --json)
# names_row LABEL OUT TW REQUESTS NAMES [SLOG S0...]: one table row; S0 = Lookups Warmed Reused
# Unused before the run.
names_row() {
    local label=$1 out=$2 tw=$3 requests=$4 names=$5 slog=${6:-} tw_per_k lookups="-" per_name="-" warmed="-" reused="-" unused="-" idle="-" pct="-" never="-"
    tw_per_k=$(awk -v t="$tw" -v n="$requests" 'BEGIN { printf "%.0f", t * 1000 / n }')
    if [ -n "$slog" ]; then
        local v=() f
        for f in Lookups Warmed Reused Unused; do v+=("$(pool_stat "$slog" "$f")"); done
        lookups=$((${v[0]:-0} - $7)) warmed=$((${v[1]:-0} - $8)) reused=$((${v[2]:-0} - $9)) unused=$((${v[3]:-0} - ${10}))
        # Warm connections neither handed out nor closed yet: still idle, and in a bounded
        # workload never to be used (closed unused when the idle time runs out).
        idle=$((warmed - reused - unused))
        [ "$idle" -ge 0 ] || idle=0
        per_name=$(awk -v l="$lookups" -v n="$names" 'BEGIN { printf "%.2f", l / n }')
        pct=$(awk -v u="$unused" -v w="$warmed" 'BEGIN { if (w > 0) printf "%.0f%%", u * 100 / w; else print "-" }')
        never=$(awk -v u="$((unused + idle))" -v w="$warmed" 'BEGIN { if (w > 0) printf "%.0f%%", u * 100 / w; else print "-" }')
    fi
    names_rows+=("| $label | $requests | $(json_num ok "$out") | $(json_num failed "$out") | $names | $lookups | \
$per_name | $tw_per_k | $warmed | $reused | $unused | $pct | $idle | $never |")
    echo "many names $label: $out" >&2
}
if [ -n "$names_skip" ]; then
    has_extra names && echo "SKIP many names: $names_skip" >&2
else
    tw0=$(time_wait)
    out=$("$BIN/anytls-bench" rr --direct "${names_bench[@]}" 2>>"$BENCH_WORK/bench-stderr.log")
    names_row "direct (addresses)" "$out" $(($(time_wait) - tw0)) "$names_requests" "$names_n"
    # The server execs in its own mount namespace: its PID is unshare's, so kill works.
    # shellcheck disable=SC2016 # $0 and $@ belong to the inner sh
    SERVER_PREFIX=(unshare --mount sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$names_hosts")
    for v in "${variants[@]}"; do
        is_ours "$v" || continue
        pool_args="--pool-type $v --stats-interval-secs $stats_interval"
        if ! start_our_pair "names-$v" "$pool_args" "$pool_args"; then
            echo "SKIP many names $v: $PAIR_ERROR" >&2
            continue
        fi
        if [ "$(readlink "/proc/$PAIR_SERVER_PID/exe")" != "$(readlink -f "$BIN/anytls-server")" ]; then
            echo "SKIP many names $v: PID $PAIR_SERVER_PID is not the server" >&2
            kill "$PAIR_SERVER_PID" "$PAIR_CLIENT_PID" 2>/dev/null
            continue
        fi
        slog="$BENCH_WORK/names-$v-server.log"
        wait_log "$slog" '\[Pool Stats\]' $((stats_interval + 3)) "$PAIR_SERVER_PID" ||
            echo "NOTE many names $v: no [Pool Stats] line yet" >&2
        s0=()
        for f in Lookups Warmed Reused Unused; do s0+=("$(pool_stat "$slog" "$f")"); done
        tw0=$(time_wait)
        out=$("$BIN/anytls-bench" rr --socks "$PAIR_SOCKS" --target-names "$names_suffix" "${names_bench[@]}" \
            2>>"$BENCH_WORK/bench-stderr.log")
        tw=$(($(time_wait) - tw0))
        sleep $((stats_interval + 1)) # a stats line logged after the last request
        names_row "$v, $names_repeat in a row" "$out" "$tw" "$names_requests" "$names_n" "$slog" "${s0[0]:-0}" "${s0[1]:-0}" "${s0[2]:-0}" "${s0[3]:-0}"
        # Targets that come back: the same counters over the second shape.
        s0=()
        for f in Lookups Warmed Reused Unused; do s0+=("$(pool_stat "$slog" "$f")"); done
        tw0=$(time_wait)
        out=$("$BIN/anytls-bench" rr --socks "$PAIR_SOCKS" --target-names back.test "${names_back_bench[@]}" \
            2>>"$BENCH_WORK/bench-stderr.log")
        tw=$(($(time_wait) - tw0))
        sleep $((stats_interval + 1))
        names_row "$v, $names_back_visits visits" "$out" "$tw" "$names_back_requests" "$names_back_n" "$slog" "${s0[0]:-0}" "${s0[1]:-0}" "${s0[2]:-0}" "${s0[3]:-0}"
        kill "$PAIR_SERVER_PID" "$PAIR_CLIENT_PID" 2>/dev/null
    done
    SERVER_PREFIX=()
fi
if has_extra conc; then
    echo
    echo "Concurrency: $conc_streams streams held together$conc_note, quiet 5 s, default flags ($(date -u +%F), $(nproc) cores)"
    echo
    echo "| pair | streams | survived | refused | dropped | server RSS held MiB | server KiB/stream | client RSS held MiB | client KiB/stream | first error |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${conc_rows[@]}"
fi
if has_extra many; then
    echo
    echo "Many targets: $many_targets requests (1 KiB responses), each to a different destination, 32 at a time"
    echo
    echo "| variant | requests | ok | failed | streams/s | latency p99 ms | TIME_WAIT per 1k req | warm dialed | warm closed unused |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${many_rows[@]}"
fi
if ! has_extra names; then
    :
elif [ -n "$names_skip" ]; then
    echo
    echo "Many names: SKIP ($names_skip)"
else
    echo
    echo "Many names: $names_requests requests over $names_n names t<i>.$names_suffix ($names_repeat in a row each, 32 at a time), \
then $names_back_requests over $names_back_n names t<i>.back.test ($names_back_visits visits each, one after another), resolved \
by the server from a private /etc/hosts; direct: the first shape's destinations as addresses"
    echo
    echo "| variant | requests | ok | failed | distinct names | lookups | lookups per name | TIME_WAIT per 1k req | warmed | served warm | closed unused | unused % of warmed | warm idle at end | never used % of warmed |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${names_rows[@]}"
fi
