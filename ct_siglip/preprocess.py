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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .errors import DataError

FORMAT_VERSION = 1  # bump when the output of the same settings changes, so reruns redo old files
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nibabel's convention, which MONAI's readers follow: the second label of each pair is the direction
# in which the world coordinate grows, so axis code "R" means "index grows toward the patient's Right".
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
STORED_AXES = {
    "C": "HU windows, in --windows order",
    "D": "inferior -> superior (index 0 = feet side)",
    "H": "patient left -> patient right (index 0 = patient's left)",
    "W": "posterior -> anterior (index 0 = patient's back)",
}


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the output array; a finished file is reused only when these match."""

    spacing: tuple[float, float, float] = (1.25, 1.25, 2.0)
    """Target voxel size in mm along (H, W, D) = (R, A, S)."""
    size: tuple[int, int, int] = (256, 256, 192)
    """Target grid (H, W, D) in voxels; the stored array is (C, D, H, W)."""
    windows: tuple[tuple[float, float], ...] = ((-1000.0, 400.0), (-1000.0, 2000.0))
    """HU windows (low, high), one output channel each, clipped and scaled to [0, 1]."""
    body_threshold: float = -500.0
    """Voxels above this HU count as body (and table) when cropping away the air around the patient."""
    margin_mm: float = 10.0
    """Kept around the body box, so the skin is not cut."""
    pad_value: float = -1000.0
    """HU used for padding (air), applied before windowing."""

    def __post_init__(self) -> None:
        # Normalise types once (CLI ints vs floats), so settings compare equal to a loaded sidecar.
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "windows", tuple((float(lo), float(hi)) for lo, hi in self.windows))
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"--spacing needs 3 positive numbers (mm along H, W, D), got {self.spacing}")
        if len(self.size) != 3 or min(self.size) <= 0:
            raise ValueError(f"--size needs 3 positive integers (H, W, D), got {self.size}")
        if not self.windows or any(len(w) != 2 or w[1] <= w[0] for w in self.windows):
            raise ValueError(f"--windows needs pairs LOW HIGH with LOW < HIGH, got {self.windows}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal to a loaded sidecar


# ----------------------------------------------------------------------------------------------
# One volume
# ----------------------------------------------------------------------------------------------


def _above(threshold: float, x):
    """Module-level (picklable) foreground selector for CropForeground."""
    return x > threshold


def load_scan(path: str | Path):
    """Read a NIfTI file or a DICOM series folder as a MONAI MetaTensor (H, W, D) with a RAS affine."""
    from monai.transforms import LoadImage

    path = Path(path)
    if path.is_dir():
        try:
            import pydicom  # noqa: F401
        except ImportError:
            raise DataError(
                "is a DICOM series folder, but pydicom is not installed",
                path=str(path),
                hint="pip install pydicom, or convert the series to NIfTI with dcm2niix",
            ) from None
        reader = "PydicomReader"
    elif path.is_file():
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise DataError("not a NIfTI file (.nii / .nii.gz) or a DICOM series folder", path=str(path))
        import nibabel as nib

        try:  # header only; MONAI's own message for an unreadable file lists readers, not the cause
            nib.load(str(path))
        except Exception as e:
            raise DataError(
                f"not a readable NIfTI file ({type(e).__name__}: {_one_line(e)})",
                path=str(path),
                hint="the file is corrupt or not NIfTI",
            ) from None
        reader = "NibabelReader"
    else:
        raise DataError("scan not found", path=str(path), hint="check the image column and --input_dir")
    try:
        img = LoadImage(image_only=True, reader=reader, dtype=np.float32)(str(path))
    except Exception as e:  # readers raise many types; the user needs the file name and the gist
        raise DataError(
            f"cannot read scan ({type(e).__name__}: {_one_line(e)})",
            path=str(path),
            hint="the file may be truncated or not an image",
        ) from None
    return img


def preprocess_volume(
    path_or_array: str | Path | np.ndarray,
    affine: np.ndarray | None = None,
    settings: PreprocessSettings | None = None,
    **overrides: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Turn one CT scan into the stored `(C, D, H, W)` float16 array in [0, 1], plus its metadata.

    `path_or_array`: a NIfTI path, a DICOM folder, or an array (X, Y, Z) of HU values whose voxel
    indices map to world millimetres through `affine` (4 x 4, nibabel's RAS+ convention: +x = patient
    Right, +y = Anterior, +z = Superior; identity when omitted). `overrides` set fields of
    `PreprocessSettings` (e.g. `size=(32, 32, 16)`).
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        CropForeground,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
        Spacing,
    )

    s = settings or PreprocessSettings()
    if overrides:
        s = PreprocessSettings(**{**asdict(s), **overrides})
    if isinstance(path_or_array, (str, Path)):
        source = str(path_or_array)
        loaded = load_scan(path_or_array)
        arr, aff = loaded.as_tensor(), torch.as_tensor(loaded.affine, dtype=torch.float64)
    else:
        source = "<array>"
        arr = torch.from_numpy(np.ascontiguousarray(path_or_array, dtype=np.float32))
        aff = torch.eye(4, dtype=torch.float64) if affine is None else torch.as_tensor(affine, dtype=torch.float64)
        if aff.shape != (4, 4):
            raise DataError(f"affine must be 4 x 4, got {tuple(aff.shape)}", path=source)
    if arr.ndim == 4 and arr.shape[-1] == 1:  # (X, Y, Z, 1) NIfTI files with a singleton 4th axis
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(
            f"expected a 3-D scan, got shape {tuple(arr.shape)}",
            path=source,
            hint="give one 3-D volume per row (split 4-D series first)",
        )
    arr = arr.float()
    # Some converters write NaN outside the reconstructed field of view: treat it as air.
    nonfinite = 0
    if not bool(torch.isfinite(arr).all()):
        nonfinite = int((~torch.isfinite(arr)).sum())
        arr = torch.nan_to_num(arr, nan=s.pad_value, posinf=s.pad_value, neginf=s.pad_value)
    warnings = []
    if float(arr.min()) > s.body_threshold:  # a chest CT always holds air (lungs, outside the body)
        warnings.append(f"no voxel below {s.body_threshold:g} HU: values may not be Hounsfield units")

    # Built channel-first on purpose: a MetaTensor made from a channel-less 3-D tensor records 2 spatial
    # dims, and MONAI's crops then leave the third axis out of the affine update (off by the crop).
    img = MetaTensor(arr[None], affine=aff)
    original_shape = [int(n) for n in arr.shape]
    original_affine = aff.numpy().copy()

    img = Orientation(axcodes="RAS", labels=RAS_LABELS)(img)
    img = Spacing(pixdim=s.spacing, mode="bilinear", padding_mode="border", dtype=np.float32)(img)
    resampled_shape = [int(n) for n in img.shape[1:]]

    body = img[0] > s.body_threshold
    if not bool(body.any()):
        hi = float(img.max())
        raise DataError(
            f"no voxel above {s.body_threshold:g} HU (max {hi:.4g})",
            path=source,
            hint="is this a CT in Hounsfield units? already-scaled volumes cannot be preprocessed",
        )
    margin = [int(np.ceil(s.margin_mm / sp)) for sp in s.spacing]
    img = CropForeground(select_fn=partial(_above, s.body_threshold), margin=margin, allow_smaller=True)(img)
    body_shape = [int(n) for n in img.shape[1:]]
    img = ResizeWithPadOrCrop(spatial_size=s.size, mode="constant", value=s.pad_value)(img)
    out_affine = np.asarray(img.affine, dtype=np.float64)  # voxel (H, W, D) -> RAS mm, after crop and pad

    hu = img.as_tensor()[0]
    hwd = torch.stack(
        [ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(hu) for lo, hi in s.windows]
    ).numpy()  # (C, H, W, D)
    image = np.ascontiguousarray(hwd.transpose(0, 3, 1, 2)).astype(np.float16)  # (C, D, H, W)

    import nibabel as nib

    meta = {
        "source": source,
        "layout": "CDHW",
        "orientation": "RAS",
        "axes": STORED_AXES,
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "spacing_dhw_mm": [s.spacing[2], s.spacing[0], s.spacing[1]],
        "windows_hu": [list(w) for w in s.windows],
        "affine_hwd_ras": out_affine.tolist(),
        "original_shape": original_shape,
        "original_affine_ras": original_affine.tolist(),
        "original_orientation": "".join(nib.aff2axcodes(original_affine, labels=RAS_LABELS)),
        "nonfinite_voxels_replaced": nonfinite,
        "original_spacing_mm": [float(v) for v in np.linalg.norm(original_affine[:3, :3], axis=0)],
        "resampled_shape_hwd": resampled_shape,
        "body_shape_hwd": body_shape,
        # The body box was larger than --size along these axes, so part of it was cut off (centre crop).
        "cropped_axes": [ax for ax, n, t in zip("HWD", body_shape, s.size) if n > t],
        "warnings": warnings,
        "settings": s.to_json(),
    }
    return image, meta


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        image, meta = preprocess_volume(job.source, settings=job.settings)
        save_npz(npz_path, image, meta["spacing_dhw_mm"])
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        save_json(json_path, meta)
        result.update(status="done", warnings=meta["warnings"])
    except DataError as e:
        result.update(status="failed", reason=_one_line(e.problem + (f" ({e.hint})" if e.hint else "")))
    except Exception as e:  # one bad scan must not stop the others
        result.update(status="failed", reason=f"{type(e).__name__}: {_one_line(e)}")
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
                            "reason": f"worker died: {type(e).__name__}: {_one_line(e)}",
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
    """NIfTI files, and folders holding .dcm files (one DICOM series each), under `input_dir`."""
    found = [p for p in input_dir.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)]
    dicom_dirs = {p.parent for p in input_dir.rglob("*.dcm")}
    return sorted(found + sorted(dicom_dirs))


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
            jobs.append(Job(row, src, stems[src], settings, args.overwrite))
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
