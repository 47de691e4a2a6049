"""Reading and checking one NPZ volume: the data contract of SPEC.md in one place.

A volume is `(C, D, H, W)`, float16 or float32, values in [0, 1]; C windows of the same scan.
Both the training data set and `--validate_csv` call `load_volume`, so they agree on what is valid.
`VolumeCache` (`--cache_dir`) keeps decoded volumes as plain `.npy`, checked the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

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
        raise DataError(
            _not_a_file(path), path=str(path), row=row, hint="check the img_path column and the CSV's folder"
        )
    try:
        arr = _read_npz(path, key)
    except DataError as e:
        raise DataError(e.problem, path=str(path), row=row, hint=e.hint) from None
    except MemoryError:
        raise
    except Exception as e:  # zlib.error, BadZipFile, a pickle, a bad header...: all this file's problem
        raise DataError(
            f"cannot read NPZ ({_error_name(e)}: {_first_line(e)})",
            path=str(path),
            row=row,
            hint="the file is truncated or corrupt; re-create it",
        ) from None
    if not arr.dtype.isnative:  # big-endian float32 is valid data; torch reads native byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    check_array(arr, channels, path=str(path), row=row, check_values=check_values)
    return arr


def _not_a_file(path: Path) -> str:
    if path.is_dir():
        return "is a folder, not an NPZ file"
    if path.exists():
        return "is not a regular file (a device, pipe or socket)"
    return "file not found"


def _error_name(e: BaseException) -> str:
    """`zlib.error` rather than a bare `error`: the module says what failed."""
    kind = type(e)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _read_npz(path: Path, key: str) -> np.ndarray:
    """`path[key]`, read without ever unpickling; a `DataError` (no path yet) for what is not a usable NPZ."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(
            "holds a plain .npy array, not an NPZ archive",
            hint=f"re-save it with np.savez(path, {key}=array), or convert the folder with python -m ct_siglip.preprocess",
        )
    if not magic.startswith(b"PK"):
        raise DataError(
            "is not an NPZ archive (no zip header: corrupt, or another format)",
            hint="re-create it with np.savez or python -m ct_siglip.preprocess",
        )
    with np.load(path, allow_pickle=False) as npz:
        if key not in npz.files:
            raise DataError(
                f"key '{key}' missing (keys: {', '.join(npz.files) or 'none'})",
                hint="pass --npz_key with the right name",
            )
        try:
            arr = npz[key]
        except ValueError as e:
            if "pickle" in str(e):  # numpy's message suggests allow_pickle=True: never advise unsafe loading
                raise DataError(
                    f"member '{key}' holds a pickled object, not a numeric array",
                    hint="re-create the file with np.savez",
                ) from None
            raise
    if not isinstance(arr, np.ndarray):  # numpy returns a member without the .npy header as raw bytes
        raise DataError(f"member '{key}' is not an .npy array", hint="re-create the file with np.savez")
    return arr


def check_array(
    arr: np.ndarray, channels: int | None, *, path: str | None = None, row: int | None = None, check_values: bool = True
) -> None:
    """Raise `DataError` unless `arr` is a finite `(C, D, H, W)` float array in [0, 1]."""
    if arr.ndim != 4:
        raise DataError(
            f"expected a 4-D array (C, D, H, W), got shape {tuple(arr.shape)}",
            path=path,
            row=row,
            hint="store volumes as (C, D, H, W); see README 'NPZ contract'",
        )
    if 0 in arr.shape:
        raise DataError(f"empty array (shape {tuple(arr.shape)})", path=path, row=row, hint="re-create the file")
    if channels is not None and arr.shape[0] != channels:
        raise DataError(
            f"expected {channels} channels, got {arr.shape[0]} (shape {tuple(arr.shape)})",
            path=path,
            row=row,
            hint="set --in_channels or re-create the file",
        )
    if arr.dtype.type not in FLOAT_DTYPES:
        raise DataError(
            f"dtype {arr.dtype} is not float16/float32",
            path=path,
            row=row,
            hint="scale HU windows to [0, 1] floats (python -m ct_siglip.preprocess)",
        )
    if check_values and not _float16_in_unit_range(arr):
        lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates through min/max
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError("contains NaN or Inf voxels", path=path, row=row, hint="re-create the file")
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"values outside [0, 1] (min {lo:.4g}, max {hi:.4g})",
                path=path,
                row=row,
                hint="window and scale HU values to [0, 1] (python -m ct_siglip.preprocess)",
            )


SHAPE_HINT = "resample and crop every volume to one size (python -m ct_siglip.preprocess does), or remove the file"


