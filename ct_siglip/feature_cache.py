"""`--cache_features`: phase 1 (both towers frozen) trains only the heads, so each training sample's pooled
features are computed once and steps then run the projections and the loss on them.

The image feature is the I3ResNet's global-average-pooled vector (`ImageEncoder.embed`), the text feature the
LLM2Vec pooled embedding (`TextEncoder.embed`); both are exactly what the towers feed their projection heads, so
a step on cached features has the loss and gradients of a step on the volumes. Features live in memory and in
safetensors shards under `<save_dir>/feature_cache/<model identity>/`, keyed per sample by its path, size,
mtime and report text: a resumed run reuses them, while other frozen weights, settings or data never do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .data import CTReportDataset, draw_sample, ignore_stop_signals, move_batch
from .distributed import all_gather_objects
from .errors import DataError
from .runlog import bars, tqdm_disable
from .runtime import PRECISION_DTYPES, autocast_factory

log = logging.getLogger("ct_siglip")

FORMAT = 1  # bump when what a cached feature means changes
FOLDER_NAME = "feature_cache"
# Settings besides the frozen weights that change a feature: how volumes are read, how reports are tokenized
# and pooled, and the compute dtype.
FEATURE_SETTINGS = (
    "in_channels", "npz_key", "pooling_mode", "max_text_length", "text_instruction", "text_chat_template",
)  # fmt: skip


# ----------------------------------------------------------------------------- keys
def _hash_tensors(h: hashlib.blake2b, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def model_identity(model: nn.Module, settings: dict, precision: str) -> str:
    """Hash of the frozen weights (backbone, LLM and its pooling: every tensor but the trainable heads) and of the
    settings that change a feature. Hashing the weights, not their file names, also covers `--init_from` and
    `--text_model_path`; it reads each frozen tensor once per run (a few seconds at the real size)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([FORMAT, precision, {k: settings[k] for k in FEATURE_SETTINGS}], sort_keys=True).encode())
    _hash_tensors(h, model.image_encoder.backbone.state_dict())
    text = {k: v for k, v in model.text_encoder.state_dict().items() if not k.startswith("projection.")}
    _hash_tensors(h, text)
    return h.hexdigest()


