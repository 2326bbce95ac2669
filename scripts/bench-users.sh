#!/usr/bin/env bash
# What users cost the release server (docs/users.md, "Scale"):
#   1. builds the release binaries;
#   2. `cargo bench --bench users`: the median time of one authentication with 1, 1,000 and
#      100,000 users (and the ratio 100,000 / 1), and the memory per user the bench prints;
#   3. starts the release anytls-server on loopback with the admin API and a fresh state
#      directory, adds N users (default 10,000) through POST /api/admin/users, 16 requests at
#      a time, checks that GET /api/admin/users lists them all, and reads the server's RSS
#      before and after (bytes per user as the process sees it);
#   4. one request through the release anytls-client as one of the added users.
# Prints a summary block at the end.
#
#   scripts/bench-users.sh [--quick] [--users N] [--clients C]
#
# --quick: criterion's --quick with short warm-up and measurement times, and 1,000 users
# through the API (under a minute once the build is done).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"

quick=0 adds=10000 clients=16 adds_given=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --users) adds=$2 adds_given=1; shift ;;
        --clients) clients=$2; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ "$quick" = 1 ] && [ "$adds_given" = 0 ] && adds=1000
[[ "$adds" =~ ^[1-9][0-9]{0,4}$ ]] || die "--users: 1 to 99999 (names are userNNNNN)"
[[ "$clients" =~ ^[1-9][0-9]?$ ]] || die "--clients: 1 to 99"
for tool in python3 curl timeout; do command -v "$tool" >/dev/null || die "$tool is needed"; done

bench_init anytls-bench-users
log() { echo "[bench-users $(date +%T)] $*" >&2; }

# --- 1. release build (every step below has its own time limit) ---
log "cargo build --release --workspace --bins ..."
if ! (cd "$BENCH_REPO" && timeout 1800 cargo build --release --workspace --bins >"$BENCH_WORK/build.log" 2>&1); then
    tail -n 30 "$BENCH_WORK/build.log" >&2
    die "release build failed (or took over 30 min)"
fi
for b in anytls-server anytls-client anytls-bench; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing after the build"
done

# --- 2. criterion: authentication at 1, 1,000, 100,000 users; memory per user ---
criterion_args=()
[ "$quick" = 1 ] && criterion_args=(--quick --warm-up-time 1 --measurement-time 2)
# A fresh CRITERION_HOME: the medians read below are this run's, not an older run's.
export CRITERION_HOME="$BENCH_WORK/criterion"
log "cargo bench --bench users -- ${criterion_args[*]} ..."
if ! (cd "$BENCH_REPO" && timeout 1800 cargo bench --bench users -- "${criterion_args[@]}" \
    >"$BENCH_WORK/bench.log" 2>&1); then
    tail -n 30 "$BENCH_WORK/bench.log" >&2
    die "cargo bench --bench users failed (or took over 30 min)"
fi
bench_memory=$(grep -m1 '^memory: ' "$BENCH_WORK/bench.log" || echo "memory: (the bench printed no memory line)")
# median_ns N: criterion's median estimate for N users, in ns.
median_ns() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["median"]["point_estimate"])' \
        "$CRITERION_HOME/authenticate/$1/new/estimates.json"
}
declare -A auth_ns
for n in 1 1000 100000; do
    auth_ns[$n]=$(median_ns "$n") || die "no criterion estimate for $n users (see $BENCH_WORK/bench.log)"
done
auth_lines=$(for n in 1 1000 100000; do
    awk -v n="$n" -v t="${auth_ns[$n]}" 'BEGIN { printf "auth %7d users: %8.1f ns per authentication (median)\n", n, t }'
done)
auth_ratio=$(awk -v a="${auth_ns[100000]}" -v b="${auth_ns[1]}" \
    'BEGIN { printf "auth ratio 100,000 users / 1 user: %.2f", a / b }')
log "bench done"
echo "$auth_lines" >&2
echo "$auth_ratio" >&2
echo "$bench_memory" >&2

# --- 3. adds through the admin API of the release server ---
token="admin-$RANDOM$RANDOM$RANDOM"
salt="$RANDOM$RANDOM"
mkdir -p "$BENCH_WORK/state"
start_bg server "$BIN/anytls-server" -l 127.0.0.1:0 --api 127.0.0.1:0 --admin-token "$token" \
    --state-dir "$BENCH_WORK/state" -p "$BENCH_PASSWORD"
spid=$BG_PID
wait_log "$BENCH_WORK/server.log" 'listening on ' 20 "$spid" &&
    wait_log "$BENCH_WORK/server.log" 'api on ' 20 "$spid" ||
    die "server did not start: $(why_exited server)"
server_addr=$(sed -nE 's/.*listening on ([0-9.]+:[0-9]+).*/\1/p' "$BENCH_WORK/server.log" | head -n1)
api_addr=$(sed -nE 's/.*api on ([0-9.]+:[0-9]+).*/\1/p' "$BENCH_WORK/server.log" | head -n1)
[ -n "$server_addr" ] && [ -n "$api_addr" ] || die "no addresses in the server's log: $(head -c 600 "$BENCH_WORK/server.log")"
log "server pid $spid on $server_addr, api on $api_addr, state dir $BENCH_WORK/state"

