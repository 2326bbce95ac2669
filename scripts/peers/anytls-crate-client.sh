#!/usr/bin/env bash
# Usage: anytls-crate-client.sh SOCKS_PORT SERVER_PORT PASSWORD
# anytls-client from the crates.io crate `anytls`: mixed (SOCKS5 + HTTP) listener on
# 127.0.0.1:SOCKS_PORT, AnyTLS to 127.0.0.1:SERVER_PORT, SNI "localhost", certificate not
# verified (--insecure). Runs in the foreground; prints only errors (PEER_LOG_LEVEL to change).
set -euo pipefail
. "$(dirname "$0")/_common.sh"
[ $# -eq 3 ] || die "usage: $0 SOCKS_PORT SERVER_PORT PASSWORD"
sport=$1 port=$2 password=$3
need_bin ANYTLS_PEER_CLIENT
need_port SOCKS_PORT "$sport"
need_port SERVER_PORT "$port"
exec "$ANYTLS_PEER_CLIENT" -l "mixed://127.0.0.1:$sport" -s "127.0.0.1:$port" -p "$password" \
    --sni localhost --insecure true --log "$PEER_LOG_LEVEL"
