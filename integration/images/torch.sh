#!/bin/bash
# Build the ML benchmark image: Debian bookworm minbase + python3 + pip (apt), then torch 2.7.1
# with its CUDA library wheels (cuBLAS, cuDNN, NCCL, ...; they install without a GPU) from PyPI in
# one pip layer, then a small app — the layers a Dockerfile user makes — into an OCI layout.
# About 2.9 GB of wheels, several GB compressed. Contacts Debian's archive and PyPI only; the
# wheels are kept in WORK_DIR/wheels. Used by the hand-run benchmark, not by CI.
#   torch.sh OUT_LAYOUT_DIR WORK_DIR
set -euo pipefail
OUT=$(realpath -m "$1") WORK=$(realpath -m "$2")
mkdir -p "$WORK/wheels"
MIRROR=${CLIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
B="buildah --root $WORK/root --runroot $WORK/runroot --storage-driver vfs"
# The CUDA wheels this PyPI mirror serves pin torch 2.7.1 (later releases pin versions it lacks).
python3 -m pip download --quiet torch==2.7.1 numpy==2.4.6 --only-binary=:all: --python-version 3.11 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 -d "$WORK/wheels"
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
c=$($B from localhost/testbed/debian-minbase:bookworm)
$B run --network host "$c" -- sh -ec "export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null; \
   apt-get -q install -y --no-install-recommends python3 python3-pip >/dev/null; apt-get clean; \
   rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log /var/cache/debconf/*-old"
$B commit --format oci --rm "$c" localhost/testbed/torch:python
# RUN pip install torch (from the downloaded wheels: the same files PyPI serves).
c=$($B from localhost/testbed/torch:python)
$B run --network none --volume "$WORK/wheels:/wheels:ro" "$c" -- sh -ec \
  "pip3 install --quiet --no-cache-dir --break-system-packages --no-index --find-links /wheels torch==2.7.1 numpy==2.4.6"
$B commit --format oci --rm "$c" localhost/testbed/torch:pip
c=$($B from localhost/testbed/torch:pip)
mkdir -p "$WORK/app"
cat > "$WORK/app/infer.py" <<'PY'
# A small CPU inference: a convolutional net on a random batch.
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    torch.nn.Flatten(), torch.nn.Linear(16, 10))
with torch.no_grad():
    print(net(torch.randn(4, 3, 64, 64)).argmax(1).tolist())
PY
$B copy "$c" "$WORK/app/infer.py" /app/infer.py
$B config --cmd '["python3","/app/infer.py"]' --workingdir /app --label org.clip.testbed=torch "$c"
$B commit --format oci --rm "$c" localhost/testbed/torch:latest
$B push localhost/testbed/torch:latest "oci:$OUT:torch"
