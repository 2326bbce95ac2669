#!/usr/bin/env bash
# Installs what tests/api.rs's browser check needs: Debian's chromium (apt) and
# playwright-core (npm, into tests/browser/node_modules; it drives the installed chromium
# and downloads no browser of its own). Non-fatal for the caller: without them the check
# prints SKIP, unless ANYTLS_REQUIRE_BROWSER=1.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
status=0
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
            || { echo "warning: could not install chromium" >&2; status=1; }
    else
        echo "warning: chromium missing (apt-get install -y chromium as root)" >&2
        status=1
    fi
fi
if command -v npm >/dev/null 2>&1; then
    (cd tests/browser && npm ci --no-audit --no-fund >/dev/null 2>&1) \
        || { echo "warning: npm ci in tests/browser failed" >&2; status=1; }
else
    echo "warning: npm missing; the browser check will SKIP" >&2
    status=1
fi
exit $status
