#!/bin/bash
# Build the FROM-scratch busybox test image (one layer) into an OCI layout.
#   busybox.sh OUT_LAYOUT_DIR WORK_DIR
# Applet links are relative (busybox --install -s would write absolute host paths).
# A second image, "pause", adds a layer with a long sleep for CRI sandboxes.
set -euo pipefail
OUT=$1 WORK=$2
mkdir -p "$WORK"
B="buildah --root $WORK/root --runroot $WORK/runroot --storage-driver vfs"
R=$WORK/rootfs
rm -rf "$R" && mkdir -p "$R"/bin "$R"/tmp "$R"/etc "$R"/proc "$R"/sys "$R"/dev "$R"/root
cp /bin/busybox "$R"/bin/busybox
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$R"/etc/passwd
echo 'root:x:0:' > "$R"/etc/group
chmod 1777 "$R"/tmp
c=$($B from scratch)
mnt=$($B mount "$c")
tar -C "$R" -cf - . | tar -C "$mnt" -xpf -
$B umount "$c"
$B config --cmd '["/bin/sh"]' --env PATH=/bin --label org.clip.testbed=busybox "$c"
$B commit --format oci --rm "$c" localhost/testbed/busybox:latest
c=$($B from localhost/testbed/busybox:latest)
$B config --cmd '["/bin/sleep","2147483647"]' --label org.clip.testbed=pause "$c"
$B commit --format oci --rm "$c" localhost/testbed/pause:latest
$B push localhost/testbed/busybox:latest "oci:$OUT:busybox"
$B push localhost/testbed/pause:latest "oci:$OUT:pause"
