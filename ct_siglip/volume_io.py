"""Reading and checking one NPZ volume: the data contract of SPEC.md in one place.

A volume is `(C, D, H, W)`, float16 or float32, values in [0, 1]; C windows of the same scan.
Both the training data set and `--validate_csv` call `load_volume`, so they agree on what is valid.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

FLOAT_DTYPES = (np.float16, np.float32)


def load_volume(
    path: str | Path,
    key: str = "image",
    channels: int | None = 2,
    *,
    row: int | None = None,
    check_values: bool = True,
) -> np.ndarray:
    """Load `path[key]` and check it against the contract; raise `DataError` naming file and row.

    `check_values` scans for NaN/Inf and values outside [0, 1]; it costs one pass over the array,
    small next to decompression.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=str(path), row=row, hint="check the img_path column and the CSV's folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DataError(
                    f"key '{key}' missing (keys: {', '.join(npz.files) or 'none'})",
                    path=str(path), row=row, hint="pass --npz_key with the right name",
                )
            arr = npz[key]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise DataError(f"cannot read NPZ ({type(e).__name__}: {e})", path=str(path), row=row,
                        hint="the file is truncated or corrupt; re-create it") from None
    check_array(arr, channels, path=str(path), row=row, check_values=check_values)
    return arr


def check_array(arr: np.ndarray, channels: int | None, *, path: str | None = None, row: int | None = None,
                check_values: bool = True) -> None:
    """Raise `DataError` unless `arr` is a finite `(C, D, H, W)` float array in [0, 1]."""
    if arr.ndim != 4:
        raise DataError(f"expected a 4-D array (C, D, H, W), got shape {tuple(arr.shape)}", path=path, row=row,
                        hint="store volumes as (C, D, H, W); see README 'NPZ contract'")
    if channels is not None and arr.shape[0] != channels:
        raise DataError(f"expected {channels} channels, got {arr.shape[0]} (shape {tuple(arr.shape)})",
                        path=path, row=row, hint="set --in_channels or re-create the file")
    if arr.dtype.type not in FLOAT_DTYPES:
        raise DataError(f"dtype {arr.dtype} is not float16/float32", path=path, row=row,
                        hint="scale HU windows to [0, 1] floats (python -m ct_siglip.preprocess)")
    if check_values:
        lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates through min/max
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError("contains NaN or Inf voxels", path=path, row=row, hint="re-create the file")
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"values outside [0, 1] (min {lo:.4g}, max {hi:.4g})", path=path, row=row,
                            hint="window and scale HU values to [0, 1] (python -m ct_siglip.preprocess)")
