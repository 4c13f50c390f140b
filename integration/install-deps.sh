#!/bin/bash
# Installs, from Debian's archive, everything clip's build and tests need. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PKGS=(
  protobuf-compiler            # protoc, for the gRPC crates
  containerd runc              # the real runtime the tests drive
  docker-registry skopeo buildah fuse3 busybox-static debootstrap
  apache2-utils openssl curl ca-certificates jq iproute2 iptables
  pigz zstd xz-utils attr      # layer formats and xattrs in index tests
  golang-go golang-github-containerd-containerd-dev   # containerd's snapshotter conformance suite
  help2man systemd             # man pages of the Debian packages; systemd-analyze verify of the unit
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
