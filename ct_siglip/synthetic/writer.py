"""The data-set writer and the CLI: cases to windowed NPZ files, the CSV, the cache marker, `main`.

`generate_dataset` fans cases out to worker processes (`_generate_chunk` is a top-level function so that
it pickles), writes every file atomically, and marks a complete set with its parameter file; the file
names and the cache version (`GENERATOR_VERSION`) are defined here.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .anatomy import DEFAULT_SHAPE, DEFAULT_WINDOWS, default_spacing, window
from .cases import make_case
from .findings import FINDINGS, SIDE_FINDINGS
from .preview import save_preview_png
from .reports import write_report

GENERATOR_VERSION = 7  # bump when the pictures or reports change, so cached data sets are rebuilt
CSV_NAME, PARAMS_NAME, IMAGE_DIR = "synthetic.csv", "synthetic.json", "images"
PARAPHRASE_COLUMN = "findings_paraphrase"
"""A second report of the same case, worded independently: text pairs for `ct_siglip.simcse` (never a label)."""


# --------------------------------------------------------------------------------------------- data set
def _save_npz(path: Path, image: np.ndarray, spacing: Sequence[float], compress: bool) -> None:
    """Write atomically: a reader never sees half a file, and a crash leaves no truncated volume."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, image=image, spacing=np.asarray(spacing, np.float32))
    os.replace(tmp, path)


def _generate_chunk(job: tuple) -> list[dict]:
    """Worker: draw, window and save cases `indices`; each case seeds its own generator from (seed, i)."""
    out_dir, indices, shape, spacing, seed, prevalence, compress = job
    rows = []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        hu, labels, report = make_case(rng, shape, spacing, prevalence=prevalence)
        rel = f"{IMAGE_DIR}/case_{i:05d}.npz"
        _save_npz(Path(out_dir) / rel, window(hu, DEFAULT_WINDOWS, np.float16), spacing, compress)
        # a second dictation of the same study (its own stream): the pairs that teach the text tower paraphrase
        paraphrase = write_report(np.random.default_rng([seed, i, 1]), labels)
        row = {"img_path": rel, "findings": report, PARAPHRASE_COLUMN: paraphrase}
        row.update({k: labels[k] for k in (*FINDINGS, *SIDE_FINDINGS)})
        row["effusion_side"] = labels["effusion_side"] or ""
        row["nodule_mm"] = labels["nodule_mm"]
        rows.append(row)
    return rows


