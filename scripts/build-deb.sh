#!/usr/bin/env bash
# Builds the Debian package: both binaries, the systemd unit, /etc/anytls/server.toml (a
# conffile), man pages and bash/zsh/fish completions. Prints the .deb's path, which is in
# $CARGO_TARGET_DIR/debian/ (target/debian/ by default).
#
# Installs cargo-deb (cargo install cargo-deb --locked) when it is missing. Builds with
# `cargo build --release --workspace --bins`, the same command the pool scripts run, so a
# later build of theirs (or ours after theirs) is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== cargo install cargo-deb --locked" >&2
    cargo install cargo-deb --locked
fi

target_dir=${CARGO_TARGET_DIR:-target}
echo "== cargo build --release --workspace --bins" >&2
cargo build --release --workspace --bins

# Man pages and completions from the binaries' clap definitions. Written under ./target
# whatever CARGO_TARGET_DIR says: Cargo.toml's deb assets name them by that path.
rm -rf target/docgen
"$target_dir/release/anytls-docgen" target/docgen

echo "== cargo deb --no-build" >&2
deb=$(cargo deb --no-build -p anytls-rs | tail -n 1)
echo "$deb"
