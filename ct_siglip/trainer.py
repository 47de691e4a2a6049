"""The training loop: `SigLIPTrainer.train()` calls `train_step`, `validate`, `save` and `resume`.

Everything a run needs to continue exactly (model, optimizer, scheduler, scaler, step, per-rank RNG
states, best metric, bad-sample counts, config, data fingerprint) is one checkpoint dict; the data
position is the step, because every step consumes one fixed global batch (see `GlobalBatchSampler`).

Under torchrun every rank takes the same decisions at the same step: before each step one tiny
all-gather tells all ranks whether any rank was signalled, hit bad data or lost its loader, so they
all save the same step and stop together instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import contextlib
import csv
import faulthandler
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config, parse_config
from .data import (
    Collator,
    CTReportDataset,
    EvalSampler,
    GlobalBatchSampler,
    Table,
    ignore_stop_signals,
    move_batch,
    read_csv_table,
    read_directory_table,
    rows_text,
    table_fingerprint,
)
from .distributed import (
    Watchdog,
    all_gather_objects,
    all_gather_rows,
    all_gather_tensors,
    barrier,
    broadcast_object,
    gather_ints,
    init_distributed,
    shutdown_distributed,
)
from .errors import ConfigError, DataError
from .evaluate import compute_embeddings, evaluate_embeddings, raise_batch_errors, text_encoder_fn
from .feature_cache import cached_feature_loader
from .loss import text_pair_loss
from .model import ChestCTCLIP, build_model, count_parameters
from .runlog import MetricsLogger, format_table

log = logging.getLogger("ct_siglip")

# Settings that change what a checkpoint means (with the global batch and the training rows, checked
# separately); resuming with other values is refused. `--batch_size` alone may change: on another
# number of processes the same global batch needs another per-process batch.
RESUME_MUST_MATCH = (
    "in_channels",
    "npz_key",
    "embed_dim",
    "image_depth",
    "image_width",
    "freeze_image_backbone",
    "freeze_image_stem",
    "text_model",
    "pooling_mode",
    "text_train",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "fixed_temperature",
    "text_learning_rate",  # None or a value: two or four optimizer groups, so the saved AdamW state differs
    "seed",
    "max_text_length",
    "text_instruction",
    "text_chat_template",
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class LoaderFailure(RuntimeError):
    """The data loader's workers died or delivered nothing within `--loader_timeout`."""


class PeerFailure(RuntimeError):
    """Another rank failed; this rank saved with it and stops too."""


# ----------------------------------------------------------------------------- set-up helpers
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_factory(device: torch.device, precision: str):
    """A zero-argument context factory: autocast in bf16/fp16, or nothing in fp32."""
    dtype = PRECISION_DTYPES[resolve_precision(precision, device)]
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def load_table(cfg: Config, split: str, *, train: bool) -> Table | None:
    if cfg.csv_file:
        if not split:
            return None
        # Rows the run will not use are named once, when the training split is read.
        known = (cfg.train_split, cfg.val_split, "test") if train else ()
        return read_csv_table(
            cfg.csv_file,
            split,
            img_path_column=cfg.img_path_column,
            findings_column=cfg.findings_column,
            split_column=cfg.split_column,
            label_columns=cfg.label_columns,
            missing_report_text=cfg.missing_report_text,
            on_bad_rows=cfg.on_bad_sample,
            known_splits=known,
            pair_column=cfg.text_pair_column if train and cfg.text_pair_weight > 0 else None,
        )
    folder = cfg.train_data_dir if train else cfg.val_data_dir
    if folder is None:
        return None
    return read_directory_table(folder, cfg.text_reports_path, missing_report_text=cfg.missing_report_text)


def _loader(cfg: Config, dataset, sampler, tokenizer, batch_size: int, device: torch.device) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collator(tokenizer),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=False,
        prefetch_factor=4 if workers > 0 else None,
        # A hung worker (stalled NFS read) raises after this long instead of holding the job forever;
        # a dead one is reported at once by the DataLoader's SIGCHLD handler.
        timeout=cfg.loader_timeout if workers > 0 else 0,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # Workers draw their seeds from this generator, not the global RNG: resuming stays exact.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def loader_failure(error: RuntimeError, timeout: float) -> LoaderFailure | None:
    """The DataLoader's own errors for a dead or silent worker, as one actionable line (None for others)."""
    text = str(error)
    if "DataLoader timed out" in text:
        return LoaderFailure(
            f"no batch from the data loader workers for {timeout:g} s (--loader_timeout): a hung "
            "file system or a stuck worker. Check the storage, then rerun with --resume auto"
        )
    if "DataLoader worker" in text:
        return LoaderFailure(
            f"{text.splitlines()[0]} (often out of memory: lower --num_workers or --batch_size), "
            "then rerun with --resume auto"
        )
    return None


