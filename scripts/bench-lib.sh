# shellcheck shell=bash disable=SC2034 # the PAIR_* and TARGET_* globals are read by the callers
# Sourced by scripts/bench-throughput.sh, test_pool_performance.sh and
# test_connection_pool.sh: starts targets and proxy pairs on loopback, reads the pools'
# log lines, and stops everything it started when the caller exits. Safe under set -e.
#
# Globals a caller reads: BENCH_WORK (temp dir), BIN (our release binaries),
# PAIR_SOCKS / PAIR_SERVER_PID / PAIR_CLIENT_PID / PAIR_ERROR after start_*_pair,
# TARGET_ECHO / TARGET_HTTP / TARGET_BULK after start_targets.

BENCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The peers' cache: $ANYTLS_PEERS_DIR, else <repo>/.cache/peers, else the shared
# ~/.cache/anytls-rs/peers when only that one has been installed.
if [ -z "${ANYTLS_PEERS_DIR:-}" ] && [ ! -f "$BENCH_REPO/.cache/peers/peers.env" ] &&
    [ -f "$HOME/.cache/anytls-rs/peers/peers.env" ]; then
    export ANYTLS_PEERS_DIR="$HOME/.cache/anytls-rs/peers"
fi
. "$BENCH_REPO/scripts/peers/_common.sh"
BIN="${CARGO_TARGET_DIR:-$BENCH_REPO/target}/release"
BENCH_PIDS=()
BENCH_PASSWORD="bench-pass-$RANDOM$RANDOM"

bench_init() { # bench_init NAME: temp dir + cleanup trap
    BENCH_WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    chmod 755 "$BENCH_WORK" # nginx workers may run as another user
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    local p alive
    for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do # bounded wait, then SIGKILL
        alive=0
        for p in "${BENCH_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${BENCH_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "work dir kept: $BENCH_WORK" >&2; else rm -rf "$BENCH_WORK"; fi
}

build_release() { # builds our three binaries (quietly unless it fails)
    echo "building release binaries (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$BENCH_REPO/target}) ..." >&2
    if ! (cd "$BENCH_REPO" && cargo build --release --workspace --bins >"$BENCH_WORK/build.log" 2>&1); then
        tail -n 30 "$BENCH_WORK/build.log" >&2
        echo "release build failed" >&2
        return 1
    fi
}

free_ports() { python3 "$BENCH_REPO/scripts/peers/free-port.py" "$1" | paste -sd' '; } # one line: PORT PORT ...

# start_bg LOGNAME CMD...: runs CMD in the background, its output in $BENCH_WORK/LOGNAME.log;
# the PID is in $BG_PID.
start_bg() {
    local log="$BENCH_WORK/$1.log"
    shift
    "$@" >"$log" 2>&1 &
    BG_PID=$!
    BENCH_PIDS+=("$BG_PID")
}

# start_targets LOGNAME: one `anytls-bench target` (echo, HTTP, bulk ports); sets
# TARGET_ECHO, TARGET_HTTP, TARGET_BULK (IP:PORT) from the JSON line it prints.
start_targets() {
    local log="$BENCH_WORK/$1.log" line=""
    start_bg "$1" "$BIN/anytls-bench" target --listen 127.0.0.1:0
    for _ in $(seq 50); do
        [ -s "$log" ] && line=$(head -n1 "$log") && [ -n "$line" ] && break
        sleep 0.1
    done
    target_addr() { sed -nE "s/.*\"$1\":\"([^\"]+)\".*/\1/p" <<<"$line"; }
    TARGET_ECHO=$(target_addr echo) TARGET_HTTP=$(target_addr http) TARGET_BULK=$(target_addr bulk)
    if [ -z "$TARGET_ECHO" ] || [ -z "$TARGET_HTTP" ] || [ -z "$TARGET_BULK" ]; then
        die "anytls-bench target printed no addresses: ${line:-nothing} ($(tail -n1 "$log"))"
    fi
}

