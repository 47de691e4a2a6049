"""What a scan must be before the preprocessor turns it into a training volume: a chest CT.

A file that loads is not yet a chest CT: two localizer images stack into a "volume", a head CT with a 200 mm gap
between its slabs resamples to a smooth fake, an MR series converts without a word, an 8 mm field of view pads to
320 mm of air. Each of these is refused here with one line (it goes to failures.csv), from the DICOM headers before
any pixel is read, or from the loaded array's extent and values:

- DICOM: Modality CT; not a localizer (ImageType LOCALIZER); one series per folder; slice positions evenly spaced;
- every scan: a minimum extent in mm along each axis (`--min_extent_mm`); Hounsfield-like values (air near
  -1000 HU, which every chest CT holds, and not most of the image above bone).

Discovery (`find_series`): DICOM files are found by their content (the `DICM` marker), not by a `.dcm` extension
(PACS exports often have none); a folder with a single DICOM file (a stray file, a radiograph) is not a series.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import DataError

MIN_EXTENT_MM = 100.0
"""Smallest extent, along every axis, of a scan the preprocessor converts: chest CTs cover about 300 mm."""
NIFTI_SUFFIXES = (".nii.gz", ".nii")
GAP_TOLERANCE = 0.2  # a slice step more than 20 % away from the series' usual step is a gap (or an overlap)


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then `DICM`."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder`, whatever their names (DICOMDIR indexes are not images)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR" and is_dicom(p))


def find_series(root: Path) -> tuple[list[Path], list[Path]]:
    """Scans under `root`: NIfTI files and DICOM series folders (two or more DICOM files). Also returns the
    folders left out because they hold a single DICOM file."""
    nifti = [p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)]
    series, single = [], []
    for folder in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
        n = len(dicom_files(folder))
        if n >= 2:
            series.append(folder)
        elif n == 1:
            single.append(folder)
    return sorted(nifti + series), single


def quiet_monai_dicom_logs() -> None:
    """MONAI's DICOM reader says on every scan that an optional GPU decoder is missing: not the user's concern."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def check_dicom_series(folder: Path, min_extent_mm: float = MIN_EXTENT_MM) -> None:
    """Refuse (`DataError`, one line) a folder that is not one evenly spaced CT series; headers only."""
    import pydicom

    files = dicom_files(folder)
    if not files:
        raise DataError("no DICOM files in this folder", path=str(folder), hint="give the folder of one CT series")
    heads = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
    modalities = Counter(str(getattr(h, "Modality", "?")) for h in heads)
    if set(modalities) != {"CT"}:
        raise DataError(
            f"Modality {_counts(modalities)}, not CT",
            path=str(folder),
            hint="only CT series are converted (their values are Hounsfield units)",
        )
    if any("LOCALIZER" in [str(v).upper() for v in (getattr(h, "ImageType", None) or [])] for h in heads):
        raise DataError(
            f"a localizer (scout) series of {len(heads)} images (ImageType LOCALIZER), not a CT volume",
            path=str(folder),
            hint="give the axial series of the scan, not its scout",
        )
    series = Counter(str(getattr(h, "SeriesInstanceUID", "?")) for h in heads)
    if len(series) > 1:
        raise DataError(
            f"{len(series)} series mixed in one folder ({_counts(series, tail=8)} files)",
            path=str(folder),
            hint="put each series in a folder of its own (a DICOM sorter or dcm2niix does it)",
        )
    positions = _slice_positions(heads)
    if positions is not None:
        _check_spacing(positions, folder)
        steps = np.diff(positions)
        step = float(np.median(steps)) if len(steps) else float(getattr(heads[0], "SliceThickness", 0) or 0)
        rows, cols = int(heads[0].Rows), int(heads[0].Columns)
        px = [float(v) for v in getattr(heads[0], "PixelSpacing", [0, 0])]
        check_extent([len(positions) * step, rows * px[0], cols * px[1]], ["slices", "rows", "columns"], folder,
                     min_extent_mm)  # fmt: skip


def _counts(counter: Counter, tail: int = 0) -> str:
    return ", ".join(f"{k[-tail:] if tail else k} x {n}" for k, n in counter.most_common())


def _slice_positions(heads: Sequence) -> np.ndarray | None:
    """Each slice's position along the slice normal (mm), sorted; None without the geometry tags."""
    try:
        orient = np.asarray([float(v) for v in heads[0].ImageOrientationPatient]).reshape(2, 3)
        normal = np.cross(orient[0], orient[1])
        return np.sort([float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in heads])
    except (AttributeError, TypeError, ValueError):
        return None


def _check_spacing(positions: np.ndarray, folder: Path) -> None:
    steps = np.diff(positions)
    if len(steps) == 0:
        return
    if np.any(steps < 1e-3):
        k = int(np.argmax(steps < 1e-3))
        raise DataError(
            f"slices {k + 1} and {k + 2} (of {len(positions)}) lie at the same position ({positions[k]:.2f} mm)",
            path=str(folder),
            hint="the folder holds repeated slices or several acquisitions: keep one series per folder",
        )
    usual = float(np.median(steps))
    odd = np.abs(steps - usual) > GAP_TOLERANCE * usual
    if odd.any():
        k = int(np.argmax(np.abs(steps - usual)))
        raise DataError(
            f"slice spacing not uniform: {steps[k]:.1f} mm between slices {k + 1} and {k + 2} (of {len(positions)}), "
            f"{usual:.2f} mm elsewhere; {int(odd.sum())} such step{'s' if odd.sum() > 1 else ''}",
            path=str(folder),
            hint="a series with gaps cannot be resampled faithfully: export the complete series",
        )


def check_extent(extent_mm: Iterable[float], names: Sequence[str], source: str | Path, min_mm: float) -> None:
    """Refuse a scan smaller than `min_mm` along any axis (a slab, a cropped field of view, a single slice)."""
    extent = [float(v) for v in extent_mm]
    if min_mm > 0 and min(extent) < min_mm:
        shown = " x ".join(f"{v:.0f}" for v in extent)
        raise DataError(
            f"covers only {shown} mm ({' x '.join(names)}), below --min_extent_mm {min_mm:g}",
            path=str(source),
            hint="not a chest CT, or a partial series; --min_extent_mm 0 turns the check off",
        )


AIR_HU = -900.0  # every chest CT holds air (outside the body, the airways) at about -1000 HU
MAX_TYPICAL_HU = 3000.0  # bone and contrast stay below; only metal goes higher, in a few voxels


def check_hounsfield(arr, source: str | Path) -> None:
    """Refuse values that cannot be Hounsfield units of a chest CT: no air, or most of the image far above bone
    (MR, PET, an already-scaled image). `arr` is the scan as read, any array-like torch or numpy type."""
    lo = float(arr.min())
    high = float((arr > MAX_TYPICAL_HU).float().mean() if hasattr(arr, "float") else np.mean(arr > MAX_TYPICAL_HU))
    if lo > AIR_HU or high > 0.01:
        found = f"minimum {lo:.4g}" if lo > AIR_HU else f"{100 * high:.0f} % of voxels above {MAX_TYPICAL_HU:g}"
        raise DataError(
            f"not Hounsfield units of a chest CT ({found}; a chest CT holds air near -1000 HU)",
            path=str(source),
            hint="an MR or already-scaled image? only CT in HU is converted",
        )
