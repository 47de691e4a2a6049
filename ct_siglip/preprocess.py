"""From CT scans (NIfTI files, DICOM series folders) to the NPZ volumes and the CSV the trainer reads.

One scan goes through MONAI transforms in this order, every step in Hounsfield units until the windows:

    load (nibabel / pydicom) -> channel first -> orient to RAS -> resample to --spacing (mm)
    -> crop to the body (voxels > --body_threshold HU, plus --margin_mm) -> centre pad (air, -1000 HU)
    or centre crop to --size (H, W, D) -> one channel per HU window, clipped and scaled to [0, 1]
    -> depth moved to the front: (C, D, H, W), float16

Axis meaning of the stored array (the orientation convention, README_SIGLIP_TRAINING.md, "Orientation convention"):
    D: index 0 = most inferior slice, increasing toward the patient's head (Superior)
    H: index 0 = the patient's Left side, increasing toward the patient's Right
    W: index 0 = Posterior (the back), increasing toward Anterior (the front)
This is MONAI's (H, W, D) RAS array with depth permuted to the front, which is what Merlin's image
tower sees after its own loader permutes (H, W, D) -> (D, H, W).

Outputs per scan: `<id>.npz` (compressed; `image` (C, D, H, W) float16 and `spacing` (D, H, W) mm)
and `<id>.json` (source, settings, shapes, original affine), both written atomically; the sidecar
is written last, so its presence with matching settings marks a finished scan and a rerun skips it.
Per run: the training CSV (`img_path` relative to it, `findings`, `split`, the input's extra columns)
and `failures.csv` (row, source, reason) for scans that could not be converted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .convert import PreprocessSettings, one_line, preprocess_volume
from .errors import DataError
from .scan_checks import MIN_EXTENT_MM, NIFTI_SUFFIXES, find_series

__all__ = ["Job", "PreprocessSettings", "main", "preprocess_volume", "process_job", "run_jobs"]

# ----------------------------------------------------------------------------------------------
# Writing, resuming
# ----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npz(path: Path, image: np.ndarray, spacing_dhw: list[float]) -> None:
    """Compressed NPZ with `image` (C, D, H, W) and `spacing` (mm along D, H, W), written atomically."""
    spacing = np.asarray(spacing_dhw, dtype=np.float32)
    _atomic_write(path, lambda f: np.savez_compressed(f, image=image, spacing=spacing))


def save_json(path: Path, obj: dict[str, Any]) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def is_complete(npz_path: Path, json_path: Path, settings: dict[str, Any], source: str) -> bool:
    """A scan is done when its sidecar (written last) matches these settings and the NPZ has `image`."""
    try:
        meta = json.loads(json_path.read_text())
        if meta.get("settings") != settings or meta.get("source") != source:
            return False
        with zipfile.ZipFile(npz_path) as z:  # reads the zip directory only, not the data
            return "image.npy" in z.namelist()
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


@dataclass
class Job:
    """One scan to convert; small and picklable, so it travels to worker processes cheaply."""

    row: int  # 1-based data row of the input CSV (the header is not a row)
    source: str
    out_stem: str
    settings: PreprocessSettings = field(default_factory=PreprocessSettings)
    overwrite: bool = False
    min_extent_mm: float = MIN_EXTENT_MM


def process_job(job: Job, out_dir: str) -> dict[str, Any]:
    """Convert one scan, or skip it when already done; never raises, the reason goes to failures.csv."""
    out = Path(out_dir)
    npz_path, json_path = out / f"{job.out_stem}.npz", out / f"{job.out_stem}.json"
    result = {"row": job.row, "source": job.source, "npz": npz_path.name, "status": "", "reason": "", "warnings": []}
    try:
        if not job.overwrite and is_complete(npz_path, json_path, job.settings.to_json(), job.source):
            result["status"] = "skipped"
            return result
        t0 = time.perf_counter()
        image, meta = preprocess_volume(job.source, settings=job.settings, min_extent_mm=job.min_extent_mm)
        save_npz(npz_path, image, meta["spacing_dhw_mm"])
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        save_json(json_path, meta)
        result.update(status="done", warnings=meta["warnings"])
    except DataError as e:
        result.update(status="failed", reason=one_line(e.problem + (f" ({e.hint})" if e.hint else "")))
    except Exception as e:  # one bad scan must not stop the others
        result.update(status="failed", reason=f"{type(e).__name__}: {one_line(e)}")
    return result


def _worker_init() -> None:
    # One scan per process: more threads per process would only oversubscribe the cores.
    import torch

    torch.set_num_threads(1)


def run_jobs(jobs: list[Job], out_dir: Path, workers: int) -> list[dict[str, Any]]:
    """Process all jobs with a progress bar; in-process for one worker, else a spawn process pool."""
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="Preprocessing", unit="scan", dynamic_ncols=True)
    if workers <= 1:
        for job in jobs:
            results.append(process_job(job, str(out_dir)))
            bar.update()
    else:
        # spawn: a forked child of a process that already used torch threads can deadlock.
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(process_job, job, str(out_dir)): job for job in jobs}
            for fut in cf.as_completed(futures):
                job = futures[fut]
                try:
                    results.append(fut.result())
                except Exception as e:  # a worker that died (e.g. out of memory) fails its scan only
                    results.append(
                        {
                            "row": job.row,
                            "source": job.source,
                            "npz": f"{job.out_stem}.npz",
                            "status": "failed",
                            "reason": f"worker died: {type(e).__name__}: {one_line(e)}",
                        }
                    )
                bar.update()
    bar.close()
    return sorted(results, key=lambda r: r["row"])


# ----------------------------------------------------------------------------------------------
# The table: input CSV or folder -> jobs -> training CSV
# ----------------------------------------------------------------------------------------------


def scan_name(source: str) -> str:
    """File name without .nii/.nii.gz (or the DICOM folder name), made safe for a file name."""
    name = Path(source.rstrip("/\\")).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def assign_stems(sources: list[str], ids: list[str] | None = None) -> dict[str, str]:
    """Output name per distinct source; a short hash of the path keeps same-named scans apart."""
    names = {src: scan_name(i if ids else src) for src, i in zip(sources, ids or sources)}
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    return {
        src: n if counts[n] == 1 else f"{n}_{hashlib.sha1(src.encode()).hexdigest()[:8]}" for src, n in names.items()
    }


def find_scans(input_dir: Path) -> list[Path]:
    """NIfTI files, and folders of two or more DICOM files (one series each, any file names), under `input_dir`."""
    scans, single = find_series(input_dir)
    if single:
        names = ", ".join(str(p.relative_to(input_dir)) or "." for p in single[:3])
        print(f"note: {len(single)} folders with a single DICOM file are not series, left out: {names}")
    return scans


def read_input_table(args: argparse.Namespace) -> tuple[pd.DataFrame, Path]:
    """The input rows as text columns (kept verbatim for the output) and the folder paths resolve against."""
    if args.input_csv:
        csv = Path(args.input_csv)
        if not csv.is_file():
            raise DataError("input CSV not found", path=str(csv), hint="check --input_csv")
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
        if args.image_column not in df.columns:
            raise DataError(
                f"column '{args.image_column}' missing (columns: {', '.join(df.columns)})",
                path=str(csv),
                hint="pass --image_column with the column holding scan paths",
            )
        for flag, col in (("--findings_column", args.findings_column), ("--split_column", args.split_column)):
            if col not in df.columns:
                print(
                    f"warning: {csv}: no column '{col}' ({flag}); it is left empty in the output CSV", file=sys.stderr
                )
        base = Path(args.input_dir) if args.input_dir else csv.resolve().parent
        return df, base
    if not args.input_dir:
        raise DataError("give --input_csv (a table of scans and reports) or --input_dir (a folder of scans)")
    base = Path(args.input_dir)
    if not base.is_dir():
        raise DataError("input folder not found", path=str(base), hint="check --input_dir")
    scans = find_scans(base)
    if not scans:
        raise DataError("no .nii/.nii.gz files or DICOM folders found", path=str(base))
    df = pd.DataFrame({args.image_column: [str(p.relative_to(base)) for p in scans]})
    print(f"Found {len(df)} scans in {base}; reports and splits are left empty: fill them in before training.")
    return df, base


def build_output_csv(
    df: pd.DataFrame,
    results: list[dict[str, Any]],
    sources: list[str],
    stems: dict[str, str],
    args: argparse.Namespace,
    out_dir: Path,
    output_csv: Path,
) -> pd.DataFrame:
    """Rows whose scan converted: img_path (relative to the CSV), findings, split, then the extra columns."""
    ok = {r["source"] for r in results if r["status"] in ("done", "skipped")}
    keep = [i for i, src in enumerate(sources) if src in ok]
    rel_dir = Path(os.path.relpath(out_dir.resolve(), output_csv.resolve().parent))
    out = pd.DataFrame(
        {
            "img_path": [(rel_dir / f"{stems[sources[i]]}.npz").as_posix() for i in keep],
            "findings": df[args.findings_column].iloc[keep].to_numpy() if args.findings_column in df else "",
            "split": df[args.split_column].iloc[keep].to_numpy() if args.split_column in df else "",
            "source_path": df[args.image_column].iloc[keep].to_numpy(),
        }
    )
    taken = {args.image_column, args.findings_column, args.split_column, *out.columns}
    for col in df.columns:
        if col not in taken:
            out[col] = df[col].iloc[keep].to_numpy()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ct_siglip.preprocess",
        description="Convert chest CT scans (NIfTI, DICOM series) to (C, D, H, W) float16 NPZ volumes and a training CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input_csv", help="table with one scan per row (image path, report, split, any extra columns)")
    p.add_argument(
        "--input_dir",
        help="folder the CSV's relative paths resolve against, else the CSV's folder; "
        "without --input_csv, every .nii/.nii.gz and DICOM folder under it is converted",
    )
    p.add_argument("--out_dir", required=True, help="folder for the NPZ files, JSON sidecars and CSVs")
    p.add_argument("--output_csv", help="training CSV to write; without it, OUT_DIR/dataset.csv")
    p.add_argument("--image_column", default="image", help="input column with the scan path")
    p.add_argument("--id_column", help="input column naming each scan's output file; without it, the scan's file name")
    p.add_argument("--findings_column", default="findings", help="input column with the report text")
    p.add_argument("--split_column", default="split", help="input column with train/val/test")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.25, 1.25, 2.0],
        metavar=("H", "W", "D"),
        help="target voxel size in mm (H = left-right, W = posterior-anterior, D = inferior-superior)",
    )
    p.add_argument(
        "--size", type=int, nargs=3, default=[256, 256, 192], metavar=("H", "W", "D"), help="target grid in voxels"
    )
    p.add_argument(
        "--windows",
        type=float,
        nargs="+",
        default=[-1000, 400, -1000, 2000],
        metavar="HU",
        help="HU windows as LOW HIGH pairs; one channel each",
    )
    p.add_argument("--body_threshold", type=float, default=-500.0, help="HU above which a voxel counts as body")
    p.add_argument("--margin_mm", type=float, default=10.0, help="margin kept around the body box")
    p.add_argument("--min_extent_mm", type=float, default=MIN_EXTENT_MM,
                   help="refuse scans smaller than this along any axis (slabs, cropped fields of view); 0: off")  # fmt: skip
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="parallel processes (1 = in this process)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo scans whose outputs already exist")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 when every scan converted, 1 when some failed, 2 for unusable input."""
    args = build_parser().parse_args(argv)
    if len(args.windows) % 2:
        print("error: --windows needs LOW HIGH pairs", file=sys.stderr)
        return 2
    try:
        settings = PreprocessSettings(
            spacing=tuple(args.spacing),
            size=tuple(args.size),
            windows=tuple((args.windows[i], args.windows[i + 1]) for i in range(0, len(args.windows), 2)),
            body_threshold=args.body_threshold,
            margin_mm=args.margin_mm,
        )
        df, base = read_input_table(args)
        if args.id_column and args.id_column not in df.columns:
            raise DataError(f"column '{args.id_column}' missing", path=str(args.input_csv), hint="check --id_column")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output_csv = Path(args.output_csv) if args.output_csv else out_dir / "dataset.csv"
    raw = df[args.image_column].str.strip()
    # absolute: sidecars, output names and resuming must not depend on the working directory
    sources = [os.path.abspath(Path(p).expanduser() if Path(p).expanduser().is_absolute() else base / p) for p in raw]
    ids = df[args.id_column].tolist() if args.id_column else None
    stems = assign_stems(sources, ids)

    jobs, seen, failed_early = [], set(), []
    for row, (src, text) in enumerate(zip(sources, raw), start=1):
        if not text:
            failed_early.append({"row": row, "source": "", "npz": "", "status": "failed", "reason": "empty image path"})
        elif src not in seen:  # a scan listed twice (two reports) is converted once
            seen.add(src)
            jobs.append(Job(row, src, stems[src], settings, args.overwrite, args.min_extent_mm))
    print(
        f"{len(jobs)} scans -> {out_dir} (spacing {settings.spacing} mm, size {settings.size} (H, W, D), "
        f"{len(settings.windows)} windows, {args.workers} workers)"
    )
    results = run_jobs(jobs, out_dir, args.workers) + failed_early

    table = build_output_csv(df, results, sources, stems, args, out_dir, output_csv)
    output_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_csv, index=False)
    failures = sorted((r for r in results if r["status"] == "failed"), key=lambda r: r["row"])
    failures_csv = out_dir / "failures.csv"
    if failures:
        pd.DataFrame(failures)[["row", "source", "reason"]].to_csv(failures_csv, index=False)
    elif failures_csv.exists():
        failures_csv.unlink()  # a stale list from an earlier run would mislead
    counts = {k: sum(r["status"] == k for r in results) for k in ("done", "skipped", "failed")}
    print(
        f"converted {counts['done']}, already done {counts['skipped']}, failed {counts['failed']}; "
        f"training CSV: {output_csv} ({len(table)} rows)"
    )
    warned = [r for r in results if r.get("warnings")]
    for r in warned[:10]:
        print(f"warning: row {r['row']}: {r['source']}: {'; '.join(r['warnings'])}", file=sys.stderr)
    if failures:
        print(f"failures (row numbers are data rows of the input, from 1): {failures_csv}", file=sys.stderr)
        for r in failures[:10]:
            print(f"  row {r['row']}: {r['source']}: {r['reason']}", file=sys.stderr)
        if len(failures) > 10:
            print(f"  ... and {len(failures) - 10} more", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