def eval_dataset(cfg: Config, table: Table) -> CTReportDataset:
    """Whole reports, no augmentation, a bad sample is an error: the same items whoever evaluates."""
    return CTReportDataset(
        table, npz_key=cfg.npz_key, channels=cfg.in_channels, seed=cfg.seed, on_bad_sample="error",
        cache_dir=cfg.cache_dir,
    )  # fmt: skip


def build_eval_loader(
    cfg: Config, split: str, tokenizer, *, world_size: int = 1, rank: int = 0, device: torch.device | None = None
) -> tuple[DataLoader, Table]:
    table = load_table(cfg, split, train=False)
    ds = eval_dataset(cfg, table)
    loader = _loader(
        cfg,
        ds,
        EvalSampler(len(ds), world_size, rank),
        tokenizer,
        cfg.eval_batch_size or cfg.batch_size,
        device or torch.device("cpu"),
    )
    return loader, table


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices and kernels (not on biases, norms, t' and b).

    With `--text_learning_rate` the pretrained LLM (`text_encoder.model.*`, LoRA weights included) gets its own
    two groups at that rate: a tower that already separates reports by their findings should move slower than
    the randomly initialised image tower and heads, which chase it.
    """
    split_text = cfg.text_learning_rate is not None
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = split_text and name.removeprefix("module.").startswith("text_encoder.model.")
        decays = not (p.ndim < 2 or name.startswith("loss_fn."))
        groups.setdefault((is_text, decays), []).append(p)
    ordered = [(False, True), (False, False), (True, True), (True, False)]
    param_groups = [
        {"params": groups.get(key, []), "weight_decay": cfg.weight_decay if key[1] else 0.0,
         "lr": cfg.text_learning_rate if key[0] else cfg.learning_rate}
        for key in ordered[: 4 if split_text else 2]
    ]  # fmt: skip
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module):
    """Batch norms normalise with batch statistics as usual but leave their running statistics
    untouched: the no-grad pass of a cached-embedding step must not count a batch twice."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as uint8 tensors (what `weights_only` loading accepts)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def truncate_log(path: Path, step: int, step_of) -> None:
    """Drop the records of steps after `step` (logged by a run killed before it could save them), so a
    resumed run logs each step once. Rewritten through a temp file: a kill now leaves the old file."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        s = step_of(line)
        if s is not None and s <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _jsonl_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a torn last line, or not a record
        return None


def _csv_step(line: str) -> int | None:
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() else (-1 if head == "step" else None)  # keep the header


# ----------------------------------------------------------------------------- the trainer
class SigLIPTrainer:
    """Trains a ChestCTCLIP on a table of (volume, report) pairs; see `train()`."""

    def __init__(
        self,
        cfg: Config,
        model: ChestCTCLIP,
        train_table: Table,
        val_table: Table | None,
        *,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        ddp_model: nn.Module | None = None,
    ):
        self.cfg, self.model, self.device = cfg, model, device
        self.rank, self.world_size = rank, world_size
        self.forward_model = ddp_model or model  # DDP wrapper when distributed
        self.is_main = rank == 0
        self.run_dir = Path(cfg.save_dir)
        self.train_table, self.val_table = train_table, val_table
        self.global_batch = cfg.batch_size * world_size * cfg.grad_accum_steps
        self.data_fingerprint = table_fingerprint(train_table)
        tokenizer = model.text_encoder.tokenizer
        self.train_set = CTReportDataset(
            train_table,
            npz_key=cfg.npz_key,
            channels=cfg.in_channels,
            augment=cfg.augment,
            seed=cfg.seed,
            on_bad_sample=cfg.on_bad_sample,
            cache_dir=cfg.cache_dir,
            sentence_sampling=cfg.sentence_sampling,
            pair_texts=cfg.text_pair_weight > 0,
        )
        self.sampler = GlobalBatchSampler(
            len(self.train_set),
            cfg.batch_size,
            world_size=world_size,
            rank=rank,
            accum=cfg.grad_accum_steps,
            seed=cfg.seed,
        )
        self.train_loader = _loader(cfg, self.train_set, self.sampler, tokenizer, cfg.batch_size, device)
        self.val_loader = None
        if val_table is not None:
            ds = eval_dataset(cfg, val_table)
            self.val_loader = _loader(
                cfg,
                ds,
                EvalSampler(len(ds), world_size, rank),
                tokenizer,
                cfg.eval_batch_size or cfg.batch_size,
                device,
            )
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = autocast_factory(device, self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.optimizer = build_optimizer(model, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.watchdog = Watchdog(0)  # replaced by an active one while train() runs
        self.step = 0
        self.best: float | None = None
        self.bad_samples = 0
        self.skipped_steps = 0
        self.bad_steps_in_row = 0
        self.stop_signal: int | None = None
        self._new_bad: list[dict] = []  # bad-sample notes since the last step, not yet shared across ranks
        self._fetching = self._worker_exited = False  # see `_defer_worker_errors`
        self._sigchld_previous = None

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint. Collective under torchrun (every rank's RNG state is gathered): call on all ranks."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": self._rng_states(),
            "config": asdict(self.cfg),
            "trainer": {
                "best": self.best,
                "bad_samples": self.bad_samples,
                "skipped_steps": self.skipped_steps,
                "world_size": self.world_size,
                "global_batch": self.global_batch,
                "data_sha256": self.data_fingerprint,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rngs = state["rng"]
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank], self.device)
        else:  # another number of processes: dropout cannot continue exactly anyway; a fresh, seeded stream
            torch.manual_seed(self.cfg.seed + self.rank + 7919 * self.step)
        t = state["trainer"]
        self.best, self.bad_samples, self.skipped_steps = t["best"], t["bad_samples"], t["skipped_steps"]

    def _rng_states(self) -> list[dict[str, torch.Tensor]]:
        mine = rng_state(self.device)
        if self.world_size == 1:
            return [mine]
        parts = {k: all_gather_tensors(v.to(self.device)) for k, v in mine.items()}
        return [{k: parts[k][r].cpu() for k in mine} for r in range(self.world_size)]

    def save(self, name: str | None = None) -> Path:
        """Write a checkpoint (rank 0, all ranks wait); a failed save stops the run loudly, older ones intact."""
        path = self.run_dir / (name or f"step_{self.step:08d}.pt")
        state = self.state_dict()
        if self.is_main and not (name is None and path.exists() and ckpt.verify_checkpoint(path) is None):
            try:
                ckpt.save_checkpoint(state, path)
            except OSError as e:
                newest = ckpt.find_latest(self.run_dir)
                msg = (
                    f"error: could not save checkpoint {path}: {e}. The previous checkpoint "
                    f"({newest.name if newest else 'none yet'}) is intact; free disk space or fix permissions, "
                    "then rerun with --resume auto"
                )
                log.error(msg, extra=FILE_ONLY)
                raise SystemExit(msg) from None
            if name is None:
                for old in ckpt.prune(self.run_dir, self.cfg.keep_last_n):
                    log.info("removed old checkpoint %s (--keep_last_n %d)", old.name, self.cfg.keep_last_n)
        barrier()
        return path

    def resume(self) -> None:
        """`--resume auto|PATH`: continue exactly where a checkpoint stopped, on any number of processes."""
        if not self.cfg.resume:
            return
        path = None
        if self.is_main:  # one rank hashes the candidates; the others load what it chose
            path = ckpt.find_latest(self.run_dir) if self.cfg.resume == "auto" else Path(self.cfg.resume)
        path = broadcast_object(path)
        if path is None:
            log.info("--resume auto: no complete checkpoint in %s, starting from scratch", self.run_dir)
            return
        # find_latest has just hashed it; an explicit path is checked here (by one rank: the file is shared).
        state = ckpt.load_checkpoint(path, verify=self.is_main and self.cfg.resume != "auto")
        check_config_drift(state, self.identity(), allow=self.cfg.allow_config_change)
        self.load_state_dict(state)
        if self.is_main:
            truncate_log(self.run_dir / "metrics.jsonl", self.step, _jsonl_step)
            truncate_log(self.run_dir / "bad_samples.csv", self.step, _csv_step)
            self.metrics.purge_after(self.step)
        barrier()
        log.info("Resumed from %s at step %d", path, self.step)

    def identity(self) -> dict:
        """What a checkpoint must share with this run to be continued by it (see `check_config_drift`)."""
        cfg = asdict(self.cfg)
        return {
            "config": {k: cfg[k] for k in RESUME_MUST_MATCH},
            "global_batch": self.global_batch,
            "data_sha256": self.data_fingerprint,
        }

    # -- steps -----------------------------------------------------------------------------------
    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Image and report embeddings, and the partner texts' embeddings when the batch carries them."""
        if "image_features" in batch:  # --cache_features: the heads on cached pooled features
            images, text = (batch[k].to(self.device, non_blocking=True) for k in ("image_features", "text_features"))
            with self.autocast():
                img, txt, _ = self.forward_model(images, text, compute_loss=False, pooled=True)
            return img, txt, None
        images, text = move_batch(batch, self.device, PRECISION_DTYPES[self.precision])
        with self.autocast():
            img, txt, _ = self.forward_model(images, text, compute_loss=False)
        if batch.get("pairs"):  # rows B..2B-1 of the text batch are the partners (see `Collator`)
            return img, txt[: len(img)], txt[len(img) :]
        return img, txt, None

    def _pair_term(self, txt: torch.Tensor, partner: torch.Tensor | None, share: float = 1.0) -> torch.Tensor | None:
        """`--text_pair_weight` x the report-pair loss (times `share`, a micro-batch's part of the step), or None."""
        if partner is None:
            return None
        loss = text_pair_loss(txt, partner, self.cfg.text_pair_temperature)
        self.pair_losses.append(loss.detach() * share)  # read after the step: no device sync before backward
        return self.cfg.text_pair_weight * share * loss

    def _no_sync(self, skip: bool):
        """DDP's `no_sync` (gradients accumulate locally, no all-reduce) when `skip`, else nothing."""
        return (
            self.forward_model.no_sync()
            if skip and hasattr(self.forward_model, "no_sync")
            else contextlib.nullcontext()
        )

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over the global batch; returns its loss and gradient norm.

        With one micro-batch this is a plain forward/backward. With several (`--grad_accum_steps`),
        the SigLIP loss must still pair every image with every text of the global batch, so the step
        first embeds all micro-batches without a graph, computes the loss and its gradient w.r.t. the
        embeddings, then re-runs each micro-batch with a graph (same RNG state, so the same dropout)
        and back-propagates those embedding gradients: exact, at the cost of one more forward. Under
        DDP only the last of those backward passes all-reduces the towers' gradients.
        """
        self.model.train()
        loss_fn = self.model.loss_fn
        # Batch-norm statistics change in the forward pass; a skipped (non-finite) step must not keep them,
        # or one NaN batch would poison every later step. Buffers are small next to the weights.
        buffers = [b.clone() for b in self.model.buffers()]
        self.pair_losses: list[torch.Tensor] = []
        if len(micro_batches) == 1:
            img, txt, partner = self._embed(micro_batches[0])
            loss = loss_fn(img, txt)
            pair = self._pair_term(txt, partner)
            self.scaler.scale(loss if pair is None else loss + pair).backward()
        else:
            states, imgs, txts = [], [], []
            with torch.no_grad(), frozen_norm_stats(self.model):
                for mb in micro_batches:
                    states.append(rng_state(self.device))
                    img, txt, _ = self._embed(mb)
                    imgs.append(img.float())
                    txts.append(txt.float())
            img_all = torch.cat(imgs).requires_grad_()
            txt_all = torch.cat(txts).requires_grad_()
            loss = loss_fn(img_all, txt_all)
            self.scaler.scale(loss).backward()
            sizes = [len(x) for x in imgs]
            last = len(micro_batches) - 1
            for k, (mb, state, g_img, g_txt) in enumerate(
                zip(micro_batches, states, img_all.grad.split(sizes), txt_all.grad.split(sizes))
            ):
                set_rng_state(state, self.device)
                with self._no_sync(k < last):
                    img, txt, partner = self._embed(mb)
                    # the pair loss pairs texts within each micro-batch (it is a text regulariser, see text_pair_loss)
                    pair = self._pair_term(txt, partner, share=1.0 / len(micro_batches))
                    outputs, grads = [img.float(), txt.float()], [g_img, g_txt]
                    if pair is not None:
                        outputs.append(self.scaler.scale(pair))
                        grads.append(None)
                    torch.autograd.backward(outputs, grads)
        loss_value = self._average_loss_and_scalar_grads(loss)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        # With fp16 an overflowing gradient is the scaler's business (it skips the step and lowers
        # the scale); anything else non-finite is a numerical fault that skips the step here. Loss and
        # norm are the same on every rank (averaged), so every rank takes the same decision.
        finite = bool(torch.isfinite(loss_value)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
            self.bad_steps_in_row = 0
        else:
            self.bad_steps_in_row += 1
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        out = {"loss": float(loss_value), "grad_norm": float(grad_norm), "finite": finite}
        if self.pair_losses:  # this rank's own value (not averaged over ranks: it is logged, never compared)
            out["pair_loss"] = float(sum(self.pair_losses))
        return out

    def _average_loss_and_scalar_grads(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss value and the gradients of t' and b, averaged over ranks in one all-reduce.

        DDP averages the towers' gradients, but t' and b are used outside its forward (the loss scores
        embeddings of several micro-batches and ranks), so it is told to ignore them and this does
        its job for them: same arithmetic, one message of three numbers.
        """
        if self.world_size == 1:
            return loss.detach()
        lf = self.model.loss_fn
        params = [p for p in (lf.t_prime, lf.bias) if p.requires_grad and p.grad is not None]
        buf = torch.stack([loss.detach().float(), *(p.grad.float() for p in params)])
        torch.distributed.all_reduce(buf)
        buf /= self.world_size
        for p, v in zip(params, buf[1:]):
            p.grad.copy_(v)
        return buf[0]

    def batches(self) -> Iterator[list[dict]]:
        """Global batches (lists of `grad_accum_steps` micro-batches) from the current step on, forever."""
        self.sampler.set_start(self.step)
        while True:
            group: list[dict] = []
            # A new epoch: persistent workers restart, and their first answer is awaited here already.
            it = self._from_loader(lambda: iter(self.train_loader))
            self._defer_worker_errors()
            while (batch := self._from_loader(functools.partial(next, it, None))) is not None:
                if "errors" in batch:  # --on_bad_sample error: the message names the file and row
                    raise_batch_errors(batch)
                self._new_bad.extend(batch["bad"])
                group.append(batch)
                if len(group) == self.cfg.grad_accum_steps:
                    yield group
                    group = []

    def _from_loader(self, fetch):
        """`fetch()` from the train loader, with its worker failures as one actionable `LoaderFailure`."""
        self._fetching = True
        try:
            if self._worker_exited:  # a worker died during the last step: report it now
                self._worker_exited = False
                torch._C._error_if_any_worker_fails()
            return fetch()
        except RuntimeError as e:
            failure = loader_failure(e, self.cfg.loader_timeout)
            if failure is None:
                raise
            raise failure from None
        finally:
            self._fetching = False

    def _defer_worker_errors(self) -> None:
        """PyTorch's SIGCHLD handler raises "DataLoader worker ... killed" wherever the main thread is, possibly
        half-way through an optimizer step, leaving nothing consistent to save. Once its handler is installed
        (by the first worker iterator), replace it by one that raises only while the loop waits for a batch
        and otherwise remembers, so a dead worker (often the OOM killer) surfaces between steps."""
        if self.cfg.num_workers == 0 or self._sigchld_previous is not None:
            return

        def handler(signum, frame):
            if self._fetching:
                torch._C._error_if_any_worker_fails()
            else:
                self._worker_exited = True

        with contextlib.suppress(ValueError):  # not the main thread: keep PyTorch's behaviour
            self._sigchld_previous = signal.signal(signal.SIGCHLD, handler)

    def _next_global_batch(self, data: Iterator[list[dict]]) -> list[dict]:
        """The next step's micro-batches, once every rank agrees that no rank failed or was signalled.

        One all-gather of three ints per step: (fault, signal number, new bad samples). On a fault
        anywhere every rank saves the step reached and stops; on a signal anywhere, likewise with
        exit status 128 + signal.
        """
        fault: Exception | None = None
        micro: list[dict] = []
        try:
            micro = next(data)
        except (DataError, LoaderFailure) as e:
            fault = e
        status = gather_ints([fault is not None, self.stop_signal or 0, len(self._new_bad)], self.device)
        if any(s[2] for s in status):
            fault = self._record_bad_samples() or fault
        if fault is not None or any(s[0] for s in status):
            messages = all_gather_objects(None if fault is None else str(fault))
            if self.step > 0:  # keep what was trained
                self.save()
            if fault is not None:
                raise fault
            rank, msg = next((r, m) for r, m in enumerate(messages) if m)
            raise PeerFailure(f"rank {rank} stopped the run: {msg}")
        signum = max(s[1] for s in status)
        if signum:
            log.warning(
                "signal %d (%s): saving step %d, then exiting with %d",
                signum,
                signal.Signals(signum).name,
                self.step,
                128 + signum,
            )
            self.save()
            self.metrics.close()
            raise SystemExit(128 + signum)
        return micro

    def _record_bad_samples(self) -> DataError | None:
        """Bad samples replaced since the last step (all ranks): log, count, append to bad_samples.csv; an
        error once they exceed --max_bad_fraction of the samples seen (or of the data set, early on)."""
        notes = [n for part in all_gather_objects(self._new_bad) for n in part]
        self._new_bad = []
        self.bad_samples += len(notes)
        path = self.run_dir / "bad_samples.csv"
        if self.is_main:
            for n in notes:
                log.warning("bad sample replaced: %s", n["message"])
            new_file = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new_file:
                    w.writerow(["step", "path", "row", "problem"])
                w.writerows([self.step + 1, n["path"], n["row"], n["problem"]] for n in notes)
        seen = (self.step + 1) * self.global_batch
        if self.bad_samples > self.cfg.max_bad_fraction * max(seen, len(self.train_set)):
            return DataError(
                f"{self.bad_samples} bad samples in {seen} exceed --max_bad_fraction {self.cfg.max_bad_fraction}",
                path=str(path),
                hint="fix or remove the files listed there",
            )
        return None

    # -- evaluation --------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Validation metrics over the whole split: each rank embeds its shard, rank 0 scores them all, and
        every rank gets the result (so all take the same "best" decision)."""
        if self.val_loader is None:
            return {}
        # Validation has no step to beat the watchdog with; its loader has --loader_timeout.
        with self.watchdog.paused():
            with self.model.loss_fn.local():
                emb = self._embeddings()
            metrics: dict[str, float] = {}
            if self.is_main:
                labels = {c: self.val_table.frame[c].to_numpy() for c in self.val_table.label_columns}
                metrics = evaluate_embeddings(
                    emb, labels=labels, encode_text=text_encoder_fn(self.model, self.device, self.autocast)
                )
                self.metrics.log(self.step, metrics)
                tqdm.write(format_table(metrics, title=f"Validation at step {self.step}"))
            metrics = broadcast_object(metrics)
        value = metrics.get(self.cfg.best_metric)
        if (
            value is not None
            and math.isfinite(value)
            and (self.best is None or (value > self.best if self.cfg.best_is_max else value < self.best))
        ):
            self.best = value
            self.save("best.pt")
        return metrics

    def _embeddings(self) -> dict:
        """Validation embeddings in data-set order, gathered from every rank; the loss over them is the
        mean over batches of the evaluation batch size, as one process would compute it."""
        if len(self.val_loader.sampler):
            emb = compute_embeddings(self.model, self.val_loader, self.device, self.precision, progress=self.is_main)
        else:  # more ranks than validation samples
            empty = torch.zeros(0, self.cfg.embed_dim)
            emb = {"image": empty, "text": empty.clone(), "index": torch.zeros(0, dtype=torch.long), "loss": math.nan}
        if self.world_size == 1:
            return emb
        index = torch.cat(all_gather_rows(emb["index"], self.device))
        order = index.argsort()
        out = {k: torch.cat(all_gather_rows(emb[k], self.device))[order] for k in ("image", "text")}
        out["index"] = index[order]
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        with torch.no_grad():
            losses = [
                float(
                    self.model.loss_fn(
                        out["image"][i : i + bs].to(self.device), out["text"][i : i + bs].to(self.device)
                    )
                )
                * len(out["image"][i : i + bs])
                for i in range(0, len(index), bs)
            ]
        out["loss"] = sum(losses) / max(len(index), 1)
        return out

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Train to `--max_steps`; validate, log and save on their intervals; stop cleanly on a signal."""
        cfg = self.cfg
        self.resume()
        if cfg.cache_features:  # after resume: the features are those of the weights the run continues with
            self.train_loader = self._from_loader(functools.partial(
                cached_feature_loader, self.model, self.train_set, self.sampler, cfg, device=self.device,
                precision=self.precision, rank=self.rank, world_size=self.world_size,
            ))  # fmt: skip
        data = self.batches()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not self.is_main, dynamic_ncols=True)
        self.watchdog = Watchdog(cfg.watchdog_timeout, describe=lambda: f"rank {self.rank}, at step {self.step + 1}")
        try:
            with self._signal_handlers(), self.watchdog:
                last_val = self._loop(data, bar)
                bar.close()
                if not last_val or self.step % max(cfg.eval_interval, 1) != 0:
                    last_val = self.validate()
        finally:
            data.close()
            self.close_loaders()
        self.metrics.close()
        return last_val

    def close_loaders(self) -> None:
        """Stop the loader workers now, whatever ended the run. Left to the garbage collector (the trainer
        sits in reference cycles), they would outlive it: the collector finalizes the loader's queues before
        the iterator can send its workers the stop message, which then waits 2 x 5 s per worker in vain."""
        for loader in (self.train_loader, self.val_loader):
            it = getattr(loader, "_iterator", None)  # persistent workers: DataLoader has no public close()
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
                loader._iterator = None

    def _loop(self, data: Iterator[list[dict]], bar: tqdm) -> dict[str, float]:
        cfg = self.cfg
        t0, samples = time.perf_counter(), 0
        last_val: dict[str, float] = {}
        while self.step < cfg.max_steps:
            micro = self._next_global_batch(data)
            out = self.train_step(micro)
            self.step += 1
            self.watchdog.beat()
            samples += self.global_batch
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
            if not out["finite"]:
                self._on_nonfinite(out)
            if cfg.log_sample_ids:
                ids = torch.cat([b["index"] for b in micro]).to(self.device)
                self.metrics.log(self.step, {"train/sample_ids": torch.cat(all_gather_tensors(ids)).tolist()})
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t0
                self._log_train(out, samples / max(elapsed, 1e-9))
                t0, samples = time.perf_counter(), 0
            if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                last_val = self.validate()
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                self.save()
        return last_val

    def _on_nonfinite(self, out: dict) -> None:
        self.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss or gradient (loss %s, gradient norm %s); step skipped, %d in a row",
            self.step,
            out["loss"],
            out["grad_norm"],
            self.bad_steps_in_row,
        )
        self.metrics.log(self.step, {"train/skipped_steps": self.skipped_steps})
        if self.bad_steps_in_row >= self.cfg.max_bad_steps:
            self.save()
            msg = (
                f"error: {self.bad_steps_in_row} non-finite steps in a row (--max_bad_steps); saved step "
                f"{self.step}. Lower --learning_rate, set --grad_clip, or use --precision bf16/fp32, then "
                "--resume auto"
            )
            log.error(msg, extra=FILE_ONLY)
            raise SystemExit(msg)

    def _log_train(self, out: dict, throughput: float) -> None:
        lr = self.scheduler.get_last_lr()[0]
        loss_fn = self.model.loss_fn
        metrics = {
            "train/loss": out["loss"],
            "train/lr": lr,
            "train/t": loss_fn.t.item(),
            "train/b": loss_fn.b.item(),
            "train/grad_norm": out["grad_norm"],
            "train/samples_per_s": throughput,
            "train/bad_samples": self.bad_samples,
            "train/skipped_steps": self.skipped_steps,
        }
        if "pair_loss" in out:
            metrics["train/pair_loss"] = out["pair_loss"]
        self.metrics.log(self.step, metrics)
        if self.is_main:
            tqdm.write(f"Step {self.step}: Loss = {out['loss']:.4f}, LR = {lr:.2e}")

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """SIGTERM/SIGINT/SIGUSR1 only set a flag (no I/O in the handler: it may interrupt a print); the loop
        finishes the step, saves and exits with 128 + signal. A second signal exits at once."""

        def handler(signum, frame):
            if self.stop_signal is not None:
                os.write(2, f"\nsignal {signum} again: exiting now without saving\n".encode())
                os._exit(128 + signum)
            self.stop_signal = signum

        previous = {}
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if self._sigchld_previous is not None:
                signal.signal(signal.SIGCHLD, self._sigchld_previous)


