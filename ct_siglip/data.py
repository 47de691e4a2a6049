"""Data: the volume/report dataset, bad-sample replacement, a resumable sampler, collation.

The dataset keeps numpy arrays of a `Table`'s columns (`ct_siglip.tables`), not per-row Python objects, so
forked workers share them. Text is tokenized in the collate function, inside the worker processes.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # registers its exit hook before ours: hooks run last-in, first-out)
import re
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .errors import DataError
from .tables import Table
from .volume_io import SHAPE_HINT, VolumeCache, load_volume, shape_outliers

log = logging.getLogger(__name__)


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
