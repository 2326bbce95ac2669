#!/usr/bin/env bash
# Runs the pair on this machine with the embedded defaults: anytls-server on
# 127.0.0.1:8443 with a self-signed certificate, anytls-client on 127.0.0.1:1080
# pinned to that certificate. Ctrl-C stops both.
#   scripts/run-local.sh [--password PW] [--server-port N] [--proxy-port N] [-- extra server flags]
set -euo pipefail
cd "$(dirname "$0")/.."

password=anytls-local
server_port=8443
proxy_port=1080
while [ $# -gt 0 ]; do
    case "$1" in
        --password) password=$2; shift 2 ;;
        --server-port) server_port=$2; shift 2 ;;
        --proxy-port) proxy_port=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done

# Not --quiet: a first build takes minutes, and cargo's progress shows it is working.
echo "building the release binaries (the first build takes a few minutes; later ones seconds)..." >&2
cargo build --release --bin anytls-server --bin anytls-client
bin=target/release
log_dir=$(mktemp -d)
cleanup() {
    kill "${server_pid:-}" "${client_pid:-}" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$log_dir"
}
trap cleanup EXIT INT TERM

# The password travels in the environment, not on the command line (`ps` shows that).
export ANYTLS_PASSWORD=$password
"$bin/anytls-server" -l "127.0.0.1:$server_port" "$@" 2> >(tee "$log_dir/server.log" >&2) &
server_pid=$!
fingerprint=""
for _ in $(seq 1 100); do
    fingerprint=$(grep -o 'fingerprint [0-9a-f]\{64\}' "$log_dir/server.log" 2>/dev/null | cut -d' ' -f2 || true)
    [ -n "$fingerprint" ] && grep -q 'listening on' "$log_dir/server.log" && break
    kill -0 "$server_pid" 2>/dev/null || { echo "anytls-server exited; see above" >&2; exit 1; }
    sleep 0.1
done
[ -n "$fingerprint" ] || { echo "anytls-server did not start in 10 s" >&2; exit 1; }

"$bin/anytls-client" -l "127.0.0.1:$proxy_port" -s "127.0.0.1:$server_port" --pin-sha256 "$fingerprint" &
client_pid=$!
sleep 0.3
kill -0 "$client_pid" 2>/dev/null || { echo "anytls-client exited; see above" >&2; exit 1; }
cat >&2 <<MSG

Ready. Try:  curl --socks5-hostname 127.0.0.1:$proxy_port https://example.com/
        or:  curl -x http://127.0.0.1:$proxy_port http://example.com/
Ctrl-C stops both.
MSG
wait -n "$server_pid" "$client_pid"