def check_config_drift(state: dict, current: dict, *, allow: bool = False) -> None:
    """Refuse to continue a checkpoint whose model settings, global batch or training rows differ from this
    run's (its steps would not mean the same thing); with `allow`, only log the differences."""
    saved_cfg, t = state["config"], state["trainer"]
    changed = [f"--{k} {saved_cfg.get(k)!r} -> {v!r}" for k, v in current["config"].items() if saved_cfg.get(k) != v]
    if t.get("global_batch") != current["global_batch"]:
        changed.append(
            f"global batch (batch_size x processes x grad_accum_steps) {t.get('global_batch')} -> "
            f"{current['global_batch']}"
        )
    if t.get("data_sha256") != current["data_sha256"]:
        changed.append("the training rows (image paths or reports of the split) changed")
    if changed and allow:
        log.warning("resuming with changed settings (--allow_config_change): %s", "; ".join(changed))
    elif changed:
        raise ConfigError(
            f"cannot resume: this run differs from the checkpoint's: {'; '.join(changed)}. Use a new "
            "--save_dir, restore the settings, or pass --allow_config_change"
        )


def load_model_from_checkpoint(path: str | Path, *, device: torch.device) -> tuple[ChestCTCLIP, dict, int]:
    """Rebuild the model a checkpoint was trained with and load its weights (strict)."""
    state = ckpt.load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    cfg_for_build = Config.from_dict(
        {**state["config"], "image_weights": "none", "text_model_path": None, "init_from": None}
    )
    model = build_model(cfg_for_build, device=device)
    model.load_state_dict(state["model"])
    return model, asdict(cfg), int(state.get("step", 0))