# The pools' log lines (both binaries, every --stats-interval-secs):
#   ... [Pool Stats] Total: 15, Active: 3, Reused: 8, New: 7, Cleaned: 2, Reuse rate: 53.3%, ...
#   ... [Pool Status] {"127.0.0.1:8080": 3}
# pool_stats_line LOG: the last stats line ("" when none yet).
pool_stats_line() { grep -F '[Pool Stats]' "$1" 2>/dev/null | tail -n1 || true; }
# pool_stat LOG FIELD: FIELD's number in the last stats line ("Reused", "Reuse rate", ...).
pool_stat() { pool_stats_line "$1" | sed -nE "s/.*[[ ]$2: ([0-9.]+).*/\1/p"; }
# pool_status LOG: the JSON object of the last status line ("" when none yet).
pool_status() { grep -F '[Pool Status]' "$1" 2>/dev/null | tail -n1 | sed -E 's/.*\[Pool Status\] //' || true; }
# pool_stats_count LOG: how many stats lines LOG has.
pool_stats_count() { grep -cF '[Pool Stats]' "$1" 2>/dev/null || true; }

# why_exited LOGNAME: the log's last error-looking line (for SKIP messages).
why_exited() {
    local line
    line=$(grep -m1 -iE "error|unexpected|invalid" "$BENCH_WORK/$1.log" | head -c 300)
    [ -n "$line" ] || line=$(tail -n 1 "$BENCH_WORK/$1.log" | head -c 300)
    echo "$line"
}

# start_our_pair NAME SERVER_ARGS CLIENT_ARGS: our server + client, extra args given as
# two strings (word-split). Sets PAIR_*; returns 1 with PAIR_ERROR when one exits.
# SERVER_PREFIX (an array, empty by default) goes before the server's command, e.g. a
# wrapper that execs it (so that PAIR_SERVER_PID stays the server's).
SERVER_PREFIX=()
start_our_pair() {
    local name=$1 sargs=$2 cargs=$3 sport cport fp
    read -r sport cport < <(free_ports 2)
    PAIR_ERROR=""
    # shellcheck disable=SC2086
    start_bg "$name-server" "${SERVER_PREFIX[@]}" "$BIN/anytls-server" -l "127.0.0.1:$sport" -p "$BENCH_PASSWORD" $sargs
    PAIR_SERVER_PID=$BG_PID
    if ! wait_port "$sport" 20 "$PAIR_SERVER_PID" 2>/dev/null; then
        PAIR_ERROR="server: $(why_exited "$name-server")"
        return 1
    fi
    fp=$(grep -o 'fingerprint [0-9a-fA-F]*' "$BENCH_WORK/$name-server.log" | head -n1 | cut -d' ' -f2)
    [ -n "$fp" ] || { PAIR_ERROR="server logged no certificate fingerprint"; return 1; }
    # shellcheck disable=SC2086
    start_bg "$name-client" "$BIN/anytls-client" -l "127.0.0.1:$cport" -s "127.0.0.1:$sport" \
        -p "$BENCH_PASSWORD" --sni localhost --pin-sha256 "$fp" $cargs
    PAIR_CLIENT_PID=$BG_PID
    if ! wait_port "$cport" 20 "$PAIR_CLIENT_PID" 2>/dev/null; then
        PAIR_ERROR="client: $(why_exited "$name-client")"
        return 1
    fi
    PAIR_SOCKS="127.0.0.1:$cport"
}

# The third-party pairs, by kind: the crates.io `anytls` 0.5.3 crate, sing-box, mihomo
# (scripts/peers/*.sh start them; scripts/install-peers.sh installs them).
PEER_KINDS=(crate sing-box mihomo)
declare -A PEER_LABEL=([crate]="crates.io anytls 0.5.3" [sing-box]="sing-box" [mihomo]="mihomo")

# peer_installed [KIND]: whether KIND's binaries are there (default: crate).
peer_installed() {
    case "${1:-crate}" in
        crate) [ -n "${ANYTLS_PEER_SERVER:-}" ] && [ -x "$ANYTLS_PEER_SERVER" ] &&
            [ -n "${ANYTLS_PEER_CLIENT:-}" ] && [ -x "$ANYTLS_PEER_CLIENT" ] ;;
        sing-box) [ -n "${SING_BOX:-}" ] && [ -x "$SING_BOX" ] ;;
        mihomo) [ -n "${MIHOMO:-}" ] && [ -x "$MIHOMO" ] ;;
        *) return 1 ;;
    esac
}

# bench_pki: a self-signed localhost certificate for the Go servers, made once
# ($BENCH_WORK/pki/cert.pem, key.pem); non-zero without openssl.
bench_pki() {
    [ -s "$BENCH_WORK/pki/key.pem" ] && return 0
    mkdir -p "$BENCH_WORK/pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$BENCH_WORK/pki/key.pem" -out "$BENCH_WORK/pki/cert.pem" >/dev/null 2>&1
}