def sample_key(path: str, text: str) -> bytes | None:
    """16 bytes naming one sample as it is now: source path, size, mtime_ns and report text (None if the file
    cannot be stat'ed; loading it will then report why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, text])
    return hashlib.blake2b(ident.encode(), digest_size=16).digest()


# ----------------------------------------------------------------------------- storage
class FeatureStore:
    """sample key -> (image feature, text feature), in memory and in safetensors shards of `folder`.

    Shards are written to a unique temp file, fsynced and renamed, and never rewritten, so a killed run leaves
    whole shards only and several ranks can write beside each other. An unreadable shard is skipped (its
    samples are computed again), never fatal.
    """

    def __init__(self, folder: str | Path, shard_size: int = 1024):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.memory: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: set[str] = set()
        self.reload()

    def reload(self) -> int:
        """Read shards not read yet (written by other ranks, or by an earlier run); returns entries added."""
        from safetensors.torch import load_file

        before = len(self.memory)
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            if shard.name in self._seen:
                continue
            self._seen.add(shard.name)
            try:
                data = load_file(str(shard))
                keys, image, text = data["keys"], data["image"], data["text"]
                if keys.shape[1:] != (16,) or not len(keys) == len(image) == len(text):
                    raise ValueError(f"shapes {tuple(keys.shape)}, {tuple(image.shape)}, {tuple(text.shape)}")
            except Exception as e:  # a damaged shard costs a recomputation, never the run
                log.warning("feature cache: skipping unreadable %s (%s)", shard, str(e)[:200])
                continue
            for k, img, txt in zip(keys.numpy(), image.unbind(0), text.unbind(0)):
                self.memory[k.tobytes()] = (img, txt)
        return len(self.memory) - before

    def __contains__(self, key: bytes | None) -> bool:
        return key in self.memory

    def put(self, keys: Sequence[bytes], image: torch.Tensor, text: torch.Tensor) -> None:
        for k, img, txt in zip(keys, image.detach().cpu().unbind(0), text.detach().cpu().unbind(0)):
            self.memory[k] = self.pending[k] = (img.clone(), txt.clone())
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard (temp file, fsync, rename)."""
        if not self.pending:
            return
        from safetensors.torch import save_file

        keys = torch.from_numpy(np.frombuffer(b"".join(self.pending), dtype=np.uint8).reshape(-1, 16).copy())
        image = torch.stack([v[0] for v in self.pending.values()]).contiguous()
        text = torch.stack([v[1] for v in self.pending.values()]).contiguous()
        name = f"shard-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        try:
            save_file({"keys": keys, "image": image, "text": text}, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
        except OSError as e:  # the features stay in memory; only a later run has to compute them again
            log.warning("feature cache: cannot write %s (%s); features kept in memory only", tmp, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._seen.add(name)
        self.pending = {}


# ----------------------------------------------------------------------------- computing
class _ExactSamples(Dataset):
    """Rows `indices` of a training set as they are (no replacement of bad ones): features are per row."""

    def __init__(self, dataset: CTReportDataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        try:
            volume = self.dataset.load_sample(i)
        except DataError as e:
            return {"index": i, "failure": e}
        return {"index": i, "image": torch.from_numpy(np.ascontiguousarray(volume)), "text": self.dataset.texts[i]}


class _BuildCollator:
    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if "failure" not in it]
        out = {"failures": {it["index"]: it["failure"] for it in items if "failure" in it}, "index": []}
        if good:
            out["images"] = torch.stack([it["image"] for it in good])
            out["text"] = self.tokenize([it["text"] for it in good])
            out["index"] = [it["index"] for it in good]
        return out


@torch.no_grad()
def compute_features(
    model: nn.Module,
    dataset: CTReportDataset,
    indices: Sequence[int],
    keys: Sequence[bytes | None],
    store: FeatureStore,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int,
    timeout: float = 0.0,
    progress: bool | None = True,
) -> dict[int, DataError]:
    """Pooled image and text features of rows `indices` into `store` (volumes decoded by `num_workers` loader
    workers); returns the rows that could not be loaded, with their errors."""
    if not indices:
        return {}
    autocast = autocast_factory(device, precision)
    loader = DataLoader(
        _ExactSamples(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_BuildCollator(model.text_encoder.tokenize),
        pin_memory=device.type == "cuda",
        timeout=timeout if num_workers else 0,  # a hung read fails (as LoaderFailure) instead of waiting forever
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )
    failures: dict[int, DataError] = {}
    for batch in tqdm(loader, desc="caching features", disable=tqdm_disable(progress), dynamic_ncols=True):
        failures.update(batch["failures"])
        if not batch["index"]:
            continue
        images, text = move_batch(batch, device, PRECISION_DTYPES[precision])
        with autocast():
            image_features = model.image_encoder.embed(images)  # frozen: eval-mode batch norm, no graph
            text_features = model.text_encoder.embed(text)  # frozen: served by the tower's own text cache
        store.put([keys[i] for i in batch["index"]], image_features, text_features)
    store.flush()
    return failures


def build_feature_table(
    model: nn.Module,
    dataset: CTReportDataset,
    folder: str | Path,
    *,
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int,
    timeout: float = 0.0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool | None = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, DataError]]:
    """`(image features (N, F), text features (N, H), bad rows)` of a whole training set, computing only what
    the store lacks. Ranks split that work and read each other's shards; what a rank cannot see (a run folder
    not shared between nodes) it computes itself."""
    keys = [sample_key(p, t) for p, t in zip(dataset.paths, dataset.texts)]
    store = FeatureStore(folder)
    todo = [i for i, k in enumerate(keys) if k not in store]
    log.info("Feature cache %s: %d of %d training samples cached, computing %d",
             folder, len(keys) - len(todo), len(keys), len(todo))  # fmt: skip
    common = {"device": device, "precision": precision, "batch_size": batch_size, "num_workers": num_workers,
              "timeout": timeout}  # fmt: skip
    show = progress if rank == 0 else False
    failures = compute_features(model, dataset, todo[rank::world_size], keys, store, progress=show, **common)
    for part in all_gather_objects(failures):  # collective: every rank has written its shards
        failures.update(part)
    store.reload()
    rest = [i for i in todo if keys[i] not in store and i not in failures]
    failures.update(compute_features(model, dataset, rest, keys, store, progress=False, **common))
    for part in all_gather_objects(failures):  # every rank takes the same rows as bad (and stops together on one)
        failures.update(part)
    some = next(iter(store.memory.values()), None)
    if some is None:
        first = failures[min(failures)]
        raise DataError(f"no training sample could be loaded; the first: {first}")
    image = torch.zeros(len(keys), *some[0].shape, dtype=some[0].dtype)
    text = torch.zeros(len(keys), *some[1].shape, dtype=some[1].dtype)
    for i, k in enumerate(keys):
        if i not in failures:
            image[i], text[i] = store.memory[k]
    return image, text, failures


# ----------------------------------------------------------------------------- training batches
class CachedFeatureDataset(Dataset):
    """The training set as cached features, addressed by `(index, epoch)` like `CTReportDataset`, with the same
    replacement of bad rows (`draw_sample` with the same seeded generator): the same samples in every step."""

    def __init__(self, dataset: CTReportDataset, image: torch.Tensor, text: torch.Tensor,
                 failures: dict[int, DataError]):  # fmt: skip
        self.image, self.text, self.failures = image, text, failures
        self.seed, self.on_bad_sample = dataset.seed, dataset.on_bad_sample

    def __len__(self) -> int:
        return len(self.image)

    def _features(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index in self.failures:
            raise self.failures[index]
        return self.image[index], self.text[index]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        item = draw_sample(self._features, index, np.random.default_rng([self.seed, epoch, index]), len(self),
                           self.on_bad_sample)  # fmt: skip
        if "error" in item:
            return item
        image, text = item.pop("value")
        return {**item, "image_features": image, "text_features": text}


def collate_features(items: list[dict]) -> dict:
    """A batch of cached features; the same keys as `Collator` otherwise (index, bad notes, errors)."""
    bad = [b for it in items for b in it["bad"]]
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"errors": errors, "bad": bad}
    return {
        "image_features": torch.stack([it["image_features"] for it in items]),
        "text_features": torch.stack([it["text_features"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "bad": bad,
    }


def cached_feature_loader(
    model: nn.Module,
    dataset: CTReportDataset,
    sampler: Sampler,
    cfg,
    *,
    device: torch.device,
    precision: str,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """The training loader of a `--cache_features` run: features computed (or read back) now, batches drawn by
    the trainer's own sampler. With `--on_bad_sample error` a bad row stops the run here, naming it."""
    folder = Path(cfg.save_dir) / FOLDER_NAME / model_identity(model, vars(cfg), precision)
    image, text, failures = build_feature_table(
        model, dataset, folder, device=device, precision=precision, batch_size=cfg.eval_batch_size or cfg.batch_size,
        num_workers=cfg.num_workers, timeout=cfg.loader_timeout, rank=rank, world_size=world_size,
        progress=bars(cfg.progress),
    )  # fmt: skip
    if failures and cfg.on_bad_sample == "error":
        raise failures[min(failures)]
    # Features are in memory: workers would only add start-up time and copies.
    return DataLoader(CachedFeatureDataset(dataset, image, text, failures), batch_size=cfg.batch_size,
                      sampler=sampler, num_workers=0, collate_fn=collate_features)  # fmt: skip
