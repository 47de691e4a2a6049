"""Data: CSV and legacy directory tables, the volume/report dataset, a resumable sampler, collation.

Tables are pandas frames with fixed column names (`path`, `text`, `row`, labels...). The dataset
keeps numpy arrays of those columns, not per-row Python objects, so forked workers share them.
Text is tokenized in the collate function, inside the worker processes.
"""

from __future__ import annotations

import atexit
import difflib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.util  # registers its exit hook before ours: hooks run last-in, first-out)
import os
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from .errors import DataError
from .volume_io import SHAPE_HINT, VolumeCache, load_volume, shape_outliers

log = logging.getLogger(__name__)


@dataclass
class Table:
    """One split: resolved NPZ paths, report texts, source row numbers, optional label columns."""

    frame: pd.DataFrame  # columns: path, text, row (+ pair_text with a pair column, + label columns)
    source: str  # the CSV file or directory it came from
    label_columns: list[str]
    missing_reports: int = 0
    missing_report_rows: list[int] = field(default_factory=list)  # source rows that got the placeholder
    report_source: str = ""  # where the reports come from, for a message about missing ones
    known_bad: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # path -> (problem, hint), preflight

    def __len__(self) -> int:
        return len(self.frame)


def _clean_reports(texts: pd.Series, placeholder: str) -> tuple[pd.Series, pd.Series]:
    missing = texts.isna() | texts.astype(str).str.strip().eq("")
    return texts.where(~missing, placeholder).astype(str), missing


def rows_text(rows: Sequence[int], limit: int = 5) -> str:
    """'row 3' / 'rows 3, 8, 12 and 4 more': messages name rows without printing thousands of them."""
    rows = [int(r) for r in rows]
    head = ", ".join(map(str, rows[:limit]))
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {head}{more}"


