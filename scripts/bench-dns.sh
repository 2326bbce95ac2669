#!/usr/bin/env bash
# Usage: scripts/bench-dns.sh
#
# Name lookups through the server's name cache, the system resolver (getaddrinfo) against
# --dns-server over UDP, TCP, TLS and HTTPS (benches/dns.rs prints the table). Every
# variant asks the same unbound: the script runs in a network and mount namespace of its
# own (root, or unshare's user namespaces), with loopback only and /etc/resolv.conf bound
# to "nameserver 127.0.0.1", so getaddrinfo asks unbound on 127.0.0.1:53 as hickory does.
# unbound answers every name under `bench.` with 127.0.0.1 from local data (no recursion).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v unbound >/dev/null || { echo "bench-dns: unbound is not installed (apt-get install unbound)" >&2; exit 1; }
cargo bench --bench dns --no-run >/dev/null 2>&1 || cargo bench --bench dns --no-run
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
cat > "$dir/unbound.conf" <<CONF
server:
  interface: 127.0.0.1@53
  interface: 127.0.0.1@853
  interface: 127.0.0.1@443
  tls-port: 853
  https-port: 443
  tls-service-key: "$dir/key.pem"
  tls-service-pem: "$dir/cert.pem"
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$dir"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: no
  so-rcvbuf: 8m
  num-queries-per-thread: 4096
  incoming-num-tcp: 256
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "bench." redirect
  local-data: "bench. 60 IN A 127.0.0.1"
CONF
echo "nameserver 127.0.0.1" > "$dir/resolv.conf"
echo "bench-dns: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
export DIR="$dir"
unshare --net --mount bash -c '
    set -euo pipefail
    ip link set lo up
    mount --bind "$DIR/resolv.conf" /etc/resolv.conf
    unbound -d -c "$DIR/unbound.conf" 2>"$DIR/unbound.log" &
    for _ in $(seq 50); do [ -n "$(grep "start of service" "$DIR/unbound.log" 2>/dev/null)" ] && break; sleep 0.1; done
    DNS_BENCH_CA="$DIR/cert.pem" DNS_BENCH_UDP=udp://127.0.0.1:53 DNS_BENCH_TCP=tcp://127.0.0.1:53 \
    DNS_BENCH_TLS=tls://127.0.0.1:853 DNS_BENCH_HTTPS=https://127.0.0.1:443/dns-query \
        cargo bench --offline --bench dns 2>/dev/null | grep -v "^$"
    kill %1
'
