"""Data: CSV and legacy directory tables, the volume/report dataset, a resumable sampler, collation.

Tables are pandas frames with fixed column names (`path`, `text`, `row`, labels...). The dataset
keeps numpy arrays of those columns, not per-row Python objects, so forked workers share them.
Text is tokenized in the collate function, inside the worker processes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from .errors import DataError
from .volume_io import load_volume

log = logging.getLogger(__name__)


@dataclass
class Table:
    """One split: resolved NPZ paths, report texts, source row numbers, optional label columns."""

    frame: pd.DataFrame  # columns: path, text, row (+ label columns)
    source: str  # the CSV file or directory it came from
    label_columns: list[str]
    missing_reports: int = 0

    def __len__(self) -> int:
        return len(self.frame)


def _clean_reports(texts: pd.Series, placeholder: str) -> tuple[pd.Series, int]:
    missing = texts.isna() | texts.astype(str).str.strip().eq("")
    return texts.where(~missing, placeholder).astype(str), int(missing.sum())


def read_csv_table(
    csv_file: str | Path,
    split: str,
    *,
    img_path_column: str = "img_path",
    findings_column: str = "findings",
    split_column: str = "split",
    label_columns: list[str] | None = None,
    missing_report_text: str = "No report available.",
) -> Table:
    """The rows of `split`; relative image paths resolve against the CSV's folder.

    Rows are numbered as data rows counted from 1 (the header is not a row), the numbering that
    `--validate_csv` and every error message use.
    """
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise DataError("CSV file not found", path=str(csv_file), hint="check --csv_file")
    try:
        df = pd.read_csv(csv_file, dtype={img_path_column: str, split_column: str, findings_column: str},
                         keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"cannot parse CSV ({e})", path=str(csv_file)) from None
    for flag, col in (("--img_path_column", img_path_column), ("--findings_column", findings_column),
                      ("--split_column", split_column)):
        if col not in df.columns:
            raise DataError(f"column '{col}' missing (columns: {', '.join(map(str, df.columns))})",
                            path=str(csv_file), hint=f"pass {flag} with the right name")
    df["__row"] = np.arange(1, len(df) + 1)
    splits = df[split_column].astype(str).str.strip()
    part = df[splits == split]
    if part.empty:
        found = ", ".join(sorted(splits.unique()))
        raise DataError(f"split '{split}' has no rows (splits present: {found})", path=str(csv_file),
                        hint="check --train_split/--val_split")
    labels = resolve_label_columns(df, label_columns or [], exclude={img_path_column, findings_column, split_column},
                                   source=str(csv_file))
    paths = part[img_path_column]
    bad = paths.isna() | paths.astype(str).str.strip().eq("")
    if bad.any():
        raise DataError("empty image path", path=str(csv_file), row=int(part["__row"][bad].iloc[0]))
    root = csv_file.resolve().parent
    resolved = [str(p) if Path(p).is_absolute() else str(root / p) for p in paths.astype(str).str.strip()]
    texts, missing = _clean_reports(part[findings_column], missing_report_text)
    frame = pd.DataFrame({"path": resolved, "text": texts.to_numpy(), "row": part["__row"].to_numpy()})
    for c in labels:
        frame[c] = part[c].to_numpy()
    return Table(frame.reset_index(drop=True), str(csv_file), labels, missing)


def resolve_label_columns(df: pd.DataFrame, names: list[str], *, exclude: set[str], source: str) -> list[str]:
    """`names`, or with ['auto'] every other column whose values are all in {0, 1, -1}."""
    if names == ["auto"]:
        return [c for c in df.columns
                if c not in exclude and not str(c).startswith("__") and pd.api.types.is_numeric_dtype(df[c])
                and df[c].dropna().isin([0, 1, -1]).all() and df[c].notna().all()]
    for c in names:
        if c not in df.columns:
            raise DataError(f"label column '{c}' missing", path=source, hint="check --label_columns")
        values = df[c]
        if not (pd.api.types.is_numeric_dtype(values) and values.isin([0, 1, -1]).all()):
            raise DataError(f"label column '{c}' must hold only 0, 1 or -1 (unknown)", path=source)
    return list(names)


def read_directory_table(data_dir: str | Path, reports_json: str | Path | None = None, *,
                         missing_report_text: str = "No report available.") -> Table:
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
            raise DataError(f"cannot read reports JSON ({e})", path=str(reports_json),
                            hint="it must map file stem -> report text") from None
        if not isinstance(reports, dict):
            raise DataError("reports JSON must be an object {file stem: report}", path=str(reports_json))
    texts = pd.Series([reports.get(f.stem) for f in files], dtype=object)
    texts, missing = _clean_reports(texts, missing_report_text)
    frame = pd.DataFrame({"path": [str(f) for f in files], "text": texts.to_numpy(),
                          "row": np.arange(1, len(files) + 1)})
    return Table(frame, str(data_dir), [], missing)


class CTReportDataset(Dataset):
    """(volume, report) pairs. Items are addressed by `(index, epoch)` so that augmentation and
    bad-sample replacement depend only on the seed, the epoch and the index, never on which worker
    loads the item: runs resume exactly and give the same batches with any number of workers.
    """

    def __init__(self, table: Table, *, npz_key: str = "image", channels: int = 2, augment: str = "none",
                 seed: int = 0, on_bad_sample: str = "error", check_values: bool = True):
        self.paths = table.frame["path"].to_numpy()
        self.texts = table.frame["text"].to_numpy()
        self.rows = table.frame["row"].to_numpy()
        self.source = table.source
        self.npz_key, self.channels, self.augment, self.seed = npz_key, channels, augment, seed
        self.on_bad_sample, self.check_values = on_bad_sample, check_values

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> np.ndarray:
        return load_volume(self.paths[index], self.npz_key, self.channels, row=int(self.rows[index]),
                           check_values=self.check_values)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        bad: list[str] = []
        for _ in range(16):
            try:
                volume = self._load(index)
                if not isinstance(self.texts[index], str) or not self.texts[index].strip():
                    raise DataError("empty or non-text report", path=self.source, row=int(self.rows[index]))
                break
            except DataError as e:
                bad.append(str(e))
                if self.on_bad_sample == "error":
                    return {"index": index, "error": str(e), "bad": bad}
                index = int(rng.integers(len(self)))  # deterministic replacement
        else:
            return {"index": index, "error": "16 bad samples in a row: " + bad[-1], "bad": bad}
        image = torch.from_numpy(np.ascontiguousarray(volume))
        if self.augment == "light":
            image = light_augment(image, rng)
        return {"index": index, "image": image, "text": self.texts[index], "bad": bad}


def light_augment(image: torch.Tensor, rng: np.random.Generator, max_shift: int = 2) -> torch.Tensor:
    """Small in-plane shift (zero-filled, no wrap-around) and intensity jitter; never flips left-right,
    which would contradict the sides named in the report."""
    dh, dw = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dh, 0):h + min(dh, 0), max(dw, 0):w + min(dw, 0)] = \
        image[..., max(-dh, 0):h + min(-dh, 0), max(-dw, 0):w + min(-dw, 0)]
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
        texts = [it["text"] for it in items]
        return {
            "images": torch.stack([it["image"] for it in items]),
            "text": self.tokenize(texts),
            "index": torch.tensor([it["index"] for it in items]),
            "bad": bad,
        }


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

    def __init__(self, n: int, batch_size: int, *, world_size: int = 1, rank: int = 0, accum: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.world_size, self.rank, self.accum = n, batch_size, world_size, rank, accum
        self.global_batch = batch_size * world_size * accum
        if n < self.global_batch:
            raise DataError(f"{n} training samples are fewer than one global batch ({self.global_batch}); "
                            "lower --batch_size or --grad_accum_steps")
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
            chunk = order[s * self.global_batch:(s + 1) * self.global_batch]
            for i in chunk[self.rank * per_rank:(self.rank + 1) * per_rank]:
                yield int(i), epoch
        self.start_step = (epoch + 1) * self.steps_per_epoch

    def __len__(self) -> int:
        offset = self.start_step % self.steps_per_epoch
        return (self.steps_per_epoch - offset) * self.batch_size * self.accum


class EvalSampler(Sampler):
    """Every index once, in order, as (index, 0) keys; a rank takes every world_size-th block."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((i, 0) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)
