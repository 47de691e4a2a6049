"""PNG pictures of a run: training curves from `metrics.jsonl`, ROC curves from an evaluation.

python -m ct_siglip.plots RUN_DIR            # -> RUN_DIR/curves.png (+ zeroshot_<split>.png if evaluated)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from .runlog import read_metrics


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[name]) for r in records if r.get(name) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_panels(records: list[dict]) -> list[tuple[str, list[str]]]:
    """(title, metric names) of each panel of `plot_curves`, keeping only the metrics the run logged."""
    panels = [
        ("loss", ["train/loss", "val/loss", "train/pair_loss"]),  # the pair loss: --text_pair_weight runs
        ("learning rate", ["train/lr"]),
        ("temperature t and bias b", ["train/t", "train/b"]),
        ("retrieval", [f"val/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]),
        ("zero-shot AUROC", sorted({k for r in records for k in r if k.startswith("val/zeroshot_auroc")})),
    ]
    panels = [(t, [n for n in names if _series(records, n)[0]]) for t, names in panels]
    return [(t, names) for t, names in panels if names]


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss (train and val), learning rate, t and b, retrieval and zero-shot AUROC against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    panels = curve_panels(records)
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.4 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        short = [n.split("/", 1)[1] for n in names]
        colours = distinct_colours(len(names))
        for n, s, colour in zip(names, short, colours):
            x, y = _series(records, n)
            label = n if short.count(s) > 1 else s  # train/loss and val/loss keep their prefix
            ax.plot(x, y, marker="o" if len(x) < 20 else None, ms=3, label=label, lw=1.5, color=colour)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: training curves")
    fig.tight_layout()
    out = Path(out or run_dir / "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_roc(scores_file: str | Path, out: str | Path | None = None) -> Path:
    """ROC curve per label from an evaluation's `zeroshot_<split>.npz` (score_<label>, label_<label>)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import roc_auc

    data = np.load(scores_file)
    names = [k.removeprefix("score_") for k in data.files if k.startswith("score_")]
    fig, ax = plt.subplots(figsize=(6, 6))
    for name, colour in zip(names, distinct_colours(len(names))):
        s, y = data[f"score_{name}"], data[f"label_{name}"]
        keep = y >= 0
        fpr, tpr = roc_points(s[keep], y[keep])
        if len(fpr):
            ax.plot(fpr, tpr, lw=1.5, color=colour, label=f"{name} ({roc_auc(s, y):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("zero-shot ROC")
    ax.legend(fontsize=7, loc="lower right")
    out = Path(out or Path(scores_file).with_suffix(".png"))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def distinct_colours(n: int) -> list:
    """`n` colours that differ: matplotlib's 10-colour cycle repeats from the 11th line (a run with ten labels and
    their mean has 11), tab20 keeps 20 apart."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """The pictures of a finished run: curves.png, and zeroshot_<split>.png (ROC per label) for each split whose
    scores an evaluation left in the folder (training leaves its last validation's, zeroshot_val.npz)."""
    run_dir = Path(run_dir)
    written = []
    if (run_dir / "metrics.jsonl").is_file():
        written.append(plot_curves(run_dir))
    for scores in sorted(run_dir.glob("zeroshot_*.npz")):
        written.append(plot_roc(scores))
    return written


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); empty if a class is absent."""
    pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
    if pos == 0 or neg == 0:
        return np.array([]), np.array([])
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp, fp = np.cumsum(y == 1)[last_of_tie], np.cumsum(y == 0)[last_of_tie]
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw a run's training curves and ROC curves as PNG files.")
    p.add_argument("run_dir", help="a --save_dir holding metrics.jsonl")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"error: {run_dir / 'metrics.jsonl'} not found; pass a run folder (--save_dir)", file=sys.stderr)
        return 2
    for path in write_run_plots(run_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
