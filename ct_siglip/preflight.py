"""Preflight: check every volume of the training and validation splits before step 1.

A corrupt scan found at hour 30 costs a restart; found before step 1 it costs nothing. Each distinct
file is opened and checked against the data contract (`volume_io.load_volume`) in worker processes
(decompression and the NaN/range scan are CPU-bound), and the verdict is cached in the run folder,
keyed by the file's size and modification time and by the settings that define "valid" (NPZ key,
channel count), so a restarted or resumed run re-checks only files that changed.

The checks use NumPy only, in plain forked processes. `preflight_tables` applies the run's policy to what they
find: stop with the first bad file, or replace bad training rows and leave bad validation rows out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .config import Config
from .distributed import all_gather_objects
from .errors import DataError
from .tables import Table, rows_text
from .volume_io import SHAPE_HINT, load_volume, shape_outliers

log = logging.getLogger("ct_siglip")
CACHE_NAME = "preflight_cache.json"
CACHE_VERSION = 2  # 2: the verdict holds the volume's shape

# (problem, hint, shape): problem None = the file is fine, and then shape is its (C, D, H, W)
Verdict = tuple[str | None, str | None, list[int] | None]


def _check_one(job: tuple[str, str, int | None, bool]) -> tuple[str, str | None, str | None, list[int] | None]:
    path, key, channels, check_values = job
    try:
        arr = load_volume(path, key, channels, check_values=check_values)
    except DataError as e:
        return path, e.problem, e.hint, None
    except Exception as e:  # whatever the loader did not foresee is still this file's problem, not a crash
        return path, f"cannot read ({type(e).__name__}: {e})", "re-create the file", None
    return path, None, None, list(arr.shape)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class PreflightCache:
    """{path: [size, mtime_ns, settings, problem, hint, shape]} in one JSON file. An entry counts only while the
    file's size and mtime and the checking settings are unchanged; a file that is not there is never cached."""

    def __init__(self, file: str | Path | None, settings: str):
        self.file = Path(file) if file else None
        self.settings = settings
        self.entries: dict[str, list] = {}
        if self.file is not None and self.file.is_file():
            try:
                data = json.loads(self.file.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = data["files"]
            except (OSError, ValueError, KeyError, AttributeError):
                log.warning("preflight cache %s unreadable; checking every file again", self.file)

    def get(self, path: str, stat: tuple[int, int]) -> Verdict | None:
        e = self.entries.get(path)
        if e is None or e[0] != stat[0] or e[1] != stat[1] or e[2] != self.settings:
            return None
        return e[3], e[4], e[5]

    def put(self, path: str, stat: tuple[int, int] | None, verdict: Verdict) -> None:
        if stat is not None:
            self.entries[path] = [stat[0], stat[1], self.settings, *verdict]

    def save(self) -> None:
        """Temp file and rename: a run killed mid-write leaves the old cache, never half a file."""
        if self.file is None:
            return
        tmp = self.file.with_name(f".{self.file.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": self.entries}))
            os.replace(tmp, self.file)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning(
                "could not write the preflight cache %s (%s); the next run checks every file again", self.file, e
            )


