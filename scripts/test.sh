#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test target (unit tests,
# tests/e2e.rs, tests/interop.rs, benches compiled as tests).
# Interop tests use the peers from scripts/install-peers.sh and print
# "SKIP interop <peer>: ..." for missing ones; ANYTLS_REQUIRE_PEERS=1 makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test --workspace --all-targets"
cargo test --workspace --all-targets
