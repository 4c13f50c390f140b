#!/bin/bash
# Runs every test of clip: `cargo fmt --check` and clippy (warnings are errors; the lint set
# is in the workspace Cargo.toml), the shape rules of the library code
# (tools/check-structure.py), unit tests, the integration suite against real containerd, runc,
# registries, buildah and FUSE, and short fuzz runs of the parsers. Needs root and the packages of
# integration/install-deps.sh. Test images are cached in $CLIP_TESTBED_CACHE
# (default /var/tmp/clip-testbed-cache) after the first run.
#   CLIP_FUZZ_SECONDS=N   seconds per fuzz target (default 30; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export AWS_EC2_METADATA_DISABLED=true
export CARGO_TERM_COLOR=never
FUZZ_SECONDS=${CLIP_FUZZ_SECONDS:-30}

# Free disk first and last: a test that fails with ENOSPC is a machine's, not the code's, failure.
disk_report() { echo "== disk: $(df -h --output=avail,target . "${TMPDIR:-/tmp}" /var/tmp | tail -n +2 | sort -u -k2 | awk '{ printf "%s free on %s; ", $1, $2 }')"; }
disk_report

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
python3 tools/check-structure.py

echo "== build"
cargo build --workspace --all-targets --locked

if [ "$FUZZ_SECONDS" != 0 ]; then
  echo "== fuzz ($FUZZ_SECONDS s per target)"
  command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
  # cargo-fuzz needs unstable sanitizer flags; this machine has only a stable toolchain.
  export RUSTC_BOOTSTRAP=1
  for t in index_open index_build labels_config artifact_parse profile_parse; do
    (cd fuzz && CARGO_TARGET_DIR=../target/fuzz cargo fuzz run -O "$t" -- \
        -max_total_time="$FUZZ_SECONDS" -max_len=65536 2>&1 | tee "../target/fuzz-$t.log" | grep -E '^Done|SUMMARY|panicked' )
  done
  unset RUSTC_BOOTSTRAP
fi

# The packaging test builds the Debian packages with cargo-deb.
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0

echo "== tests"
log=$(mktemp)
set +e
cargo test --workspace --locked -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
               END { printf "%d passed, %d failed", p, f }' "$log")
rm -f "$log"
echo
disk_report
echo "tests: $summary"
exit "$rc"