# ----------------------------------------------------------------------------- entry point
FILE_ONLY = {"file_only": True}  # `extra=` for a record the console already shows (on stderr)


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [console]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(message)s", handlers=handlers, force=True
    )


def preflight_tables(
    cfg: Config, train: Table, val: Table | None, run_dir: Path, rank: int, world_size: int
) -> Table | None:
    """Check every file before step 1 (see `preflight`). With --on_bad_sample error any bad file stops the
    run here; with skip, bad training rows are replaced when drawn (counted) unless there are too many,
    and bad validation rows are left out. Returns the validation table to use."""
    from .preflight import CACHE_NAME, run_preflight

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
        return val
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
    log.warning("Preflight: %d bad training rows will be replaced when drawn (listed in %s)", n_train, listing)
    if val is not None:
        bad = {e.path for e in errors}
        keep = ~val.frame["path"].isin(bad)
        if not keep.all():
            log.warning(
                "Preflight: %s of the validation split left out (bad files)", rows_text(val.frame["row"][~keep])
            )
            val = Table(val.frame[keep].reset_index(drop=True), val.source, val.label_columns, val.missing_reports)
    return val


def run(cfg: Config) -> dict[str, float]:
    """Build everything from a resolved config and train; returns the final validation metrics."""
    device = resolve_device(cfg.device)
    rank, world_size, local_rank = init_distributed(device.type, cfg.dist_timeout)
    try:
        return _run(cfg, device, rank, world_size, local_rank)
    finally:  # also after an error: a process group left to interpreter exit can abort the process
        shutdown_distributed()