def _split_counts(n: int, splits: Sequence[tuple[str, float]]) -> list[int]:
    """Largest-remainder split sizes, with at least one case per split whenever n allows it."""
    fr = np.array([float(f) for _, f in splits])
    if (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {splits}")
    raw = fr / fr.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and fr[i] > 0 and counts.max() > 1:
            counts[i] += 1
            counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def generate_dataset(
    out_dir: str | Path,
    n: int = 600,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing_mm: Sequence[float] | None = None,
    seed: int = 0,
    splits: Sequence[tuple[str, float]] = (("train", 0.8), ("val", 0.1), ("test", 0.1)),
    prevalence: float = 0.3,
    workers: int = 1,
    overwrite: bool = False,
    compress: bool = False,
    verbose: bool = False,
) -> Path:
    """Write `n` phantoms and `synthetic.csv` under `out_dir`; return the CSV path.

    Cached: when the CSV, its parameter file (`synthetic.json`) and every volume already exist for the
    same parameters, nothing is regenerated. Volumes are uncompressed by default: generation and loading
    are then fastest, at 0.5 MB per 32 x 64 x 64 case.
    """
    out = Path(out_dir)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in (spacing_mm or default_spacing(shape)))
    params = {
        "version": GENERATOR_VERSION,
        "n": int(n),
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "seed": int(seed),
        "splits": [[str(a), float(b)] for a, b in splits],
        "prevalence": float(prevalence),
        "compress": bool(compress),
        "windows": [list(w) for w in DEFAULT_WINDOWS],
    }
    csv_path, params_path = out / CSV_NAME, out / PARAMS_NAME
    if not overwrite and _cache_valid(csv_path, params_path, params):
        if verbose:
            print(f"synthetic data: reusing {n} cases in {out}")
        return csv_path
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for p in (out / IMAGE_DIR).glob(".case_*.tmp"):  # left by an interrupted run
        p.unlink(missing_ok=True)
    params_path.unlink(missing_ok=True)  # invalidate the cache until the new set is complete
    counts = _split_counts(n, splits)
    split_of = np.empty(n, dtype=object)
    perm = np.random.default_rng([seed, 2**31]).permutation(n)
    start = 0
    for (name, _), cnt in zip(splits, counts):
        split_of[perm[start : start + cnt]] = name
        start += cnt

    t0 = time.perf_counter()
    chunk = max(1, min(64, math.ceil(n / max(1, workers) / 4)))
    jobs = [
        (str(out), list(range(i, min(n, i + chunk))), shape, spacing, seed, prevalence, compress)
        for i in range(0, n, chunk)
    ]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            rows = [r for part in ex.map(_generate_chunk, jobs) for r in part]
    else:
        rows = [r for job in jobs for r in _generate_chunk(job)]
    elapsed = time.perf_counter() - t0
    keep = {f"case_{i:05d}.npz" for i in range(n)}
    for p in (out / IMAGE_DIR).glob("case_*.npz"):  # leftovers of an earlier, larger set
        if p.name not in keep:
            p.unlink()

    fields = [
        "img_path",
        "findings",
        "split",
        *FINDINGS,
        *SIDE_FINDINGS,
        "effusion_side",
        "nodule_mm",
        PARAPHRASE_COLUMN,
    ]
    tmp = csv_path.with_name(f".{CSV_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({**row, "split": split_of[i]})
    os.replace(tmp, csv_path)
    tmp = params_path.with_name(f".{PARAMS_NAME}.tmp")
    tmp.write_text(json.dumps({**params, "seconds": round(elapsed, 2)}, indent=1))
    os.replace(tmp, params_path)  # written last: its presence marks a complete set
    if verbose:
        print(
            f"synthetic data: {n} cases {shape} at {' x '.join(f'{s:.2f}' for s in spacing)} mm in {out} "
            f"({elapsed:.1f} s with {workers} worker(s), {n / elapsed:.0f} cases/s)"
        )
    return csv_path


def _cache_valid(csv_path: Path, params_path: Path, params: dict) -> bool:
    if not (csv_path.is_file() and params_path.is_file()):
        return False
    try:
        stored = json.loads(params_path.read_text())
    except (OSError, ValueError):
        return False
    stored.pop("seconds", None)
    if stored != json.loads(json.dumps(params)):
        return False
    folder = csv_path.parent / IMAGE_DIR
    return all((folder / f"case_{i:05d}.npz").is_file() for i in range(params["n"]))


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ct_siglip.synthetic --out DIR --n N`: write a phantom set and its CSV."""
    p = argparse.ArgumentParser(prog="python -m ct_siglip.synthetic", description=main.__doc__)
    p.add_argument("--out", required=True, help="output folder (CSV, parameters, images/)")
    p.add_argument("--n", type=int, default=600, help="number of cases")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"))
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SD", "SH", "SW"),
        help="voxel spacing in mm (default: a fixed 320 x 380 x 380 mm field of view)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prevalence", type=float, default=0.3, help="probability of each finding")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--compress", action="store_true", help="compressed NPZ (smaller, slower)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even when a matching set exists")
    p.add_argument("--preview", type=int, default=0, metavar="K", help="also write preview.png of K cases")
    args = p.parse_args(argv)
    csv_path = generate_dataset(
        args.out,
        args.n,
        shape=args.shape,
        spacing_mm=args.spacing,
        seed=args.seed,
        prevalence=args.prevalence,
        workers=args.workers,
        overwrite=args.overwrite,
        compress=args.compress,
        verbose=True,
    )
    if args.preview:
        print(f"preview: {save_preview_png(csv_path, Path(args.out) / 'preview.png', n=args.preview)}")
    print(csv_path)
    return 0
