#!/usr/bin/env bash
# Usage: mihomo-server.sh LISTEN_PORT PASSWORD CERT_PEM KEY_PEM WORKDIR
# mihomo AnyTLS listener on 127.0.0.1:LISTEN_PORT (TLS with the given cert/key), traffic
# goes DIRECT. WORKDIR is mihomo's home (-d). Runs in the foreground; prints only errors
# (PEER_LOG_LEVEL to change).
set -euo pipefail
. "$(dirname "$0")/_common.sh"
[ $# -eq 5 ] || die "usage: $0 LISTEN_PORT PASSWORD CERT_PEM KEY_PEM WORKDIR"
port=$1 password=$2 cert=$3 key=$4 workdir=$5
need_bin MIHOMO
need_port LISTEN_PORT "$port"
need_file CERT_PEM "$cert"
need_file KEY_PEM "$key"
mkdir -p "$workdir"
cert=$(abspath "$cert") key=$(abspath "$key") workdir=$(cd "$workdir" && pwd)
cat > "$workdir/mihomo-server.yaml" <<YAML
log-level: $(mihomo_log_level)
mode: rule
allow-lan: false
bind-address: 127.0.0.1
ipv6: false
geodata-mode: false
geo-auto-update: false
unified-delay: false
profile: { store-selected: false, store-fake-ip: false }
listeners:
  - name: anytls-in
    type: anytls
    listen: 127.0.0.1
    port: $port
    users:
      interop: $(json_str "$password")
    certificate: $(json_str "$cert")
    private-key: $(json_str "$key")
proxies: []
rules:
  - MATCH,DIRECT
YAML
# mihomo only reads files under its home dir or SAFE_PATHS.
SAFE_PATHS="$(dirname "$cert"):$(dirname "$key")${SAFE_PATHS:+:$SAFE_PATHS}"
export SAFE_PATHS
# mihomo logs to stdout and prints a few level=info start-up lines before it reads
# log-level; drop them (and any info/debug line) unless a chattier level was asked for.
case "$PEER_LOG_LEVEL" in
    error|warn|warning|silent)
        exec "$MIHOMO" -d "$workdir" -f "$workdir/mihomo-server.yaml" \
            > >(grep --line-buffered -v -E 'level=(info|debug)' >&2) ;;
esac
exec "$MIHOMO" -d "$workdir" -f "$workdir/mihomo-server.yaml"
