#!/usr/bin/env bash
# Usage: matrix.sh [REQUESTS...]   (default: 1 3)
# Runs run-pair.sh for every client x server among the installed peers (plus the
# anytls-wire.py probe client) and prints one PASS/FAIL line each, then a summary line
# "N passed, N failed". Peers missing from peers.env are skipped.
# MATRIX_CLIENTS / MATRIX_SERVERS override the lists. Exit code 0 always (it is a survey).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/_common.sh"
avail=()
[ -n "${ANYTLS_PEER_SERVER:-}" ] && [ -n "${ANYTLS_PEER_CLIENT:-}" ] && avail+=(crate)
[ -n "${SING_BOX:-}" ] && avail+=(singbox)
[ -n "${MIHOMO:-}" ] && avail+=(mihomo)
clients=(${MATRIX_CLIENTS:-${avail[*]} probe})
servers=(${MATRIX_SERVERS:-${avail[*]}})
reqs=("$@")
[ ${#reqs[@]} -gt 0 ] || reqs=(1 3)
pass=0 failn=0
for n in "${reqs[@]}"; do
    for c in "${clients[@]}"; do
        for s in "${servers[@]}"; do
            out=$(timeout 120 "$here/run-pair.sh" "$c" "$s" "$n" 2>&1)
            line=$(printf '%s\n' "$out" | grep -m1 -E '^(PASS|FAIL) ')
            [ -n "$line" ] || line="FAIL $c->$s: run-pair.sh gave no verdict (timeout?)"
            case "$line" in
                PASS*) pass=$((pass + 1)); echo "$line" ;;
                *) failn=$((failn + 1))
                   why=$(printf '%s\n' "$out" | grep -v -E '^(PASS|FAIL) ' | grep -m1 -iE 'error|fatal|level=(error|warning)|rejected|closed' | cut -c1-220)
                   echo "$line${why:+ | $why}" ;;
            esac
        done
    done
done
echo "matrix: $pass passed, $failn failed"
