"""Crash-safe checkpoints: a checkpoint is complete when its manifest (`<name>.json`) names the file's
size and SHA-256, so a torn or corrupted file is detected, named, and `--resume auto` falls back to the
previous complete one.

Write protocol (a kill at any point leaves the newest complete checkpoint loadable and never damages an
older one): the data goes to a temp file beside the target, hashed while it is written, then flushed and
fsynced; `os.replace` gives it its name; the folder is fsynced; the manifest is written the same way,
last. Replacing an existing name (`best.pt`) first writes a manifest that accepts the old *or* the new
file, so the pair is valid at every instant of the swap. Loading always uses `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

log = logging.getLogger("ct_siglip")
CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")
TMP_MARK = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through, so a multi-GB checkpoint is not read back
    to be hashed. It keeps the first OSError: torch.save reports a failed write as a RuntimeError, and the
    user needs the real reason (disk full, quota, permission)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data: bytes) -> int:
        try:
            self.f.write(data)  # a buffered file writes everything or raises
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> tuple[str, int]:
    """Call `write(file)` on a temp file beside `path`, fsync it, rename it to `path`, fsync the folder.
    Returns the SHA-256 and size of what was written. On any error the temp file is removed and `path`
    is untouched."""
    digest, size = _write_temp(path, write)
    _commit(path)
    return digest, size


def _write_temp(path: Path, write: Callable[[IO[bytes]], None]) -> tuple[str, int]:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            hw = _HashingWriter(f)
            try:
                write(hw)
            except Exception:
                if hw.error is not None:
                    raise hw.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hw.sha.hexdigest(), hw.size


def _commit(path: Path) -> None:
    tmp = _tmp_path(path)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write(manifest_path(path), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(manifest_path(path).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` crash-safely (see the module docstring) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size = _write_temp(path, lambda f: torch.save(state, f))
    entry = {
        "file": path.name,
        "sha256": digest,
        "bytes": size,
        "step": int(state.get("step", -1)),
        "time": round(time.time(), 3),
    }
    try:
        old = _read_manifest(path)
        if path.exists() and old is not None and old.get("bytes") == path.stat().st_size:
            # Until the rename below, `path` is still the old file: a manifest naming both keeps it valid.
            _write_manifest(path, {**entry, "previous": {k: old.get(k) for k in ("sha256", "bytes", "step")}})
        _commit(path)
    except BaseException:
        _tmp_path(path).unlink(missing_ok=True)
        raise
    _write_manifest(path, entry)
    return path


def verify_checkpoint(path: str | Path) -> str | None:
    """None if `path` is complete and intact, else the reason it is not."""
    path = Path(path)
    if not path.is_file():
        return "file missing"
    manifest = _read_manifest(path)
    if manifest is None:
        if manifest_path(path).exists():
            return "manifest unreadable"
        # The file gets its name only once written and fsynced, so without a manifest (a kill between the two
        # renames, or a copy made without it) it is checked by the CRC-32 of its records instead.
        return verify_zip_checksums(path)
    size = path.stat().st_size
    candidates = [manifest, manifest.get("previous") or {}]
    if size not in [c.get("bytes") for c in candidates]:
        return f"size {size} bytes, manifest says {manifest.get('bytes')} (truncated or torn write)"
    if sha256_file(path) not in [c.get("sha256") for c in candidates if c.get("bytes") == size]:
        return "SHA-256 differs from the manifest (corrupted)"
    return None


def verify_zip_checksums(path: Path) -> str | None:
    """For a file without its manifest (deleted, or copied alone): torch's zip format stores a CRC-32 of every
    record, so reading them all still catches a flipped bit or a torn copy. None if they all match."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"no manifest, and not a readable torch zip file ({e})"
    return None if bad is None else f"no manifest, and record {bad} fails its CRC-32 check (corrupted)"


def _is_complete_cheap(path: Path) -> bool:
    """Manifest present and size matching: enough to tell finished saves from torn ones when pruning."""
    m = _read_manifest(path)
    return (
        m is not None
        and path.is_file()
        and path.stat().st_size in (m.get("bytes"), (m.get("previous") or {}).get("bytes"))
    )


def checkpoint_step(path: Path) -> int:
    m = CKPT_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Periodic checkpoints (`step_XXXXXXXX.pt`) in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_RE.match(p.name))


def find_latest(folder: str | Path) -> Path | None:
    """The newest complete, intact periodic checkpoint; broken ones are named in the log and skipped."""
    for path in reversed(list_checkpoints(folder)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load with `weights_only=True`: tensors and plain containers only, never code. With `verify`, a file
    whose manifest does not match is refused with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if verify:
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"{path}: checkpoint is damaged ({problem}); use an older one or --resume auto")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = refused_reason(e)
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): it holds Python objects beyond tensors and plain "
            f"values, which could run code when loaded ({reason}). Only load checkpoints you trust."
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})") from None


def refused_reason(err: BaseException) -> str:
    """The informative line of torch's weights-only refusal. Its message also suggests `weights_only=False`, which
    would run whatever code the file carries: that advice is never shown to users."""
    for line in str(err).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and "weights_only" not in line and not line.startswith(("Weights only load failed", "Check the doc")):
            return line[:300]
    return "it holds Python objects beyond tensors and plain values"


def remove_stale_temps(folder: str | Path) -> int:
    """Delete temp files left by a save that was killed (only one process, rank 0, ever writes here)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [
        p
        for p in folder.iterdir()
        if p.name.startswith(".") and TMP_MARK in p.name and (p.name[1:].split(TMP_MARK)[0].endswith((".pt", ".json")))
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def prune(folder: str | Path, keep_last_n: int) -> list[Path]:
    """Delete periodic checkpoints beyond the newest `keep_last_n` complete ones; called only after a save
    completed, so the newest complete one is the one just written. Torn files older than the newest
    complete checkpoint go too; newer ones are left for the next save of that step to overwrite."""
    if keep_last_n <= 0:
        return []
    paths = list_checkpoints(folder)
    complete = [p for p in paths if _is_complete_cheap(p)]
    keep = set(complete[-keep_last_n:])
    newest = checkpoint_step(complete[-1]) if complete else -1
    removed = [p for p in paths if p not in keep and checkpoint_step(p) < newest]
    for p in removed:
        p.unlink(missing_ok=True)
        manifest_path(p).unlink(missing_ok=True)
    return removed
