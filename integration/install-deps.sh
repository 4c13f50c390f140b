#!/bin/bash
# Installs, from Debian's archive, everything clip's build and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PKGS=(
  protobuf-compiler            # protoc, for the gRPC crates
  containerd runc              # the real runtime the tests drive
  docker-registry skopeo buildah fuse3 busybox-static debootstrap
  apache2-utils openssl curl ca-certificates jq iproute2 iptables
  libseccomp-dev               # runc built from the Go module proxy (user-namespaced pods)
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

# --- Go tools: containerd 2.x, nerdctl, crictl, built from the Go module proxy at pinned versions ---
# Into a cache outside the clone ($CLIP_GO_TOOLS, default /var/tmp/clip-go-tools), one directory per
# tool and version, so a second run builds nothing. The machine's Go (/usr/local/go) is used, never
# Debian's golang-go (1.19, too old for these modules).
source integration/go-tools.env
GO=/usr/local/go/bin/go
[ -x "$GO" ] || GO=$(command -v go)
export GOMODCACHE="$CLIP_GO_TOOLS/mod" GOCACHE="$CLIP_GO_TOOLS/build-cache" GOFLAGS=-modcacherw
export CGO_ENABLED=1
build_go_tool() { # DIR VERSION -- go install/build command
  local dir=$1 version=$2; shift 2
  if [ -f "$dir/.built-$version" ]; then return; fi
  echo "== building $(basename "$dir") $version (Go $("$GO" env GOVERSION))"
  rm -rf "$dir"; mkdir -p "$dir/bin"
  "$@"
  touch "$dir/.built-$version"
  go_tools_built=1
}
go_tools_built=0
# containerd 2.x: the daemon, its runc shim and ctr (go install by version: its go.mod has no replace).
build_go_tool "$CONTAINERD2_DIR" "$CONTAINERD2_VERSION" env GOBIN="$CONTAINERD2_DIR/bin" "$GO" install \
  -ldflags "-X github.com/containerd/containerd/v2/version.Version=$CONTAINERD2_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD2_VERSION" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD2_VERSION" \
  "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD2_VERSION"
# crictl (cri-tools).
build_go_tool "$CRICTL_DIR" "$CRICTL_VERSION" env GOBIN="$CRICTL_DIR/bin" "$GO" install \
  -ldflags "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
  "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
# runc with idmapped mounts (user-namespaced pods), and the CNI plugins their pod network uses.
build_go_tool "$RUNC_DIR" "$RUNC_VERSION" env GOBIN="$RUNC_DIR/bin" "$GO" install -tags seccomp \
  -ldflags "-X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION"
build_go_tool "$CNI_PLUGINS_DIR" "$CNI_PLUGINS_VERSION" env GOBIN="$CNI_PLUGINS_DIR/bin" CGO_ENABLED=0 "$GO" install \
  "github.com/containernetworking/plugins/plugins/main/loopback@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/main/bridge@$CNI_PLUGINS_VERSION" \
  "github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_PLUGINS_VERSION"
# cosign, for the signed-index tests (pure Go).
build_go_tool "$COSIGN_DIR" "$COSIGN_VERSION" env GOBIN="$COSIGN_DIR/bin" CGO_ENABLED=0 "$GO" install \
  "github.com/sigstore/cosign/v2/cmd/cosign@$COSIGN_VERSION"
# nerdctl: its go.mod replaces the nested module mod/tigron (test tooling) by a directory that its
# module zip does not contain, so `go install mod@version` refuses it and the proxy does not serve
# tigron. Build a copy of the module without the one non-test file that imports it
# (cmd/nerdctl/helpers/testing_linux.go: helpers for nerdctl's own tests).
build_nerdctl() {
  local src
  src=$("$GO" mod download -json "github.com/containerd/nerdctl/v2@$NERDCTL_VERSION" | jq -r .Dir)
  rm -rf "$NERDCTL_DIR/src"; cp -r "$src" "$NERDCTL_DIR/src"; chmod -R u+w "$NERDCTL_DIR/src"
  rm "$NERDCTL_DIR/src/cmd/nerdctl/helpers/testing_linux.go"
  (cd "$NERDCTL_DIR/src" && "$GO" build -o "$NERDCTL_DIR/bin/nerdctl" \
      -ldflags "-X github.com/containerd/nerdctl/v2/pkg/version.Version=$NERDCTL_VERSION" ./cmd/nerdctl)
  rm -rf "$NERDCTL_DIR/src"
}
build_go_tool "$NERDCTL_DIR" "$NERDCTL_VERSION" build_nerdctl
# containerd 2.x's snapshotter conformance suite (core/snapshots/testsuite) as a test binary:
# the 1.6 harness of integration/conformance with its imports moved to containerd 2.x's
# packages, in the module of integration/conformance2 (go.mod pins the containerd version);
# rebuilt when those files change.
CONFORMANCE_SRC=(integration/conformance2/go.mod integration/conformance2/go.sum
                 integration/conformance/conformance_test.go integration/conformance/daemon_test.go)
conformance_hash=$(cat "${CONFORMANCE_SRC[@]}" | sha256sum | cut -c1-16)
build_conformance2() {
  local src="$CONFORMANCE2_DIR/src"
  rm -rf "$src"; mkdir -p "$src"; cp "${CONFORMANCE_SRC[@]}" "$src/"
  sed -i 's#"github.com/containerd/containerd/snapshots#"github.com/containerd/containerd/v2/core/snapshots#' \
    "$src/conformance_test.go"
  (cd "$src" && "$GO" test -c -o "$CONFORMANCE2_DIR/bin/conformance.test" .)
  rm -rf "$src"
}
build_go_tool "$CONFORMANCE2_DIR" "$conformance_hash" build_conformance2
# SOCI snapshotter (benchmark peer): the module of integration/soci (SOCI's library at the version
# its go.mod pins, with SOCI's replace directives, and thin mains for `serve` and `convert`, since
# SOCI's own command module is not served by the Go module proxy); rebuilt when those files change.
SOCI_SRC=(integration/soci/go.mod integration/soci/go.sum integration/soci/main.go)
soci_hash=$(cat "${SOCI_SRC[@]}" | sha256sum | cut -c1-16)
build_soci() {
  (cd integration/soci && "$GO" build -o "$SOCI_DIR/bin/clip-bench-soci" .)
}
build_go_tool "$SOCI_DIR" "$soci_hash" build_soci
# The one-node Kubernetes cluster (issue 28): kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kubectl from k8s.io/kubernetes (the `tool`s of integration/kube,
# whose go.mod pins the staging modules at the published release), and etcd's server; rebuilt when
# those files change. Versions stamped as kubernetes' own release build does.
KUBE_SRC=(integration/kube/go.mod integration/kube/go.sum integration/kube/etcd/main.go)
kube_hash=$(cat "${KUBE_SRC[@]}" | sha256sum | cut -c1-16)
build_kube() {
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local v=k8s.io/component-base/version
  (cd integration/kube && "$GO" build -o "$KUBE_DIR/bin/" -ldflags "-s -w -X $v.gitVersion=$KUBERNETES_VERSION \
      -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl)
  (cd integration/kube && "$GO" build -o "$KUBE_DIR/bin/etcd" -ldflags "-s -w" ./etcd)
}
build_go_tool "$KUBE_DIR" "$kube_hash" build_kube
# The Go build and module caches (about 10 GB together) only serve the builds above; the tools are
# kept, the caches dropped, so the disk the tests need is not spent on them. A version change
# downloads its modules again.
if [ "$go_tools_built" = 1 ]; then
  "$GO" clean -cache -modcache
fi
