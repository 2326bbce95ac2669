#!/usr/bin/env bash
# Usage: anytls-crate-server.sh LISTEN_PORT PASSWORD [CERT_PEM KEY_PEM]
# anytls-server from the crates.io crate `anytls` on 127.0.0.1:LISTEN_PORT. Without
# CERT_PEM/KEY_PEM it makes its own self-signed certificate at start-up.
# Runs in the foreground; prints only errors (PEER_LOG_LEVEL to change).
set -euo pipefail
. "$(dirname "$0")/_common.sh"
[ $# -eq 2 ] || [ $# -eq 4 ] || die "usage: $0 LISTEN_PORT PASSWORD [CERT_PEM KEY_PEM]"
port=$1 password=$2
need_bin ANYTLS_PEER_SERVER
need_port LISTEN_PORT "$port"
tls=()
if [ $# -eq 4 ]; then
    need_file CERT_PEM "$3"
    need_file KEY_PEM "$4"
    tls=(--cert "$3" --key "$4")
fi
exec "$ANYTLS_PEER_SERVER" -l "127.0.0.1:$port" -p "$password" "${tls[@]}" --log "$PEER_LOG_LEVEL"