def read_csv_table(
    csv_file: str | Path,
    split: str,
    *,
    img_path_column: str = "img_path",
    findings_column: str = "findings",
    split_column: str = "split",
    label_columns: list[str] | None = None,
    missing_report_text: str = "No report available.",
    on_bad_rows: str = "error",
    known_splits: Sequence[str] = (),
    pair_column: str | None = None,
) -> Table:
    """The rows of `split`; relative image paths resolve against the CSV's folder.

    Rows are numbered as data rows counted from 1 (the header is not a row), the numbering that
    `--validate_csv` and every error message use. Table problems, as `--validate_csv` defines them:
    a repeated row (same image and report) is an error, or dropped (after the first) with
    `on_bad_rows="skip"`; one image in two splits leaks into validation and is an error, or a warning
    with "skip". Rows the run will not use (empty or unknown split value, given `known_splits`) and
    missing reports (replaced by `missing_report_text`) are named in warnings. `pair_column` adds each row's
    second text (`pair_text`; an empty one falls back to the row's report, with a warning).
    """
    csv_file = Path(csv_file)
    src = str(csv_file)
    if not csv_file.is_file():
        raise DataError("CSV file not found", path=src, hint="check --csv_file")
    try:
        df = pd.read_csv(
            csv_file, dtype={img_path_column: str, split_column: str, findings_column: str}, keep_default_na=True
        )
    except pd.errors.EmptyDataError:
        raise DataError("CSV file is empty", path=src, hint="it needs a header and one row per scan") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(
            f"cannot parse CSV ({' '.join(str(e).split())})",
            path=src,
            hint="check quoting and the file encoding (UTF-8)",
        ) from None
    for flag, col in (
        ("--img_path_column", img_path_column),
        ("--findings_column", findings_column),
        ("--split_column", split_column),
        *((("--text_pair_column", pair_column),) if pair_column else ()),
    ):
        if col not in df.columns:
            raise DataError(
                f"column '{col}' missing (columns: {', '.join(map(str, df.columns))})",
                path=src,
                hint=f"pass {flag} with the right name",
            )
    if df.empty:
        raise DataError("CSV has no data rows", path=src, hint="add one row per scan under the header")
    df["__row"] = np.arange(1, len(df) + 1)
    splits = df[split_column].fillna("").astype(str).str.strip()
    if known_splits:
        _warn_unused_rows(df["__row"], splits, known_splits, src)
    in_split = (splits == split).to_numpy()
    if not in_split.any():
        found = sorted(set(splits) - {""})
        close = difflib.get_close_matches(split, found, n=1, cutoff=0.6) or [
            f for f in found if f.lower() == split.lower()
        ]
        raise DataError(
            f"split '{split}' has no rows (splits present: {', '.join(found) or 'none'})"
            + (f"; did you mean '{close[0]}'?" if close else ""),
            path=src,
            hint="check --train_split/--val_split and --split_column",
        )
    labels = resolve_label_columns(
        df, label_columns or [], exclude={img_path_column, findings_column, split_column, pair_column}, source=src
    )
    raw = df[img_path_column].fillna("").astype(str).str.strip()
    root = csv_file.resolve().parent
    # normpath: "a.npz" and "./a.npz" are one file, for the duplicate checks as for the loader
    df["__path"] = [os.path.normpath(p if os.path.isabs(p) else root / p) if p else "" for p in raw]
    part = df[in_split]
    empty = part["__path"].eq("")
    if empty.any():
        if on_bad_rows == "error":
            raise DataError(
                "empty image path",
                path=src,
                row=int(part["__row"][empty].iloc[0]),
                hint=f"fill the {img_path_column} column{_more(int(empty.sum()) - 1)}",
            )
        log.warning("%s, %s: empty image path; rows dropped", src, rows_text(part["__row"][empty]))
        part = part[~empty]
    part = _check_repeats(df, part, splits, split, findings_column, on_bad_rows, src)
    texts, missing = _clean_reports(part[findings_column], missing_report_text)
    frame = pd.DataFrame({"path": part["__path"].to_numpy(), "text": texts.to_numpy(), "row": part["__row"].to_numpy()})
    if pair_column:
        empty = (part[pair_column].isna() | part[pair_column].astype(str).str.strip().eq("")).to_numpy()
        if empty.any():
            log.warning("%s, %s: empty %s; the report itself is used as its pair", src,
                        rows_text(part["__row"][empty]), pair_column)  # fmt: skip
        frame["pair_text"] = np.where(empty, frame["text"].to_numpy(), part[pair_column].astype(str).to_numpy())
    for c in labels:
        frame[c] = part[c].to_numpy()
    return Table(
        frame.reset_index(drop=True),
        src,
        labels,
        int(missing.sum()),
        part["__row"][missing.to_numpy()].astype(int).tolist(),
        report_source=f"the '{findings_column}' column is empty there (--findings_column names the report column)",
    )


def _more(n: int) -> str:
    return f"; {n} more such rows" if n > 0 else ""


def _warn_unused_rows(rows: pd.Series, splits: pd.Series, known: Sequence[str], src: str) -> None:
    """Rows whose split value is empty or a likely typo are silently unused otherwise: name them."""
    known = [k for k in dict.fromkeys(known) if k]
    empty = splits.eq("")
    if empty.any():
        log.warning("%s, %s: empty split value; these rows are not used", src, rows_text(rows[empty]))
    for value in sorted(set(splits) - set(known) - {""}):
        hit = splits.eq(value)
        log.warning(
            "%s, %s: unknown split value '%s' (this run uses %s); these rows are not used",
            src,
            rows_text(rows[hit]),
            value,
            ", ".join(known),
        )