def shape_outliers(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[int, ...] | None, dict[str, str]]:
    """The run's volume shape and, per file of another shape, the problem: a batch stacks volumes of one shape.

    The run's shape is the most common one (on a tie, the first in sorted order), so a few odd files are named
    rather than the many right ones. The preflight, `--validate_csv` and the collator apply this one rule.
    """
    counts = Counter(tuple(int(n) for n in s) for s in shapes.values())
    if not counts:
        return None, {}
    common = max(sorted(counts), key=lambda s: counts[s])
    if len(counts) == 1:
        return common, {}
    problems = {
        path: f"shape {_shape_text(s)} differs from the run's {_shape_text(common)} (that of {counts[common]} of "
        f"{len(shapes)} files): a batch stacks volumes of one shape"
        for path, s in shapes.items()
        if tuple(int(n) for n in s) != common
    }
    return common, problems


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(map(str, shape))


_FLOAT16_ONE = 0x3C00


def _float16_in_unit_range(arr: np.ndarray) -> bool:
    """True when `arr` is float16 and every voxel is in [+0, 1] (False says nothing: check exactly).

    Read as unsigned 16-bit integers, +0 .. 1.0 are exactly 0x0000 .. 0x3C00, and every negative value, NaN and
    Inf lies above. numpy's float16 min/max loop element by element; one integer max is about 40x faster
    (0.016 ms against 0.65 ms for a (2, 16, 48, 48) volume, a quarter of the loader's time per sample)."""
    return arr.dtype == np.float16 and int(arr.view(np.uint16).max(initial=0)) <= _FLOAT16_ONE


# ----------------------------------------------------------------------------- decoded-volume cache
CACHE_FORMAT = 1  # bump when what a cache entry holds changes: old entries are then never read
_TMP_MARK = ".tmp-"
_STALE_TEMP_S = 3600.0  # a temp file this old belongs to a killed writer (a write takes seconds)


class VolumeCache:
    """`--cache_dir`: decoded volumes as uncompressed `.npy`, so compressed NPZ is decoded once, not every epoch.

    An entry is named by a hash of the source's absolute path, size and mtime_ns, the NPZ key and the channel
    count: a changed source gets a new name and is never served stale. Entries are written to a unique temp file
    in the same folder, fsynced and renamed, so readers (other loader workers, other DDP ranks) see a whole file
    or none, and concurrent writers of one entry simply replace each other with the same bytes. A cached array
    is checked like a decoded one; an entry that fails to load or to pass is rebuilt from the source. A folder
    that cannot be written (read-only, disk full) turns writing off for this process, with one warning; reads
    then come from the source (and from entries already there).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.writable = True
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
        except OSError as e:
            self._disable(e)

    def entry(self, path: str | Path, key: str, channels: int | None) -> Path | None:
        """The cache file for this source as it is now on disk (None if it cannot be stat'ed)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        ident = json.dumps([CACHE_FORMAT, os.path.abspath(path), st.st_size, st.st_mtime_ns, key, channels])
        digest = hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()
        return self.folder / f"{Path(path).stem[:64]}-{digest}.npy"

    def load(
        self,
        path: str | Path,
        key: str = "image",
        channels: int | None = 2,
        *,
        row: int | None = None,
        check_values: bool = True,
    ) -> np.ndarray:
        """What `load_volume` returns (same bytes, same checks), from the cache when it holds a valid entry."""
        entry = self.entry(path, key, channels)
        if entry is not None:
            cached = self._read(entry, channels, check_values)
            if cached is not None:
                return cached
        arr = load_volume(path, key, channels, row=row, check_values=check_values)
        if entry is not None and self.writable:
            self._write(entry, arr)
        return arr

    def _read(self, entry: Path, channels: int | None, check_values: bool) -> np.ndarray | None:
        try:
            mapped = np.load(entry, mmap_mode="r", allow_pickle=False)
            arr = np.array(mapped)  # read every page now: a writable array, and no file handle kept open
            del mapped
            check_array(arr, channels, path=str(entry), check_values=check_values)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:  # truncated or damaged (DataError is a ValueError): rebuild
            log.info("volume cache: rebuilding %s (%s)", entry.name, str(e).splitlines()[0][:200])
            return None
        return arr

    def _write(self, entry: Path, arr: np.ndarray) -> None:
        tmp = entry.with_name(f".{entry.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, entry)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._disable(e)

    def _disable(self, error: OSError) -> None:
        self.writable = False
        log.warning(
            "--cache_dir %s cannot be written (%s); volumes are read from their sources instead (free disk space "
            "or choose another --cache_dir to get the cache back)",
            self.folder,
            error.strerror or error,
        )

    def _remove_stale_temps(self) -> None:
        """Temp files of writers killed mid-write; recent ones may belong to a live writer and are left alone."""
        now = time.time()
        for p in self.folder.glob(f".*{_TMP_MARK}*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > _STALE_TEMP_S:
                    p.unlink()