# start_peer_pair NAME [KIND]: a third-party server + client of KIND (default crate), with
# the same PAIR_* results as start_our_pair. The client skips certificate checks.
start_peer_pair() {
    local name=$1 kind=${2:-crate} sport cport peers="$BENCH_REPO/scripts/peers"
    read -r sport cport < <(free_ports 2)
    PAIR_ERROR=""
    case "$kind" in
        crate) start_bg "$name-server" "$peers/anytls-crate-server.sh" "$sport" "$BENCH_PASSWORD" ;;
        sing-box | mihomo)
            bench_pki || { PAIR_ERROR="openssl could not make a certificate for the $kind server"; return 1; }
            local script=${kind//-/}
            start_bg "$name-server" "$peers/$script-server.sh" "$sport" "$BENCH_PASSWORD" \
                "$BENCH_WORK/pki/cert.pem" "$BENCH_WORK/pki/key.pem" "$BENCH_WORK/$name-server.d" ;;
        *) PAIR_ERROR="unknown peer kind $kind"; return 1 ;;
    esac
    PAIR_SERVER_PID=$BG_PID
    if ! wait_port "$sport" 20 "$PAIR_SERVER_PID" 2>/dev/null; then
        PAIR_ERROR="$kind server: $(why_exited "$name-server")"
        return 1
    fi
    case "$kind" in
        crate) start_bg "$name-client" "$peers/anytls-crate-client.sh" "$cport" "$sport" "$BENCH_PASSWORD" ;;
        *) start_bg "$name-client" "$peers/${kind//-/}-client.sh" "$cport" "$sport" "$BENCH_PASSWORD" \
            "$BENCH_WORK/$name-client.d" ;;
    esac
    PAIR_CLIENT_PID=$BG_PID
    if ! wait_port "$cport" 20 "$PAIR_CLIENT_PID" 2>/dev/null; then
        PAIR_ERROR="$kind client: $(why_exited "$name-client")"
        return 1
    fi
    PAIR_SOCKS="127.0.0.1:$cport"
}

# cpu_seconds PID: user + system CPU time the process (all its threads) used so far,
# from /proc/PID/stat (clock ticks; 0.01 s on Linux); "" when it is gone.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
cpu_seconds() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # The command name (field 2) may hold spaces: count fields after its closing paren.
    stat=${stat##*) }
    awk -v t="$CLK_TCK" '{ printf "%.2f", ($12 + $13) / t }' <<<"$stat"
}

find_nginx() { command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }

ensure_nginx() { # prints nginx's path, installed with apt-get when missing and root; empty if unavailable
    local bin
    bin=$(find_nginx)
    if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "nginx not found: apt-get install -y nginx ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y nginx >"$BENCH_WORK/apt.log" 2>&1 || true
        bin=$(find_nginx)
    fi
    echo "$bin"
}

# start_nginx_file NGINX SIZE PORT: serves a sparse SIZE-byte file (no disk I/O: the page
# cache holds zeros) at http://127.0.0.1:PORT/file.bin, in the background like start_bg;
# non-zero if nginx does not start (its log: $BENCH_WORK/nginx.log).
start_nginx_file() {
    local bin=$1 size=$2 port=$3
    mkdir -p "$BENCH_WORK/www" "$BENCH_WORK/nginx/tmp"
    truncate -s "$size" "$BENCH_WORK/www/file.bin"
    chmod 644 "$BENCH_WORK/www/file.bin"
    cat >"$BENCH_WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $BENCH_WORK/nginx/nginx.pid;
error_log $BENCH_WORK/nginx/error.log warn;
$( [ "$(id -u)" = 0 ] && echo "user root;" )
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $BENCH_WORK/nginx/tmp;
    proxy_temp_path $BENCH_WORK/nginx/tmp;
    fastcgi_temp_path $BENCH_WORK/nginx/tmp;
    uwsgi_temp_path $BENCH_WORK/nginx/tmp;
    scgi_temp_path $BENCH_WORK/nginx/tmp;
    server {
        listen 127.0.0.1:$port;
        root $BENCH_WORK/www;
    }
}
CONF
    start_bg nginx "$bin" -p "$BENCH_WORK/nginx" -c "$BENCH_WORK/nginx/nginx.conf"
    wait_port "$port" 20 "$BG_PID"
}