# users.py MODE: "add" adds the users (one keep-alive connection per client thread) and
# prints "SECONDS ERRORS FIRST_ERROR"; "count" prints how many of them the list shows.
cat >"$BENCH_WORK/users.py" <<'PY'
import http.client, json, sys, threading, time, urllib.parse

mode, api, token, count, clients, salt = sys.argv[1:7]
count, clients = int(count), int(clients)
host, port = api.rsplit(":", 1)
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}

def name(i):
    return "user%05d" % i

def request(conn, method, path, body=None):
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()

if mode == "count":
    # Pages of 10,000 from the start: the -p user sorts first and takes a place in the first.
    conn, listed, after = http.client.HTTPConnection(host, int(port), timeout=60), set(), None
    for _ in range(count // 10000 + 2):
        path = "/api/admin/users?limit=10000" + ("&after=" + urllib.parse.quote(after, safe="") if after else "")
        status, body = request(conn, "GET", path)
        if status != 200:
            sys.exit("GET %s: %d %s" % (path, status, body[:200]))
        page = json.loads(body)
        listed.update(u["name"] for u in page["users"])
        after = page.get("next")
        if not after:
            break
    print(sum(name(i) in listed for i in range(count)))
    sys.exit(0)

errors, first_error, lock = [0], [""], threading.Lock()

def fail(why):
    with lock:
        errors[0] += 1
        first_error[0] = first_error[0] or why

def worker(w):
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    for i in range(w, count, clients):
        body = json.dumps({"name": name(i), "password": "pw-%s-%05d" % (salt, i)})
        for attempt in range(3):  # a dropped keep-alive connection is reopened, at most twice
            try:
                status, answer = request(conn, "POST", "/api/admin/users", body)
                if status != 201:
                    fail("%s: %d %s" % (name(i), status, answer[:200].decode(errors="replace")))
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                if attempt == 2:
                    fail("%s: %r" % (name(i), e))
    conn.close()

start = time.monotonic()
threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("%.3f %d %s" % (time.monotonic() - start, errors[0], first_error[0] or "-"))
PY
users_py() { timeout 600 python3 "$BENCH_WORK/users.py" "$1" "$api_addr" "$token" "$adds" "$clients" "$salt"; }

# The API's first answers allocate what every later one reuses: warm it before the baseline.
users_py count >/dev/null || die "the admin API does not answer: $(why_exited server)"
sleep 1
rss_before=$(rss_kib "$spid")
log "adding $adds users, $clients at a time ..."
read -r add_s add_errors add_first_error < <(users_py add) || die "adding users failed"
[ "$add_errors" = 0 ] || die "$add_errors adds failed; the first: $add_first_error"
sleep 1 # let the last answers' buffers settle before reading RSS
rss_after=$(rss_kib "$spid")
listed=$(users_py count) || die "listing the users failed"
[ "$listed" = "$adds" ] || die "GET /api/admin/users lists $listed of the $adds users added"
adds_line=$(awk -v n="$adds" -v s="$add_s" -v c="$clients" \
    'BEGIN { printf "adds: %d users in %.2f s (%.0f/s, %d at a time, each durable)", n, s, n / s, c }')
rss_line=$(awk -v a="$rss_before" -v b="$rss_after" -v n="$adds" \
    'BEGIN { printf "server RSS: %.1f MiB -> %.1f MiB (%.0f bytes per user)", a / 1024, b / 1024, (b - a) * 1024 / n }')
log "$adds_line; all $listed listed"
log "$rss_line"

# --- 4. one request through the release client as the last user added ---
start_targets target
last=$((adds - 1))
user=$(printf user%05d "$last")
start_bg client "$BIN/anytls-client" -l 127.0.0.1:0 -s "$server_addr" -p "pw-$salt-${user#user}" \
    --sni localhost --insecure
cpid=$BG_PID
if wait_log "$BENCH_WORK/client.log" 'proxy on ' 20 "$cpid"; then
    socks=$(sed -nE 's/.*proxy on ([0-9.]+:[0-9]+).*/\1/p' "$BENCH_WORK/client.log" | head -n1)
    # The first request opens the session: TCP, TLS and the password's check on the server.
    first=$(curl -sS --max-time 20 -o /dev/null -w '%{http_code} %{time_total}' --socks5 "$socks" \
        "http://$TARGET_HTTP/bytes/1024") || die "request as $user through the client failed ($(why_exited server))"
    read -r code secs <<<"$first"
    [ "$code" = 200 ] || die "request as $user answered $code"
    auth_line=$(awk -v s="$secs" -v u="$user" 'BEGIN { printf "real authentication: first request as %s through " \
        "the client (TCP + TLS + auth + 1 KiB) in %.1f ms", u, s * 1000 }')
else
    auth_line="real authentication: skipped, the client did not start: $(why_exited client)"
fi
log "$auth_line"

echo
echo "== bench-users summary ($([ "$quick" = 1 ] && echo quick || echo full); $(machine_info)) =="
echo "$adds_line"
echo "$rss_line"
echo "$auth_lines"
echo "$auth_ratio"
echo "bench $bench_memory"
echo "$auth_line"
