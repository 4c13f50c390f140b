#!/bin/bash
# Build the large test image: Debian bookworm minbase (debootstrap) + python3 with python3-scipy
# (numpy, OpenBLAS) + gcc with libc6-dev, a few hundred MB, four layers, into an OCI layout.
# Contacts only Debian's archive. Reuses the python image's debootstrap rootfs when present.
#   scipy.sh OUT_LAYOUT_DIR WORK_DIR
set -euo pipefail
OUT=$1 WORK=$2
mkdir -p "$WORK"
MIRROR=${CLIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
B="buildah --root $WORK/root --runroot $WORK/runroot --storage-driver vfs"
R=$WORK/minbase
if [ ! -x "$R/usr/bin/apt-get" ]; then
  if [ -x "$WORK/../python-work/minbase/usr/bin/apt-get" ]; then
    rm -rf "$R" && cp -a "$WORK/../python-work/minbase" "$R"
  else
    debootstrap --variant=minbase bookworm "$R" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  fi
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
apt_layer localhost/testbed/debian-minbase:bookworm localhost/testbed/scipy:base python3 python3-scipy
apt_layer localhost/testbed/scipy:base localhost/testbed/scipy:gcc gcc libc6-dev
c=$($B from localhost/testbed/scipy:gcc)
mkdir -p "$WORK/app"
cat > "$WORK/app/solve.py" <<'PY'
import numpy, scipy.linalg
print(scipy.linalg.solve(numpy.eye(3), numpy.ones(3)).sum())
PY
$B copy "$c" "$WORK/app/solve.py" /app/solve.py
$B config --cmd '["python3","/app/solve.py"]' --workingdir /app --label org.clip.testbed=scipy "$c"
$B commit --format oci --rm "$c" localhost/testbed/scipy:latest
$B push localhost/testbed/scipy:latest "oci:$OUT:scipy"
