#!/usr/bin/env bash
# clip quickstart: on a Debian 12 machine, as root, start a container lazily through clip.
#
#   bash quickstart.sh          set up (packages and Go tools, build, registry, containerd 2.x,
#                               snapshotter), build and index a sample image, `nerdctl run` it
#                               lazily, compare with a full pull
#   bash quickstart.sh stop     stop everything this script started and unmount
#
# Everything lives in $CLIP_QUICKSTART_DIR (default /var/tmp/clip-quickstart): its own registry
# on 127.0.0.1:5077, its own containerd and clip-snapshotter sockets; nothing outside is touched.
# Running it again restarts the daemons and reuses the built image. Needs Rust >= 1.90 (rustup)
# and Go >= 1.26 (containerd 2.x and nerdctl are built from the Go module proxy on first run).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
Q=${CLIP_QUICKSTART_DIR:-/var/tmp/clip-quickstart}
PORT=${CLIP_QUICKSTART_PORT:-5077}
REG=127.0.0.1:$PORT
IMAGE=$REG/quickstart/python:latest
export PATH="$HOME/.cargo/bin:$PATH" AWS_EC2_METADATA_DISABLED=true

say() { printf '\n== %s\n' "$*"; }

stop_all() {
  for name in snapshotter containerd registry; do
    if [ -f "$Q/$name.pid" ]; then
      pid=$(cat "$Q/$name.pid")
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
      fi
      rm -f "$Q/$name.pid"
    fi
  done
  # The snapshotter's fd keeper holds lazy mounts across snapshotter restarts; a full stop ends it.
  if [ -f "$Q/clip/root/fd-keeper.pid" ]; then
    kill -KILL "$(cat "$Q/clip/root/fd-keeper.pid")" 2>/dev/null || true
    rm -f "$Q/clip/root/fd-keeper.pid"
  fi
  # containerd shims of quickstart containers, then anything still mounted below the state dir.
  pkill -f "containerd-shim-runc-v2 -namespace quickstart" 2>/dev/null || true
  pkill -f "containerd-shim-runc-v2 -namespace quickstart-full" 2>/dev/null || true
  if [ -d "$Q" ]; then
    { grep " $Q" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop_all
  echo "stopped; state is in $Q (rm -rf it to start from scratch)"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "run as root (containerd, FUSE and mounts need it)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust >= 1.90 with rustup (https://rustup.rs)" >&2; exit 1; }

say "1/7 Debian packages (runc, docker-registry, skopeo, buildah, fuse3, ...); containerd 2.x and nerdctl (Go)"
bash "$HERE/integration/install-deps.sh" >"$Q.apt.log" 2>&1 || { tail -20 "$Q.apt.log"; exit 1; }
source "$HERE/integration/go-tools.env"
export PATH="$CONTAINERD2_DIR/bin:$NERDCTL_DIR/bin:$PATH"   # containerd 2.x, its shim and ctr; nerdctl

say "2/7 building clip (release)"
(cd "$HERE" && cargo build --release --locked --bins -p clip-snapshotter -p clip-builder 2>&1 | tail -3)
BIN=$HERE/target/release

stop_all
# Fresh daemon state on every run (the built image is kept).
rm -rf "$Q/clip/root" "$Q/containerd/root" "$Q/containerd/state" "$Q/registry/data"
mkdir -p "$Q"/{registry,containerd,clip,certs.d/$REG,images}
: >"$Q/registry/registry.log"

say "3/7 a local registry on $REG"
cat >"$Q/registry/config.yml" <<EOF
version: 0.1
log: {level: info, formatter: text, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $Q/registry/data}, delete: {enabled: true}}
http: {addr: $REG, secret: clip-quickstart}
EOF
docker-registry serve "$Q/registry/config.yml" >>"$Q/registry/registry.log" 2>&1 &
echo $! >"$Q/registry.pid"
printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve", "push"]\n' "$REG" "$REG" \
  >"$Q/certs.d/$REG/hosts.toml"