def _run(cfg: Config, device: torch.device, rank: int, world_size: int, local_rank: int) -> dict[str, float]:
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    run_dir = Path(cfg.save_dir)
    probe_writable(run_dir)
    setup_logging(run_dir, rank == 0)
    seed_everything(cfg.seed + rank, cfg.deterministic)
    train_table = load_table(cfg, cfg.train_split, train=True)
    val_table = load_table(cfg, cfg.val_split, train=False)
    log.info("Loading training data from: %s", train_table.source)
    log.info(
        "Found %d training samples%s",
        len(train_table),
        f" and {len(val_table)} validation samples" if val_table is not None else " (no validation split)",
    )
    for name, table in (("train", train_table), ("val", val_table)):
        if table is not None and table.missing_reports:
            log.warning(
                "%d %s samples have no report (%s, %s); using %r",
                table.missing_reports,
                name,
                table.source,
                rows_text(table.missing_report_rows),
                cfg.missing_report_text,
            )
    if cfg.preflight:
        val_table = preflight_tables(cfg, train_table, val_table, run_dir, rank, world_size)
    if rank == 0:
        cfg.save(run_dir / "config.json")
        ckpt.remove_stale_temps(run_dir)
    log.info("Creating model...")
    text_dtype = torch.bfloat16 if device.type == "cuda" and cfg.text_train in ("lora", "frozen") else None
    model = build_model(cfg, device=device, rank=rank, world_size=world_size, text_dtype=text_dtype)
    if cfg.init_from:
        state = ckpt.load_checkpoint(cfg.init_from)
        model.load_state_dict(state["model"])
        log.info("Initialised model weights from %s (fresh optimizer and schedule)", cfg.init_from)
    total, trainable = count_parameters(model)
    log.info("Total parameters: %s", f"{total:,}")
    log.info("Trainable parameters: %s", f"{trainable:,}")
    ddp_model = None
    if world_size > 1:
        # t' and b are used by the loss outside DDP's forward; the trainer averages their gradients itself.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, _ in model.loss_fn.named_parameters(prefix="loss_fn")]
        )
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    trainer = SigLIPTrainer(
        cfg, model, train_table, val_table, device=device, rank=rank, world_size=world_size, ddp_model=ddp_model
    )
    log.info("Starting training...")
    return trainer.train()


def probe_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--save_dir {run_dir} is not writable ({e}); choose another folder") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python siglip_trainer.py --csv_file data.csv ...` (or `--demo`).

    Exit status: 0 done; 1 a fatal run error (failed save, dead or hung loader, another rank failed,
    non-finite steps), after saving what was trained where possible; 2 bad data, settings or checkpoint
    (one line naming the file, row and fix); 124 the watchdog saw no progress; 128 + N stopped by signal N
    after saving.
    """
    if not faulthandler.is_enabled():  # a crash in native code (a loader, a collective) still names the Python line
        faulthandler.enable()
    cfg = parse_config(argv)
    if cfg.demo:
        from .demo import demo_config

        cfg = demo_config(cfg, argv)
    try:
        metrics = run(cfg)
    except (DataError, ConfigError, ckpt.CheckpointError) as e:
        log.error("error: %s", e, extra=FILE_ONLY)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (LoaderFailure, PeerFailure) as e:
        log.error("error: %s", e, extra=FILE_ONLY)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.demo and metrics:
        from .demo import print_demo_summary

        print_demo_summary(cfg, metrics)
    return 0
