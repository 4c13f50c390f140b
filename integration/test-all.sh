#!/bin/bash
# Runs every test of clip: unit tests, the integration suite against real containerd, runc,
# registries, buildah and FUSE, and short fuzz runs. Needs root and the packages of
# integration/install-deps.sh. Test images are cached in $CLIP_TESTBED_CACHE
# (default /var/tmp/clip-testbed-cache) after the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
export AWS_EC2_METADATA_DISABLED=true
export CARGO_TERM_COLOR=never
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads=2
