#!/usr/bin/env bash
# Builds the container image localhost/anytls-rs:VERSION and :latest with podman (or the
# engine in $CONTAINER_ENGINE): the release binaries, stripped, and exactly the shared
# libraries they load (read off ldd), on an empty base (contrib/container/Containerfile).
# No registry is needed: nothing is pulled. Prints the image's name and size.
#
# Builds with `cargo build --release --workspace --bins`, as build-deb.sh and the pool
# scripts do, so one of them after another rebuilds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

engine=${CONTAINER_ENGINE:-podman}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
image=localhost/anytls-rs
target_dir=${CARGO_TARGET_DIR:-target}

echo "== cargo build --release --workspace --bins" >&2
cargo build --release --workspace --bins

context="$target_dir/container"
rm -rf "$context"
mkdir -p "$context/rootfs/usr/bin" "$context/rootfs/etc/anytls" "$context/rootfs/tmp" "$context/state"
chmod 1777 "$context/rootfs/tmp"
chmod 700 "$context/state"
for binary in anytls-server anytls-client; do
    install -m 755 "$target_dir/release/$binary" "$context/rootfs/usr/bin/$binary"
    strip "$context/rootfs/usr/bin/$binary"
done

# The dynamic loader and every library ldd resolves, at the paths the binaries ask for.
libraries=$(ldd "$context"/rootfs/usr/bin/* | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
for library in $libraries; do
    mkdir -p "$context/rootfs$(dirname "$library")"
    cp -L "$library" "$context/rootfs$library"
done

# Who the processes are (for logs and tools that look a uid up), and a resolver order:
# /etc/hosts, then DNS (the engine provides both files at run time).
printf 'root:x:0:0:root:/:/nonexistent\nanytls:x:10001:10001:anytls:/var/lib/anytls:/nonexistent\n' \
    >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nanytls:x:10001:\n' >"$context/rootfs/etc/group"
printf 'hosts: files dns\n' >"$context/rootfs/etc/nsswitch.conf"

cp contrib/container/Containerfile "$context/Containerfile"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
format=()
[ "$engine" = podman ] && format=(--format docker) # HEALTHCHECK is a Docker-format field
echo "== $engine build $image:$version" >&2
"$engine" build "${format[@]}" --quiet \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$commit" \
    --label "org.opencontainers.image.licenses=MIT" \
    -t "$image:$version" -t "$image:latest" -f "$context/Containerfile" "$context" >/dev/null
size=$("$engine" image inspect --format '{{.Size}}' "$image:$version")
echo "$image:$version ($((size / 1024)) KiB)"