def _check_repeats(
    df: pd.DataFrame,
    part: pd.DataFrame,
    splits: pd.Series,
    split: str,
    findings_column: str,
    on_bad_rows: str,
    src: str,
) -> pd.DataFrame:
    """Repeated rows (same image and report) and images shared with another split (a leak)."""
    keys = list(zip(part["__path"], part[findings_column].fillna("")))
    first_row: dict[tuple[str, str], int] = {}
    repeats: list[tuple[int, int]] = []  # (row, the earlier row it repeats)
    keep = []
    for key, row in zip(keys, part["__row"]):
        earlier = first_row.setdefault(key, int(row))
        keep.append(earlier == row)
        if earlier != row:
            repeats.append((int(row), earlier))
    if repeats:
        if on_bad_rows == "error":
            raise DataError(
                f"duplicate of row {repeats[0][1]} (same image and report){_more(len(repeats) - 1)}",
                path=src,
                row=repeats[0][0],
                hint="remove the repeated rows, or pass --on_bad_sample skip to drop them",
            )
        log.warning(
            "%s, %s: duplicates of earlier rows (same image and report); dropped",
            src,
            rows_text([r for r, _ in repeats]),
        )
        part = part[np.array(keep)]
    others = (splits != split) & splits.ne("")
    elsewhere = {p: (int(r), s) for p, r, s in zip(df["__path"][others], df["__row"][others], splits[others])}
    leaks = [(int(r), elsewhere[p]) for p, r in zip(part["__path"], part["__row"]) if p in elsewhere]
    if leaks:
        (row, (other_row, other_split)) = leaks[0]
        msg = f"same image as row {other_row} in split '{other_split}': leaks between splits{_more(len(leaks) - 1)}"
        if on_bad_rows == "error":
            raise DataError(msg, path=src, row=row, hint="give each scan one split")
        log.warning(
            "%s, %s: images also in another split (validation metrics will be optimistic)",
            src,
            rows_text([r for r, _ in leaks]),
        )
    return part


def resolve_label_columns(df: pd.DataFrame, names: list[str], *, exclude: set[str], source: str) -> list[str]:
    """`names`, or with ['auto'] every other column whose values are all in {0, 1, -1}."""
    if names == ["auto"]:
        return [
            c
            for c in df.columns
            if c not in exclude
            and not str(c).startswith("__")
            and pd.api.types.is_numeric_dtype(df[c])
            and df[c].dropna().isin([0, 1, -1]).all()
            and df[c].notna().all()
        ]
    for c in names:
        if c not in df.columns:
            raise DataError(f"label column '{c}' missing", path=source, hint="check --label_columns")
        values = df[c]
        if not (pd.api.types.is_numeric_dtype(values) and values.isin([0, 1, -1]).all()):
            raise DataError(f"label column '{c}' must hold only 0, 1 or -1 (unknown)", path=source)
    return list(names)


