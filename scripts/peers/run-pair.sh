#!/usr/bin/env bash
# Usage: run-pair.sh CLIENT SERVER [REQUESTS]
#   CLIENT: singbox | mihomo | crate | probe      (probe = anytls-wire.py probe-client)
#   SERVER: singbox | mihomo | crate | capture | capture-v2   (capture = anytls-wire.py
#           capture-server playing a v1 / v2 server and logging what the client sends)
#   REQUESTS: sequential curl requests through the client (default 3; >1 exercises
#             session reuse).
# Starts a python http.server target, the server, the client, all on 127.0.0.1 with free
# ports, then fetches http://127.0.0.1:TARGET/ through the client's SOCKS5 port with curl.
# Prints "PASS CLIENT->SERVER" (exit 0) or "FAIL CLIENT->SERVER: why" plus the logs (exit 1).
# Every process it starts is stopped before it exits. KEEP=1 keeps the work dir.
# Env: PROBE_ARGS (extra anytls-wire.py probe-client options, e.g. --fin), PEER_LOG_LEVEL (default info here, logs go to files), RUN_PAIR_TIMEOUT (port wait, s).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/_common.sh"
[ $# -ge 2 ] || die "usage: $0 CLIENT SERVER [REQUESTS]"
client=$1 server=$2 requests=${3:-3}
export PEER_LOG_LEVEL="${PEER_LOG_LEVEL:-info}"
wait_s="${RUN_PAIR_TIMEOUT:-20}"
password="interop-pass"
name="$client->$server"

work=$(mktemp -d "${TMPDIR:-/tmp}/anytls-pair.XXXXXX")
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    # bounded wait: SIGKILL whatever is still there after 5 s
    for _ in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    wait 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "FAIL $name: $*"
    local f
    for f in "$work"/*.log; do
        [ -s "$f" ] || continue
        echo "--- $(basename "$f") (last 25 lines)"
        tail -n 25 "$f"
    done
    exit 1
}

# certificate
if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$work/key.pem" -out "$work/cert.pem" >/dev/null 2>&1; then
    fail "openssl could not make a test certificate"
fi

read -r tport sport cport < <(python3 "$here/free-port.py" 3 | tr '\n' ' ')
mkdir -p "$work/www"
body="anytls-interop-$RANDOM$RANDOM"
echo "$body" > "$work/www/index.html"
python3 -m http.server -b 127.0.0.1 -d "$work/www" "$tport" >"$work/target.log" 2>&1 &
pids+=($!)
wait_port "$tport" "$wait_s" "$!" || fail "http target did not start"

start_server() { # exec, so that the background PID is the server itself
case "$server" in
    singbox) exec "$here/singbox-server.sh" "$sport" "$password" "$work/cert.pem" "$work/key.pem" "$work/server" ;;
    mihomo) exec "$here/mihomo-server.sh" "$sport" "$password" "$work/cert.pem" "$work/key.pem" "$work/server" ;;
    crate) exec "$here/anytls-crate-server.sh" "$sport" "$password" ;;
    capture) exec python3 "$here/anytls-wire.py" capture-server --port "$sport" --cert "$work/cert.pem" \
                 --key "$work/key.pem" --password "$password" --seconds 120 ;;
    capture-v2) exec python3 "$here/anytls-wire.py" capture-server --v2 --port "$sport" --cert "$work/cert.pem" \
                 --key "$work/key.pem" --password "$password" --seconds 120 ;;
    *) die "unknown server kind: $server" ;;
esac
}
start_server >"$work/server.log" 2>&1 &
spid=$!
pids+=($spid)
wait_port "$sport" "$wait_s" "$spid" || fail "server did not start"

if [ "$client" = probe ]; then
    python3 "$here/anytls-wire.py" probe-client --port "$sport" --password "$password" \
        --target-port "$tport" --streams "$requests" ${PROBE_ARGS:-} >"$work/client.log" 2>&1
    ok=$(grep -c "\"body\": \"[^\"]*$body" "$work/client.log")
    [ "$ok" = "$requests" ] || fail "probe got $ok of $requests answers"
    [ -n "${CAPTURE_TO:-}" ] && cp "$work/client.log" "$CAPTURE_TO"
    echo "PASS $name ($requests streams)"
    exit 0
fi

start_client() {
case "$client" in
    singbox) exec "$here/singbox-client.sh" "$cport" "$sport" "$password" "$work/client" ;;
    mihomo) exec "$here/mihomo-client.sh" "$cport" "$sport" "$password" "$work/client" ;;
    crate) exec "$here/anytls-crate-client.sh" "$cport" "$sport" "$password" ;;
    *) die "unknown client kind: $client" ;;
esac
}
start_client >"$work/client.log" 2>&1 &
cpid=$!
pids+=($cpid)
wait_port "$cport" "$wait_s" "$cpid" || fail "client did not start"

expect="$body"
case "$server" in capture*) expect="captured by anytls-wire" ;; esac
for i in $(seq "$requests"); do
    out=$(curl -sS -m 10 --socks5-hostname "127.0.0.1:$cport" "http://127.0.0.1:$tport/" 2>&1)
    rc=$?
    [ $rc = 0 ] && [ "$out" = "$expect" ] || fail "request $i: curl rc=$rc: $out"
done
[ -n "${CAPTURE_TO:-}" ] && cp "$work/server.log" "$CAPTURE_TO"
echo "PASS $name ($requests requests)"
