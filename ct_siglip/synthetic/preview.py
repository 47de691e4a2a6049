"""A PNG contact sheet of a generated set (axial and coronal slices with the report), for eyeballing it.

Reads only the CSV and the NPZ files, so it works on any set the writer produced; matplotlib is
imported lazily, inside the function, so the generator itself does not need it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .findings import FINDINGS


# --------------------------------------------------------------------------------------------- preview
def save_preview_png(csv_path: str | Path, out_png: str | Path, n: int = 4, *, split: str | None = None) -> Path:
    """A PNG of `n` phantoms: axial slice in both windows and a coronal slice, with the report beneath.

    Displayed in radiological convention: patient right on the viewer's left, anterior (axial) and
    superior (coronal) at the top.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r.get("split") == split][:n]
    if not rows:
        raise ValueError(f"{csv_path}: no rows to preview" + (f" in split {split!r}" if split else ""))
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 4.6 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        with np.load(csv_path.parent / row["img_path"]) as npz:
            img = npz["image"].astype(np.float32)
        d, _, w = img.shape[1:]
        z, yw = int(0.4 * d), int(0.4 * w)  # a little below the middle and behind it: bases, fluid, heart
        panels = [
            (img[0, z].T[::-1, ::-1], f"axial slice {z}, window (-1000, 400)"),
            (img[1, z].T[::-1, ::-1], f"axial slice {z}, window (-1000, 2000)"),
            (img[0, :, :, yw][::-1, ::-1], f"coronal slice {yw}, window (-1000, 400)"),
        ]
        for ax, (pic, title) in zip(ax_row, panels):
            ax.imshow(pic, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel("R <-> L", fontsize=7)
        positives = [k for k in FINDINGS if str(row.get(k, "0")) == "1"]
        text = f"{row['img_path']} [{', '.join(positives) or 'normal'}]\n" + textwrap.fill(row["findings"], 150)
        ax_row[1].set_xlabel(text, fontsize=7, wrap=True)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
