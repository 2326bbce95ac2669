#!/usr/bin/env bash
# Usage: singbox-client.sh SOCKS_PORT SERVER_PORT PASSWORD WORKDIR
# sing-box mixed (SOCKS4/5 + HTTP) inbound on 127.0.0.1:SOCKS_PORT, AnyTLS outbound to
# 127.0.0.1:SERVER_PORT, TLS server_name "localhost", certificate not verified.
# Runs in the foreground; prints only errors (PEER_LOG_LEVEL to change).
set -euo pipefail
. "$(dirname "$0")/_common.sh"
[ $# -eq 4 ] || die "usage: $0 SOCKS_PORT SERVER_PORT PASSWORD WORKDIR"
sport=$1 port=$2 password=$3 workdir=$4
need_bin SING_BOX
need_port SOCKS_PORT "$sport"
need_port SERVER_PORT "$port"
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
cat > "$workdir/singbox-client.json" <<JSON
{
  "log": { "level": "$PEER_LOG_LEVEL", "timestamp": true },
  "inbounds": [
    { "type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1", "listen_port": $sport }
  ],
  "outbounds": [
    {
      "type": "anytls",
      "tag": "anytls-out",
      "server": "127.0.0.1",
      "server_port": $port,
      "password": $(json_str "$password"),
      "tls": { "enabled": true, "server_name": "localhost", "insecure": true }
    },
    { "type": "direct", "tag": "direct" }
  ],
  "route": { "final": "anytls-out" }
}
JSON
exec "$SING_BOX" run -c "$workdir/singbox-client.json" -D "$workdir" --disable-color