say "4/7 clip-snapshotter and containerd 2.x (with packaging/containerd/config-2.x.toml)"
C=$Q/containerd
cat >"$Q/clip/snapshotter.toml" <<EOF
root = "$Q/clip/root"
address = "$Q/clip/clip.sock"
containerd_address = "$C/containerd.sock"
[registry]
hosts_dir = "$Q/certs.d"
[lazy.completion]
# Off here so that the bytes printed below are the ones the container needed.
enabled = false
EOF
"$BIN/clip-snapshotter" --config "$Q/clip/snapshotter.toml" >>"$Q/clip/clip.log" 2>&1 &
echo $! >"$Q/snapshotter.pid"
# The shipped snippet as users add it (its socket path made this script's), then this
# script's own paths.
{
  printf 'root = "%s/root"\nstate = "%s/state"\n\n' "$C" "$C"
  sed "s#/run/clip-snapshotter/clip-snapshotter.sock#$Q/clip/clip.sock#" "$HERE/packaging/containerd/config-2.x.toml"
  cat <<EOF

[grpc]
  address = "$C/containerd.sock"
[ttrpc]
  address = "$C/containerd.sock.ttrpc"
[debug]
  address = "$C/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$C/opt"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "$Q/certs.d"
[plugins."io.containerd.cri.v1.images".registry]
  config_path = "$Q/certs.d"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "$C/nri.sock"
EOF
} >"$C/config.toml"
containerd --config "$C/config.toml" >>"$C/containerd.log" 2>&1 &
echo $! >"$Q/containerd.pid"
CTR="ctr -a $C/containerd.sock -n quickstart"
NERDCTL="nerdctl --address $C/containerd.sock --namespace quickstart --data-root $Q/nerdctl --hosts-dir $Q/certs.d"
for _ in $(seq 100); do
  curl -sf "http://$REG/v2/" >/dev/null 2>&1 && [ -S "$Q/clip/clip.sock" ] && $CTR version >/dev/null 2>&1 && break
  sleep 0.2
done
$CTR version >/dev/null || { echo "containerd did not start; see $C/containerd.log" >&2; exit 1; }

say "5/7 the sample image: Debian + python3 + numpy (debootstrap + buildah, cached in $Q/images)"
LAYOUT=$Q/images/python
if [ ! -f "$LAYOUT/index.json" ]; then
  rm -rf "$LAYOUT.tmp"
  bash "$HERE/integration/images/python.sh" "$LAYOUT.tmp" "$Q/images/work" >"$Q/images/build.log" 2>&1 \
    || { tail -20 "$Q/images/build.log"; exit 1; }
  mv "$LAYOUT.tmp" "$LAYOUT"
fi
skopeo copy -q --preserve-digests --dest-tls-verify=false "oci:$LAYOUT:pyapp" "docker://$IMAGE"

say "6/7 indexing it with clip-builder (the index is a separate artifact; the image is unchanged)"
"$BIN/clip-builder" index --plain-http "$IMAGE" | tail -2

served() { awk '/"GET \/v2\/[^"]*\/blobs\// {for (i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/ && $(i-1) ~ /^[0-9][0-9][0-9]$/) {s+=$i; break}} END {print s+0}' "$Q/registry/registry.log"; }
size=$(skopeo inspect --raw --tls-verify=false "docker://$IMAGE" | jq '[.layers[].size] | add')

say "7/7 running it lazily: nerdctl run --snapshotter clip"
$NERDCTL rmi -f "$IMAGE" >/dev/null 2>&1 || true
before=$(served)
t0=$(date +%s.%N)
out=$($NERDCTL --snapshotter clip run --rm --net host "$IMAGE" python3 -c 'import numpy; print("numpy", numpy.__version__, "imported lazily")')
t1=$(date +%s.%N)
lazy_bytes=$(( $(served) - before ))
echo "$out"
grep " $Q/clip" /proc/mounts | grep -c fuse | xargs -I{} echo "{} layers are FUSE mounts served by clip"

say "for comparison: a full pull with containerd's overlayfs snapshotter"
before=$(served)
t2=$(date +%s.%N)
$NERDCTL --namespace quickstart-full --snapshotter overlayfs run --rm --net host "$IMAGE" python3 -c 'import numpy; print("numpy imported after a full pull")'
t3=$(date +%s.%N)
full_bytes=$(( $(served) - before ))

printf '\n%-34s %12s %14s\n' "" "time (s)" "bytes fetched"
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }
printf '%-34s %12s %14d\n' "clip (nerdctl run, lazy)" "$(secs "$t0" "$t1")" "$lazy_bytes"
printf '%-34s %12s %14d\n' "overlayfs (nerdctl run, full pull)" "$(secs "$t2" "$t3")" "$full_bytes"
printf 'image: %d compressed bytes; clip fetched %d%% of them\n' "$size" $(( 100 * lazy_bytes / size ))
cat <<EOF

Done. Logs: $Q/clip/clip.log, $C/containerd.log, $Q/registry/registry.log
Try:   $NERDCTL --snapshotter clip run --rm -it --net host $IMAGE bash
Stop:  bash $0 stop
EOF
