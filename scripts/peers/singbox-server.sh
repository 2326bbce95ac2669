#!/usr/bin/env bash
# Usage: singbox-server.sh LISTEN_PORT PASSWORD CERT_PEM KEY_PEM WORKDIR
# sing-box AnyTLS inbound on 127.0.0.1:LISTEN_PORT (TLS with the given cert/key),
# direct outbound. Runs in the foreground; prints only errors (PEER_LOG_LEVEL to change).
set -euo pipefail
. "$(dirname "$0")/_common.sh"
[ $# -eq 5 ] || die "usage: $0 LISTEN_PORT PASSWORD CERT_PEM KEY_PEM WORKDIR"
port=$1 password=$2 cert=$3 key=$4 workdir=$5
need_bin SING_BOX
need_port LISTEN_PORT "$port"
need_file CERT_PEM "$cert"
need_file KEY_PEM "$key"
mkdir -p "$workdir"
cert=$(abspath "$cert") key=$(abspath "$key") workdir=$(cd "$workdir" && pwd)
cat > "$workdir/singbox-server.json" <<JSON
{
  "log": { "level": "$PEER_LOG_LEVEL", "timestamp": true },
  "inbounds": [
    {
      "type": "anytls",
      "tag": "anytls-in",
      "listen": "127.0.0.1",
      "listen_port": $port,
      "users": [ { "name": "interop", "password": $(json_str "$password") } ],
      "tls": {
        "enabled": true,
        "certificate_path": $(json_str "$cert"),
        "key_path": $(json_str "$key")
      }
    }
  ],
  "outbounds": [ { "type": "direct", "tag": "direct" } ],
  "route": { "final": "direct" }
}
JSON
exec "$SING_BOX" run -c "$workdir/singbox-server.json" -D "$workdir" --disable-color