def read_directory_table(
    data_dir: str | Path, reports_json: str | Path | None = None, *, missing_report_text: str = "No report available."
) -> Table:
    """Legacy mode: every `*.npz` of a directory, reports from a JSON {file stem: report}."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError("directory not found", path=str(data_dir), hint="check --train_data_dir/--val_data_dir")
    files = sorted(data_dir.glob("*.npz"))
    if not files:
        raise DataError("no *.npz files in directory", path=str(data_dir))
    reports: dict[str, str] = {}
    if reports_json is not None:
        try:
            reports = json.loads(Path(reports_json).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(
                f"cannot read reports JSON ({e})", path=str(reports_json), hint="it must map file stem -> report text"
            ) from None
        if not isinstance(reports, dict):
            raise DataError("reports JSON must be an object {file stem: report}", path=str(reports_json))
        wrong = [k for k, v in reports.items() if v is not None and not isinstance(v, str)]
        if wrong:
            raise DataError(
                f"report for '{wrong[0]}' is a {type(reports[wrong[0]]).__name__}, not text{_more(len(wrong) - 1)}",
                path=str(reports_json),
                hint="each value must be the report string",
            )
    texts = pd.Series([reports.get(f.stem) for f in files], dtype=object)
    texts, missing = _clean_reports(texts, missing_report_text)
    rows = np.arange(1, len(files) + 1)
    frame = pd.DataFrame({"path": [str(f) for f in files], "text": texts.to_numpy(), "row": rows})
    table = Table(frame, str(data_dir), [], int(missing.sum()), rows[missing.to_numpy()].tolist())
    if reports_json is None:
        table.report_source = "no reports file was given: pass --text_reports_path REPORTS.json"
    else:
        stems = {f.stem for f in files}
        expected = [f.stem for f, m in zip(files, missing) if m][:2]
        unmatched = [k for k in reports if k not in stems][:2]
        table.report_source = (
            f"{reports_json}: its keys must be the NPZ file stems, such as {', '.join(map(repr, expected))}"
            + (f"; it has keys such as {', '.join(map(repr, unmatched))}" if unmatched else "")
        )
    return table


def table_fingerprint(table: Table) -> str:
    """SHA-256 of the split's (image path, report) pairs, in order. Paths count relative to the CSV's folder
    (or the data directory), so moving the whole data set keeps the fingerprint; editing a row changes it."""
    src = Path(table.source).resolve()
    root = src if src.is_dir() else src.parent
    h = hashlib.sha256()
    for path, text in zip(table.frame["path"], table.frame["text"]):
        h.update(f"{os.path.relpath(path, root)}\0{text}\n".encode())
    return h.hexdigest()


class CTReportDataset(Dataset):
    """(volume, report) pairs. Items are addressed by `(index, epoch)` so that augmentation and
    bad-sample replacement depend only on the seed, the epoch and the index, never on which worker
    loads the item: runs resume exactly and give the same batches with any number of workers.
    `cache_dir` (`--cache_dir`) serves decoded volumes from a `VolumeCache`, bit-identical to decoding.
    `sentence_sampling` (`--sentence_sampling`) is the per-item probability of `sample_sentences`.
    `pair_texts` adds each item's partner text (`--text_pair_column`, whole) for the report-pair loss.
    """

    def __init__(
        self,
        table: Table,
        *,
        npz_key: str = "image",
        channels: int = 2,
        augment: str = "none",
        seed: int = 0,
        on_bad_sample: str = "error",
        check_values: bool = True,
        cache_dir: str | None = None,
        sentence_sampling: float = 0.0,
        pair_texts: bool = False,
    ):
        self.paths = table.frame["path"].to_numpy()
        self.texts = table.frame["text"].to_numpy()
        self.pair_texts = table.frame["pair_text"].to_numpy() if pair_texts else None
        self.rows = table.frame["row"].to_numpy()
        self.source = table.source
        self.known_bad = table.known_bad  # files the preflight found bad: replaced without reading them again
        self.npz_key, self.channels, self.augment, self.seed = npz_key, channels, augment, seed
        self.on_bad_sample, self.check_values = on_bad_sample, check_values
        self.sentence_sampling = float(sentence_sampling)
        self.volume_cache = VolumeCache(cache_dir) if cache_dir else None

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> np.ndarray:
        load = self.volume_cache.load if self.volume_cache is not None else load_volume
        return load(
            self.paths[index], self.npz_key, self.channels, row=int(self.rows[index]), check_values=self.check_values
        )

    def load_sample(self, index: int) -> np.ndarray:
        """The checked volume of row `index` (no augmentation); `DataError` if the volume or its report is bad."""
        if self.paths[index] in self.known_bad:
            problem, hint = self.known_bad[self.paths[index]]
            raise DataError(problem, path=str(self.paths[index]), row=int(self.rows[index]), hint=hint)
        volume = self._load(index)
        if not isinstance(self.texts[index], str) or not self.texts[index].strip():
            raise DataError(
                "empty or non-text report", path=self.source, row=int(self.rows[index]), hint="fill the findings column"
            )
        return volume

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        item = draw_sample(self.load_sample, index, rng, len(self), self.on_bad_sample)
        if "error" in item:
            return item
        image = torch.from_numpy(np.ascontiguousarray(item.pop("value")))
        if self.augment == "light":
            image = light_augment(image, rng)
        text = self.texts[item["index"]]
        if self.sentence_sampling > 0:  # own stream: the image draws stay those of a run without it
            text = sample_sentences(text, np.random.default_rng([self.seed, epoch, index, 1]), self.sentence_sampling)
        i = item["index"]
        out = {**item, "image": image, "text": text, "path": str(self.paths[i]), "row": int(self.rows[i])}
        if self.pair_texts is not None:
            out["pair_text"] = self.pair_texts[item["index"]]
        return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sample_sentences(report: str, rng: np.random.Generator, probability: float) -> str:
    """With `probability`, a random subset of the report's sentences (size uniform in 1..all), shuffled.

    Zero-shot prompts are single sentences ("There is no pleural effusion."); a text tower trained only on
    whole reports meets them out of distribution. Sampling sentences (as CXR-CLIP and others do) pairs images
    with short texts too, and asks each sentence to agree with the image on its own.
    """
    if rng.random() >= probability:
        return report
    sentences = [t for t in _SENTENCE_END.split(report.strip()) if t]
    if len(sentences) < 2:
        return report
    k = int(rng.integers(1, len(sentences) + 1))
    picked = rng.choice(len(sentences), size=k, replace=False)
    return " ".join(sentences[i] for i in picked)


def draw_sample(load: Callable[[int], Any], index: int, rng: np.random.Generator, n: int, on_bad_sample: str) -> dict:
    """`{"index", "value", "bad"}` for `load(index)`; a bad sample (`DataError`) ends the item with an "error"
    (`on_bad_sample="error"`) or is replaced by a random index drawn from `rng` (`"skip"`), up to 16 times.

    The replacement depends only on `rng` (seeded by seed, epoch and index), so every loader of the same data
    (decoded volumes, or cached features) replaces a bad sample by the same one."""
    bad: list[dict] = []  # notes on replaced samples: file, row, problem (for bad_samples.csv)
    for _ in range(16):
        try:
            return {"index": index, "value": load(index), "bad": bad}
        except DataError as e:
            bad.append({"path": e.path, "row": e.row, "problem": e.problem, "message": str(e)})
            if on_bad_sample == "error":
                return {"index": index, "error": str(e), "bad": bad}
            index = int(rng.integers(n))  # deterministic replacement
    return {"index": index, "error": "16 bad samples in a row: " + bad[-1]["message"], "bad": bad}


def light_augment(image: torch.Tensor, rng: np.random.Generator, max_shift: int = 2) -> torch.Tensor:
    """Small in-plane shift (zero-filled, no wrap-around) and intensity jitter; never flips left-right,
    which would contradict the sides named in the report."""
    dh, dw = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dh, 0) : h + min(dh, 0), max(dw, 0) : w + min(dw, 0)] = image[
        ..., max(-dh, 0) : h + min(-dh, 0), max(-dw, 0) : w + min(-dw, 0)
    ]
    scale, shift = 1.0 + 0.05 * float(rng.standard_normal()), 0.02 * float(rng.standard_normal())
    return (out.float() * scale + shift).clamp_(0.0, 1.0).to(image.dtype)


class Collator:
    """Stacks volumes and tokenizes reports, in the worker. Carries bad-sample notes to the trainer."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict]) -> dict:
        bad = [b for it in items for b in it["bad"]]
        errors = [it["error"] for it in items if "error" in it]
        if errors:
            return {"errors": errors, "bad": bad}
        if len({tuple(it["image"].shape) for it in items}) > 1:
            return {"errors": mixed_shapes(items), "bad": bad}
        texts = [it["text"] for it in items]
        pairs = "pair_text" in items[0]
        if pairs:  # the partners ride in the same text batch (rows B..2B-1): one text-tower call encodes both
            texts += [it["pair_text"] for it in items]
        return {
            "images": torch.stack([it["image"] for it in items]),
            "text": self.tokenize(texts),
            "index": torch.tensor([it["index"] for it in items]),
            "bad": bad,
            "pairs": pairs,
        }


