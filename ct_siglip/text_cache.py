"""Frozen-mode text embedding cache: text_hash -> pooled embedding, in memory and in safetensors shards.

Used by `TextEncoder` (in `text_tower`) with `--text_train frozen`: each distinct report is embedded once.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import weakref
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _write_shard(folder: Path, entries: dict[int, torch.Tensor]) -> None:
    """Persist and clear `entries`; temp file + rename so a reader never sees half a shard."""
    if not entries:
        return
    from safetensors.torch import save_file

    name = f"shard-{os.getpid()}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors"
    tmp = folder / (name + ".tmp")
    hashes = torch.tensor(list(entries.keys()), dtype=torch.int64)
    save_file({"hash": hashes, "embedding": torch.stack(list(entries.values())).contiguous()}, str(tmp))
    os.replace(tmp, folder / name)
    entries.clear()


class TextEmbeddingCache:
    """text_hash -> pooled embedding (float32, CPU), kept in memory and optionally in safetensors shards.

    New entries are written in shards of `shard_size`, when a batch is served entirely from memory (the first
    pass is over), on `flush()`, and at interpreter exit. Shards are never rewritten, so several processes
    (DDP ranks) can share one folder: each writes its own file names.
    """

    def __init__(self, folder: str | os.PathLike | None = None, hidden_size: int | None = None, shard_size: int = 4096):
        self.memory: dict[int, torch.Tensor] = {}
        self.pending: dict[int, torch.Tensor] = {}
        self.hidden_size, self.shard_size = hidden_size, shard_size
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()
            weakref.finalize(self, _write_shard, self.folder, self.pending)

    def _load(self) -> None:
        from safetensors.torch import load_file

        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                data = load_file(str(shard))
                hashes, emb = data["hash"], data["embedding"]
                if emb.ndim != 2 or len(hashes) != len(emb) or (self.hidden_size and emb.shape[1] != self.hidden_size):
                    raise ValueError(f"shapes {tuple(hashes.shape)} / {tuple(emb.shape)}")
            except Exception as err:  # a damaged shard costs a recomputation, never the run
                logger.warning("text cache: skipping unreadable %s (%s)", shard, err)
                continue
            self.memory.update(zip(hashes.tolist(), emb.unbind(0)))
        if self.memory:
            logger.info("text cache: %d embeddings loaded from %s", len(self.memory), self.folder)

    def __contains__(self, key: int) -> bool:
        return key in self.memory

    def __len__(self) -> int:
        return len(self.memory)

    def get(self, keys: list[int]) -> torch.Tensor:
        return torch.stack([self.memory[k] for k in keys])

    def put(self, keys: list[int], embeddings: torch.Tensor) -> None:
        for key, emb in zip(keys, embeddings.detach().float().cpu().unbind(0)):
            self.memory[key] = emb
            if self.folder is not None:
                self.pending[key] = emb
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.folder is not None:
            _write_shard(self.folder, self.pending)
