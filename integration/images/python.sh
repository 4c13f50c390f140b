#!/bin/bash
# Build the realistic test image: Debian bookworm minbase (debootstrap) + python3 + python3-numpy +
# a tiny app, four layers, into an OCI layout. Contacts only Debian's archive.
#   python.sh OUT_LAYOUT_DIR WORK_DIR
set -euo pipefail
OUT=$1 WORK=$2
mkdir -p "$WORK"
MIRROR=${CLIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
B="buildah --root $WORK/root --runroot $WORK/runroot --storage-driver vfs"
R=$WORK/minbase
if [ ! -x "$R/usr/bin/apt-get" ]; then
  debootstrap --variant=minbase bookworm "$R" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
fi
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/var/log/*.log "$R"/var/log/apt/* || true
c=$($B from scratch)
mnt=$($B mount "$c")
tar -C "$R" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
$B umount "$c"
$B config --cmd '["/bin/bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --label org.clip.testbed=minbase "$c"
$B commit --format oci --rm "$c" localhost/testbed/debian-minbase:bookworm
apt_layer() { # from to packages...
  local from=$1 to=$2; shift 2
  local c; c=$($B from "$from")
  $B run --network host "$c" -- sh -ec "export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null; \
     apt-get -q install -y --no-install-recommends $* >/dev/null; apt-get clean; \
     rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old"
  $B commit --format oci --rm "$c" "$to"
}
apt_layer localhost/testbed/debian-minbase:bookworm localhost/testbed/python:3-slim python3
apt_layer localhost/testbed/python:3-slim localhost/testbed/python:3-numpy python3-numpy
c=$($B from localhost/testbed/python:3-numpy)
mkdir -p "$WORK/app"
cat > "$WORK/app/hello.py" <<'PY'
import sys, numpy
print("hello from", sys.version.split()[0], "numpy", numpy.__version__, numpy.arange(10).sum())
PY
$B copy "$c" "$WORK/app/hello.py" /app/hello.py
$B config --cmd '["python3","/app/hello.py"]' --workingdir /app --label org.clip.testbed=pyapp "$c"
$B commit --format oci --rm "$c" localhost/testbed/pyapp:latest
$B push localhost/testbed/pyapp:latest "oci:$OUT:pyapp"
