#!/usr/bin/env python3
"""Bar chart of cold-start medians per mode and workload, one panel per link and image.
Usage: plot_cold_start.py cold-start.csv cold-start.png (needs python3-matplotlib)."""
import csv
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
groups = defaultdict(list)
for r in rows:
    groups[(r["link"], r["image"], r["workload"], r["mode"])].append(float(r["seconds"]))
if not groups:
    sys.exit("no samples")
panels = sorted({(k[0], k[1]) for k in groups})
ORDER = ["overlayfs", "clip", "clip-profile", "clip-cri", "soci", "soci-tuned", "estargz", "estargz-opt"]
WORKLOADS = ["print", "numpy", "torch", "infer", "fullread"]
modes = sorted({k[3] for k in groups}, key=lambda m: (ORDER.index(m) if m in ORDER else 9, m))
fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
for ax, (link, image) in zip(axes[0], panels):
    workloads = sorted({k[2] for k in groups if k[0] == link and k[1] == image}, key=lambda w: WORKLOADS.index(w) if w in WORKLOADS else 9)
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            v = groups.get((link, image, w, mode))
            if v:
                xs.append(j + i * width)
                ys.append(statistics.median(v))
        ax.bar(xs, ys, width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(workloads))])
    ax.set_xticklabels(workloads)
    ax.set_title(f"{image}, {link}")
    ax.set_ylabel("seconds (median, cold)")
axes[0][0].legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