def mixed_shapes(items: list[dict]) -> list[str]:
    """One error per volume whose shape is not the batch's most common one (the preflight finds them all up front)."""
    common, odd = shape_outliers({it["path"]: it["image"].shape for it in items})
    rows = {it["path"]: it["row"] for it in items}
    hint = f"{SHAPE_HINT}; the preflight (on unless --no-preflight) names every such file before step 1"
    return [
        str(
            DataError(
                f"shape {tuple(shape)} differs from {common} of the other volumes of its batch",
                path=path,
                row=rows[path],
                hint=hint,
            )
        )
        for path, shape in ((it["path"], tuple(it["image"].shape)) for it in items)
        if path in odd
    ]


def move_batch(batch: dict, device: torch.device, image_dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Images (stored float16) and token tensors to the device, without blocking the host; images
    are cast there, to the compute dtype (float32, or the autocast dtype)."""
    images = batch["images"].to(device, non_blocking=True).to(image_dtype)
    text = {k: v.to(device, non_blocking=True) for k, v in batch["text"].items()}
    return images, text


class GlobalBatchSampler(Sampler):
    """Yields `(index, epoch)` keys for one rank, resumable at any step.

    Each epoch is a permutation drawn from (seed, epoch), cut into global batches of
    `batch_size * world_size * accum` samples (the incomplete tail is dropped, so every step has the
    same shape). Rank r takes a fixed slice of each global batch, so the set of samples in a step
    does not depend on the world size, and the data position is simply the step.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.n, self.batch_size, self.world_size, self.rank, self.accum = n, batch_size, world_size, rank, accum
        self.global_batch = batch_size * world_size * accum
        if n < self.global_batch:
            raise DataError(
                f"{n} training samples are fewer than one global batch ({self.global_batch}); "
                "lower --batch_size or --grad_accum_steps"
            )
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = n // self.global_batch
        self.start_step = 0

    def set_start(self, step: int) -> None:
        """The next iteration starts at global `step` (its epoch and position inside the epoch)."""
        self.start_step = step

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        order = self.order(epoch)
        per_rank = self.batch_size * self.accum
        for s in range(offset, self.steps_per_epoch):
            chunk = order[s * self.global_batch : (s + 1) * self.global_batch]
            for i in chunk[self.rank * per_rank : (self.rank + 1) * per_rank]:
                yield int(i), epoch
        self.start_step = (epoch + 1) * self.steps_per_epoch

    def __len__(self) -> int:
        offset = self.start_step % self.steps_per_epoch
        return (self.steps_per_epoch - offset) * self.batch_size * self.accum


class EvalSampler(Sampler):
    """Every index once as (index, 0) keys; rank r takes the r-th contiguous block, so concatenating the
    ranks' outputs in rank order gives data-set order (the trainer still sorts by index after gathering)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0):
        base, extra = divmod(n, world_size)  # the first `extra` ranks take one more
        start = rank * base + min(rank, extra)
        self.indices = list(range(start, start + base + (rank < extra)))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((i, 0) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SLURM and Ctrl-C signal the whole process group, but only the main
    process should react (finish the step, save, exit). A worker killed by SIGTERM would instead make the
    main process fail with "worker killed", at any point of a step, before it could save. Workers still
    exit with their parent (the DataLoader's shutdown, its parent-death check, or `_kill_workers_at_exit`)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """multiprocessing's own exit hook stops daemon children with SIGTERM and then waits for them; loader
    workers ignore SIGTERM (above), so it would wait forever. Registered after that hook, this runs first."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        # PyTorch's SIGCHLD handler would report these deaths as errors during shutdown.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()


atexit.register(_kill_workers_at_exit)