def check_files(
    paths: Sequence[str],
    *,
    npz_key: str = "image",
    channels: int | None = 2,
    check_values: bool = True,
    workers: int = 0,
    cache: PreflightCache | None = None,
) -> dict[str, Verdict]:
    """Verdict per distinct path: cached when size and mtime match, else checked (in `workers` processes)."""
    results: dict[str, Verdict] = {}
    stats: dict[str, tuple[int, int] | None] = {}
    todo: list[str] = []
    for path in dict.fromkeys(paths):
        stats[path] = stat = _stat(path)
        hit = cache.get(path, stat) if cache is not None and stat is not None else None
        if hit is not None:
            results[path] = hit
        else:
            todo.append(path)
    jobs = [(p, npz_key, channels, check_values) for p in todo]
    if workers > 1 and len(jobs) > 1:
        # fork: the workers only run numpy, and need not re-import the caller's modules as spawn would.
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            checked = list(pool.map(_check_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    else:
        checked = [_check_one(j) for j in jobs]
    for path, problem, hint, shape in checked:
        results[path] = (problem, hint, shape)
        if cache is not None:
            cache.put(path, stats[path], results[path])
    return results


def with_shape_rule(verdicts: dict[str, Verdict]) -> dict[str, Verdict]:
    """The verdicts with every readable file whose shape is not the run's marked bad (`shape_outliers`)."""
    shapes = {p: v[2] for p, v in verdicts.items() if v[0] is None and v[2] is not None}
    _, odd = shape_outliers(shapes)
    return {p: (odd[p], SHAPE_HINT, v[2]) if p in odd else v for p, v in verdicts.items()}


def table_errors(table: Table, verdicts: dict[str, Verdict]) -> list[DataError]:
    """One `DataError` (file, CSV row, problem, fix) per row whose file failed."""
    errors = []
    for path, row in zip(table.frame["path"], table.frame["row"]):
        problem, hint, _ = verdicts.get(path, (None, None, None))
        if problem is not None:
            errors.append(DataError(problem, path=path, row=int(row), hint=hint))
    return errors


def run_preflight(
    tables: Sequence[Table],
    *,
    npz_key: str,
    channels: int | None,
    check_values: bool = True,
    workers: int = 0,
    cache_file: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    exchange: Callable[[dict], list[dict]] | None = None,
) -> list[DataError]:
    """Check every file of `tables`; return the bad rows (empty when all is well).

    With several processes each rank checks a 1/world_size share and `exchange` (an all-gather) gives every
    rank the whole verdict, so no rank waits idle at a barrier while another reads the whole data set.
    """
    t0 = time.perf_counter()
    cache = PreflightCache(cache_file, settings=f"key={npz_key}|channels={channels}|values={check_values}")
    paths = sorted({p for t in tables for p in t.frame["path"]})
    mine = check_files(
        paths[rank::world_size],
        npz_key=npz_key,
        channels=channels,
        check_values=check_values,
        workers=workers,
        cache=cache,
    )
    verdicts: dict[str, Verdict] = {}
    for part in exchange(mine) if exchange is not None and world_size > 1 else [mine]:
        verdicts.update(part)
    if rank == 0:
        for path, verdict in verdicts.items():
            cache.put(path, _stat(path), verdict)
        cache.save()
    verdicts = with_shape_rule(verdicts)  # over every split: training and validation batches share the model
    errors = [e for t in tables for e in table_errors(t, verdicts)]
    log.info("Preflight: %d files checked in %.1f s (%d bad)", len(paths), time.perf_counter() - t0, len(errors))
    return errors


def preflight_tables(
    cfg: Config, train: Table, val: Table | None, run_dir: Path, rank: int, world_size: int
) -> tuple[Table, Table | None]:
    """Check every file before step 1 (see `preflight`). With --on_bad_sample error any bad file stops the
    run here; with skip, bad training rows are replaced when drawn (counted) unless there are too many,
    and bad validation rows are left out. Returns the training table (its bad rows marked, so the data set
    replaces them whatever a later read of the file would say) and the validation table to use."""
    tables = [t for t in (train, val) if t is not None]
    errors = run_preflight(
        tables,
        npz_key=cfg.npz_key,
        channels=cfg.in_channels,
        workers=cfg.num_workers,
        cache_file=run_dir / CACHE_NAME,
        rank=rank,
        world_size=world_size,
        exchange=all_gather_objects,
    )
    if not errors:
        return train, val
    listing = run_dir / "preflight_errors.csv"
    if rank == 0:
        with open(listing, "w", newline="") as f:
            csv.writer(f).writerows([["path", "row", "problem"], *[[e.path, e.row, e.problem] for e in errors]])
    first = errors[0]
    if cfg.on_bad_sample == "error":
        more = f"; {len(errors) - 1} more bad rows in {listing}" if len(errors) > 1 else ""
        raise DataError(
            first.problem,
            path=first.path,
            row=first.row,
            hint=f"{first.hint or 'fix the file'}{more}; --on_bad_sample skip replaces bad samples",
        )
    train_paths = set(train.frame["path"])
    n_train = sum(e.path in train_paths for e in errors)
    if n_train > cfg.max_bad_fraction * len(train):
        raise DataError(
            f"{n_train} of {len(train)} training rows are bad, above --max_bad_fraction {cfg.max_bad_fraction}",
            path=str(listing),
            hint="fix or remove the files listed there",
        )
    if n_train:
        log.warning("Preflight: %d bad training rows will be replaced when drawn (listed in %s)", n_train, listing)
        train = mark_bad_rows(train, [e for e in errors if e.path in train_paths])
    if val is not None:
        bad = {e.path for e in errors}
        keep = ~val.frame["path"].isin(bad)
        if not keep.all():
            log.warning(
                "Preflight: %s of the validation split left out (bad files)", rows_text(val.frame["row"][~keep])
            )
            val = dataclasses.replace(val, frame=val.frame[keep].reset_index(drop=True))
    return train, val


def mark_bad_rows(table: Table, errors: Sequence[DataError]) -> Table:
    """A copy of `table` that knows what the preflight found wrong with each of these files."""
    return dataclasses.replace(table, known_bad={**table.known_bad, **{e.path: (e.problem, e.hint) for e in errors}})
