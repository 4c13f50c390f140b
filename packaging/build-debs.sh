#!/bin/bash
# Builds the Debian packages of clip-snapshotter and clip-builder with cargo-deb.
#   bash packaging/build-debs.sh [--profile dist|release|dev] [--out DIR] [--fast] [--no-build]
# Default: the `dist` profile (release with fat LTO, Cargo.toml), packages in target/debian/. Man
# pages are generated from the programs' --help with help2man. Installs cargo-deb (from crates.io)
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
profile=dist
out=target/debian
fast=()
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    --no-build) build=0; shift ;;
    *) echo "usage: $0 [--profile dist|release|dev] [--out DIR] [--fast] [--no-build]" >&2; exit 2 ;;
  esac
done
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
command -v help2man >/dev/null || { echo "help2man is missing: apt-get install help2man" >&2; exit 1; }
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
if [ "$build" = 1 ]; then
  cargo build --locked --profile "$profile" -p clip-snapshotter -p clip-builder --bins
fi
mkdir -p target/packaging "$out"
for b in clip-snapshotter clip-builder; do
  help2man --no-info --no-discard-stderr --name="$(sed -n 's/^description = "\(.*\)"/\1/p' "${b#clip-}/Cargo.toml" 2>/dev/null || true)" \
    "target/$dir/$b" | gzip -9n > "target/packaging/$b.1.gz"
done
for p in clip-snapshotter clip-builder; do
  cargo deb --locked --no-build --no-strip "${fast[@]}" --profile "$profile" -p "$p" -o "$out"
done
ls -l "$out"/*.deb
