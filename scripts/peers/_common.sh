# Sourced by the scripts/peers/*.sh helpers. Locates the peer binaries.
# Order: variables already in the environment (SING_BOX, MIHOMO, ANYTLS_PEER_SERVER,
# ANYTLS_PEER_CLIENT), then <cache>/peers.env written by scripts/install-peers.sh.
# <cache> = $ANYTLS_PEERS_DIR or <repo>/.cache/peers.
_peers_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
_peers_dir="${ANYTLS_PEERS_DIR:-$_peers_repo/.cache/peers}"
if [ -f "$_peers_dir/peers.env" ]; then
    # Do not override what the caller set explicitly.
    while IFS='=' read -r _k _v; do
        case "$_k" in
            ''|\#*) continue ;;
        esac
        if [ -z "${!_k:-}" ]; then export "$_k=$_v"; fi
    done < "$_peers_dir/peers.env"
fi

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

need_bin() { # need_bin VAR_NAME
    local v="${!1:-}"
    [ -n "$v" ] || die "$1 is not set and not in $_peers_dir/peers.env (run scripts/install-peers.sh)"
    [ -x "$v" ] || die "$1=$v is not executable"
}

need_port() { # need_port NAME VALUE
    case "$2" in
        ''|*[!0-9]*) die "$1 must be a port number, got '$2'" ;;
    esac
    [ "$2" -ge 1 ] && [ "$2" -le 65535 ] || die "$1 out of range: $2"
}

need_file() { [ -r "$2" ] || die "$1 not readable: $2"; }

abspath() { # abspath PATH -> absolute path (file need not exist; its folder must)
    local d b
    d="$(cd "$(dirname "$1")" && pwd)" || return 1
    b="$(basename "$1")"
    printf '%s/%s\n' "$d" "$b"
}

# JSON string literal of $1 (also a valid YAML double-quoted scalar).
json_str() {
    local s=$1
    case "$s" in *[$'\x01'-$'\x08\x0b\x0c\x0e'-$'\x1f']*) die "control characters not supported in: $s" ;; esac
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    s=${s//$'\t'/\\t}
    printf '"%s"\n' "$s"
}

# Log level for the peer: quiet by default ("nothing but errors").
# PEER_LOG_LEVEL=debug|info|warn|error overrides it for debugging.
PEER_LOG_LEVEL="${PEER_LOG_LEVEL:-error}"

mihomo_log_level() {
    case "$PEER_LOG_LEVEL" in
        warn) echo warning ;;
        trace) echo debug ;;
        *) echo "$PEER_LOG_LEVEL" ;;
    esac
}

# port_listening PORT: true when something listens on TCP 127.0.0.1:PORT (or any address).
# Reads /proc/net/tcp{,6} so that no connection is made to the peer.
port_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# wait_port PORT SECONDS [PID]: wait until PORT listens; fail on timeout or if PID died.
wait_port() {
    local port=$1 deadline=$((SECONDS + $2)) pid=${3:-}
    while ! port_listening "$port"; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid exited before listening on $port" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "timeout: nothing listens on 127.0.0.1:$port after $2 s" >&2
            return 1
        fi
        sleep 0.1
    done
}