machine_info() { # one line: cores and CPU model
    local model
    model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    echo "nproc=$(nproc) cpu=\"${model:-unknown}\" kernel=$(uname -r)"
}

# --- long runs: memory, file descriptors, CPU, sing-box (scripts/endurance.sh, bench-memory.sh) ---

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; } # rss_kib PID
fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }    # fd_count PID
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; } # mib KIB: one decimal

# raise_fd_limit [WANT]: lifts this shell's open-files limit (and so its children's) to
# WANT (default 65536) when allowed (root may raise the hard limit), else to the hard
# limit. Sets FD_LIMIT to the soft limit in force. Not in $(...): that is a subshell.
raise_fd_limit() {
    local want=${1:-65536} hard
    hard=$(ulimit -Hn)
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
        ulimit -Hn "$want" 2>/dev/null || want=$hard
    fi
    ulimit -Sn "$want" 2>/dev/null || ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
    FD_LIMIT=$(ulimit -Sn)
}

# wait_log LOG PATTERN SECONDS [PID]: waits until LOG has a line matching PATTERN
# (grep -E); non-zero on timeout or when PID exits first.
wait_log() {
    local log=$1 pattern=$2 deadline=$((SECONDS + $3)) pid=${4:-}
    until grep -qE "$pattern" "$log" 2>/dev/null; do
        [ -z "$pid" ] || kill -0 "$pid" 2>/dev/null || grep -qE "$pattern" "$log" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# start_targets_on LOGNAME LISTEN: like start_targets, on LISTEN (e.g. 0.0.0.0:0, so that
# the echo and HTTP ports answer at every 127.x.y.z). Sets TARGET_*, TARGET_PID.
start_targets_on() {
    local log="$BENCH_WORK/$1.log" line=""
    start_bg "$1" "$BIN/anytls-bench" target --listen "$2"
    TARGET_PID=$BG_PID
    for _ in $(seq 50); do
        [ -s "$log" ] && line=$(head -n1 "$log") && [ -n "$line" ] && break
        sleep 0.1
    done
    TARGET_ECHO=$(sed -nE 's/.*"echo":"([^"]+)".*/\1/p' <<<"$line")
    TARGET_HTTP=$(sed -nE 's/.*"http":"([^"]+)".*/\1/p' <<<"$line")
    TARGET_BULK=$(sed -nE 's/.*"bulk":"([^"]+)".*/\1/p' <<<"$line")
    [ -n "$TARGET_ECHO" ] || die "anytls-bench target printed no addresses: ${line:-nothing} ($(tail -n1 "$log"))"
    # A target bound on 0.0.0.0 is reached at 127.0.0.1.
    TARGET_ECHO=${TARGET_ECHO/0.0.0.0/127.0.0.1} TARGET_HTTP=${TARGET_HTTP/0.0.0.0/127.0.0.1}
    TARGET_BULK=${TARGET_BULK/0.0.0.0/127.0.0.1}
}

# sing-box's pair through start_peer_pair (the endurance run compares against it).
singbox_installed() { peer_installed sing-box; }
start_singbox_pair() { start_peer_pair "$1" sing-box; } # start_singbox_pair NAME: sets PAIR_*

# json_num KEY JSON: the first number after "KEY": in JSON ("" when absent).
json_num() { grep -oE "\"$1\":-?[0-9.]+" <<<"$2" | head -n1 | cut -d: -f2; }

# add_peer_variants: starts each installed third-party pair (PEER_KINDS) and appends it to
# the caller's variants list and its socks / server_pid / client_pid maps; a peer that is
# missing or does not start gets a SKIP line on stderr.
add_peer_variants() {
    local kind
    for kind in "${PEER_KINDS[@]}"; do
        if ! peer_installed "$kind"; then
            echo "SKIP $kind: not installed (scripts/install-peers.sh)" >&2
        elif start_peer_pair "$kind" "$kind"; then
            variants+=("$kind")
            socks[$kind]=$PAIR_SOCKS server_pid[$kind]=$PAIR_SERVER_PID client_pid[$kind]=$PAIR_CLIENT_PID
        else
            echo "SKIP $kind: $PAIR_ERROR" >&2
        fi
    done
}
