#!/usr/bin/env bash
# Usage: mihomo-client.sh SOCKS_PORT SERVER_PORT PASSWORD WORKDIR
# mihomo mixed (SOCKS + HTTP) port on 127.0.0.1:SOCKS_PORT, everything through an AnyTLS
# proxy at 127.0.0.1:SERVER_PORT, sni "localhost", skip-cert-verify. WORKDIR is mihomo's
# home (-d). Runs in the foreground; prints only errors (PEER_LOG_LEVEL to change).
set -euo pipefail
. "$(dirname "$0")/_common.sh"
[ $# -eq 4 ] || die "usage: $0 SOCKS_PORT SERVER_PORT PASSWORD WORKDIR"
sport=$1 port=$2 password=$3 workdir=$4
need_bin MIHOMO
need_port SOCKS_PORT "$sport"
need_port SERVER_PORT "$port"
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
cat > "$workdir/mihomo-client.yaml" <<YAML
log-level: $(mihomo_log_level)
mode: rule
allow-lan: false
bind-address: 127.0.0.1
mixed-port: $sport
ipv6: false
geodata-mode: false
geo-auto-update: false
profile: { store-selected: false, store-fake-ip: false }
proxies:
  - name: anytls-out
    type: anytls
    server: 127.0.0.1
    port: $port
    password: $(json_str "$password")
    sni: localhost
    skip-cert-verify: true
    udp: true
rules:
  - MATCH,anytls-out
YAML
export SAFE_PATHS="$workdir${SAFE_PATHS:+:$SAFE_PATHS}"
# mihomo logs to stdout and prints a few level=info start-up lines before it reads
# log-level; drop them (and any info/debug line) unless a chattier level was asked for.
case "$PEER_LOG_LEVEL" in
    error|warn|warning|silent)
        exec "$MIHOMO" -d "$workdir" -f "$workdir/mihomo-client.yaml" \
            > >(grep --line-buffered -v -E 'level=(info|debug)' >&2) ;;
esac
exec "$MIHOMO" -d "$workdir" -f "$workdir/mihomo-client.yaml"
