"""Crash-safe checkpoints: write to a temp file, fsync, rename, fsync the folder; a manifest with the
SHA-256 of the file marks it complete, so a torn or corrupted file is detected and `--resume auto`
falls back to the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")


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


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file)` on a temp file beside `path`, then make it `path` in one rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` atomically, then its manifest (`<name>.json`, also atomic) last: a checkpoint
    without a matching manifest was never completed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    manifest = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                "step": int(state.get("step", -1))}
    atomic_write_bytes(path.with_suffix(".json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return path


def verify_checkpoint(path: str | Path) -> str | None:
    """None if `path` is complete and intact, else the reason it is not."""
    path = Path(path)
    manifest_path = path.with_suffix(".json")
    if not path.is_file():
        return "file missing"
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "manifest unreadable"
    if path.stat().st_size != manifest.get("bytes"):
        return f"size {path.stat().st_size} != {manifest.get('bytes')} in the manifest (truncated)"
    if sha256_file(path) != manifest.get("sha256"):
        return "SHA-256 differs from the manifest (corrupted)"
    return None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Periodic checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_RE.match(p.name))


def find_latest(folder: str | Path) -> Path | None:
    """The newest complete, intact checkpoint; broken ones are named in the log and skipped."""
    for path in reversed(list_checkpoints(folder)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load with `weights_only=True` (no arbitrary pickles), after checking the manifest if present."""
    path = Path(path)
    if verify and path.with_suffix(".json").is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise RuntimeError(f"{path}: checkpoint is damaged ({problem}); use an older one or --resume auto")
    return torch.load(path, map_location="cpu", weights_only=True)


def prune(folder: str | Path, keep_last_n: int) -> None:
    """Delete all but the newest `keep_last_n` periodic checkpoints (called after a save completed)."""
    if keep_last_n <= 0:
        return
    for path in list_checkpoints(folder)[:-keep_last_n]:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
