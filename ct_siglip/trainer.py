"""The training loop: `SigLIPTrainer.train()` calls `train_step`, `validate`, `save` and `resume`.

Everything a run needs to continue exactly (model, optimizer, scheduler, scaler, step, RNG states,
best metric, bad-sample counts, config) is one checkpoint dict; the data position is the step,
because every step consumes one fixed global batch (see `GlobalBatchSampler`).
"""

from __future__ import annotations

import contextlib
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
    move_batch,
    read_csv_table,
    read_directory_table,
)
from .errors import ConfigError, DataError
from .evaluate import compute_embeddings, evaluate_embeddings, raise_batch_errors, text_encoder_fn
from .model import ChestCTCLIP, build_model, count_parameters
from .runlog import MetricsLogger, format_table

log = logging.getLogger("ct_siglip")

# Settings that change what a checkpoint means; resuming with other values is refused.
RESUME_MUST_MATCH = ("csv_file", "train_split", "train_data_dir", "in_channels", "embed_dim", "image_depth",
                     "image_width", "text_model", "pooling_mode", "text_train", "batch_size", "grad_accum_steps",
                     "seed", "max_text_length", "text_instruction")


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
        return read_csv_table(cfg.csv_file, split, img_path_column=cfg.img_path_column,
                              findings_column=cfg.findings_column, split_column=cfg.split_column,
                              label_columns=cfg.label_columns, missing_report_text=cfg.missing_report_text)
    folder = cfg.train_data_dir if train else cfg.val_data_dir
    if folder is None:
        return None
    return read_directory_table(folder, cfg.text_reports_path, missing_report_text=cfg.missing_report_text)


def _loader(cfg: Config, dataset, sampler, tokenizer, batch_size: int, device: torch.device) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=Collator(tokenizer),
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=False,
        prefetch_factor=4 if workers > 0 else None,
        # Workers draw their seeds from this generator, not the global RNG: resuming stays exact.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_eval_loader(cfg: Config, split: str, tokenizer, *, world_size: int = 1, rank: int = 0,
                      device: torch.device | None = None) -> tuple[DataLoader, Table]:
    table = load_table(cfg, split, train=False)
    ds = CTReportDataset(table, npz_key=cfg.npz_key, channels=cfg.in_channels, seed=cfg.seed,
                         on_bad_sample="error")
    loader = _loader(cfg, ds, EvalSampler(len(ds), world_size, rank), tokenizer,
                     cfg.eval_batch_size or cfg.batch_size, device or torch.device("cpu"))
    return loader, table


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices and kernels (not on biases, norms, t' and b)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith("loss_fn.") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=fused)


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
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- the trainer
class SigLIPTrainer:
    """Trains a ChestCTCLIP on a table of (volume, report) pairs; see `train()`."""

    def __init__(self, cfg: Config, model: ChestCTCLIP, train_table: Table, val_table: Table | None, *,
                 device: torch.device, rank: int = 0, world_size: int = 1, ddp_model: nn.Module | None = None):
        self.cfg, self.model, self.device = cfg, model, device
        self.rank, self.world_size = rank, world_size
        self.forward_model = ddp_model or model  # DDP wrapper when distributed
        self.is_main = rank == 0
        self.run_dir = Path(cfg.save_dir)
        self.train_table, self.val_table = train_table, val_table
        tokenizer = model.text_encoder.tokenizer
        self.train_set = CTReportDataset(train_table, npz_key=cfg.npz_key, channels=cfg.in_channels,
                                         augment=cfg.augment, seed=cfg.seed, on_bad_sample=cfg.on_bad_sample)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.batch_size, world_size=world_size, rank=rank,
                                          accum=cfg.grad_accum_steps, seed=cfg.seed)
        self.train_loader = _loader(cfg, self.train_set, self.sampler, tokenizer, cfg.batch_size, device)
        self.val_loader = None
        if val_table is not None:
            ds = CTReportDataset(val_table, npz_key=cfg.npz_key, channels=cfg.in_channels, seed=cfg.seed)
            self.val_loader = _loader(cfg, ds, EvalSampler(len(ds), world_size, rank), tokenizer,
                                      cfg.eval_batch_size or cfg.batch_size, device)
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = autocast_factory(device, self.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.optimizer = build_optimizer(model, cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.step = 0
        self.best: float | None = None
        self.bad_samples = 0
        self.seen_samples = 0
        self.bad_steps_in_row = 0
        self.stop_signal: int | None = None

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "rng": rng_state(self.device), "config": asdict(self.cfg),
            "trainer": {"best": self.best, "bad_samples": self.bad_samples, "seen_samples": self.seen_samples,
                        "world_size": self.world_size},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        set_rng_state(state["rng"], self.device)
        t = state["trainer"]
        self.best, self.bad_samples, self.seen_samples = t["best"], t["bad_samples"], t["seen_samples"]

    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint (rank 0); a failed save stops the run loudly and leaves older ones intact."""
        path = self.run_dir / (name or f"step_{self.step:08d}.pt")
        if self.is_main:
            try:
                ckpt.save_checkpoint(self.state_dict(), path)
            except OSError as e:
                raise SystemExit(f"error: could not save checkpoint {path}: {e}. Earlier checkpoints are intact; "
                                 "free disk space or fix permissions, then rerun with --resume auto") from None
            if name is None:
                ckpt.prune(self.run_dir, self.cfg.keep_last_n)
        self._barrier()
        return path

    def resume(self) -> None:
        """`--resume auto|PATH`: continue exactly where a checkpoint stopped."""
        if not self.cfg.resume:
            return
        path = ckpt.find_latest(self.run_dir) if self.cfg.resume == "auto" else Path(self.cfg.resume)
        if path is None:
            log.info("--resume auto: no complete checkpoint in %s, starting from scratch", self.run_dir)
            return
        state = ckpt.load_checkpoint(path)
        check_config_drift(state["config"], asdict(self.cfg))
        self.load_state_dict(state)
        log.info("Resumed from %s at step %d", path, self.step)

    # -- steps -----------------------------------------------------------------------------------
    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images, text = move_batch(batch, self.device, PRECISION_DTYPES[self.precision])
        with self.autocast():
            img, txt, _ = self.forward_model(images, text, compute_loss=False)
        return img, txt

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over the global batch; returns its loss and gradient norm.

        With one micro-batch this is a plain forward/backward. With several (`--grad_accum_steps`),
        the SigLIP loss must still pair every image with every text of the global batch, so the step
        first embeds all micro-batches without a graph, computes the loss and its gradient w.r.t. the
        embeddings, then re-runs each micro-batch with a graph (same RNG state, so the same dropout)
        and back-propagates those embedding gradients: exact, at the cost of one more forward.
        """
        self.model.train()
        loss_fn = self.model.loss_fn
        if len(micro_batches) == 1:
            img, txt = self._embed(micro_batches[0])
            loss = loss_fn(img, txt)
            self.scaler.scale(loss).backward()
        else:
            states, imgs, txts = [], [], []
            with torch.no_grad(), frozen_norm_stats(self.model):
                for mb in micro_batches:
                    states.append(rng_state(self.device))
                    img, txt = self._embed(mb)
                    imgs.append(img.float())
                    txts.append(txt.float())
            img_all = torch.cat(imgs).requires_grad_()
            txt_all = torch.cat(txts).requires_grad_()
            loss = loss_fn(img_all, txt_all)
            self.scaler.scale(loss).backward()
            sizes = [len(x) for x in imgs]
            for mb, state, g_img, g_txt in zip(micro_batches, states, img_all.grad.split(sizes),
                                               txt_all.grad.split(sizes)):
                set_rng_state(state, self.device)
                img, txt = self._embed(mb)
                torch.autograd.backward([img.float(), txt.float()], [g_img, g_txt])
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        loss_value = self._global_mean(loss.detach())
        # With fp16 an overflowing gradient is the scaler's business (it skips the step and lowers
        # the scale); anything else non-finite is a numerical fault that skips the step here.
        finite = bool(torch.isfinite(loss_value)) and (self.scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
        if finite:
            self.scaler.step(self.optimizer)
            self.bad_steps_in_row = 0
        else:
            self.bad_steps_in_row += 1
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": float(loss_value), "grad_norm": float(grad_norm), "finite": finite}

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
        return value

    def _barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def batches(self) -> Iterator[list[dict]]:
        """Global batches (lists of `grad_accum_steps` micro-batches) from the current step on, forever."""
        self.sampler.set_start(self.step)
        while True:
            group: list[dict] = []
            for batch in self.train_loader:
                self._account(batch)
                group.append(batch)
                if len(group) == self.cfg.grad_accum_steps:
                    yield group
                    group = []

    def _account(self, batch: dict) -> None:
        """Bad samples: stop with the file and row (error), or count them and stop above the limit (skip)."""
        if "errors" in batch:
            raise_batch_errors(batch)
        self.seen_samples += len(batch["images"])
        if batch["bad"]:
            self.bad_samples += len(batch["bad"])
            for msg in batch["bad"]:
                log.warning("bad sample replaced: %s", msg)
            if self.is_main:
                with open(self.run_dir / "bad_samples.csv", "a") as f:
                    f.writelines(f"{self.step},\"{m.replace(chr(34), chr(39))}\"\n" for m in batch["bad"])
            if self.bad_samples > self.cfg.max_bad_fraction * max(self.seen_samples, len(self.train_set)):
                raise DataError(f"{self.bad_samples} bad samples exceed --max_bad_fraction "
                                f"{self.cfg.max_bad_fraction}; see {self.run_dir / 'bad_samples.csv'}")

    # -- evaluation --------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        emb = compute_embeddings(self.model, self.val_loader, self.device, self.precision, progress=self.is_main)
        labels = {c: self.val_table.frame[c].to_numpy() for c in self.val_table.label_columns}
        metrics = evaluate_embeddings(emb, labels=labels,
                                      encode_text=text_encoder_fn(self.model, self.device, self.autocast))
        self.metrics.log(self.step, metrics)
        if self.is_main:
            tqdm.write(format_table(metrics, title=f"Validation at step {self.step}"))
        value = metrics.get(self.cfg.best_metric)
        if value is not None and math.isfinite(value) and (
                self.best is None or (value > self.best if self.cfg.best_is_max else value < self.best)):
            self.best = value
            self.save("best.pt")
        return metrics

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Train to `--max_steps`; validate, log and save on their intervals; stop cleanly on a signal."""
        cfg = self.cfg
        self.resume()
        self._install_signal_handlers()
        data = self.batches()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not self.is_main, dynamic_ncols=True)
        last_val: dict[str, float] = {}
        try:
            last_val = self._loop(data, bar)
        except DataError:
            if self.step > 0:  # keep what was trained; the message names the bad file and row
                self.save()
            raise
        bar.close()
        if not last_val or self.step % max(cfg.eval_interval, 1) != 0:
            last_val = self.validate()
        self.metrics.close()
        return last_val

    def _loop(self, data: Iterator[list[dict]], bar: tqdm) -> dict[str, float]:
        cfg = self.cfg
        t0, samples = time.perf_counter(), 0
        last_val: dict[str, float] = {}
        while self.step < cfg.max_steps:
            out = self.train_step(next(data))
            self.step += 1
            samples += cfg.batch_size * cfg.grad_accum_steps * self.world_size
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}")
            if not out["finite"]:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                            self.step, self.bad_steps_in_row)
                if self.bad_steps_in_row >= cfg.max_bad_steps:
                    self.save()
                    raise SystemExit(f"error: {self.bad_steps_in_row} non-finite steps in a row; saved step "
                                     f"{self.step}. Lower --learning_rate or use --precision bf16/fp32.")
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t0
                self._log_train(out, samples / max(elapsed, 1e-9))
                t0, samples = time.perf_counter(), 0
            if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                last_val = self.validate()
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                self.save()
            if self.stop_signal is not None:
                self._stop_on_signal()
        return last_val

    def _log_train(self, out: dict, throughput: float) -> None:
        lr = self.scheduler.get_last_lr()[0]
        loss_fn = self.model.loss_fn
        metrics = {"train/loss": out["loss"], "train/lr": lr, "train/t": loss_fn.t.item(), "train/b": loss_fn.b.item(),
                   "train/grad_norm": out["grad_norm"], "train/samples_per_s": throughput,
                   "train/bad_samples": self.bad_samples}
        self.metrics.log(self.step, metrics)
        if self.is_main:
            tqdm.write(f"Step {self.step}: Loss = {out['loss']:.4f}, LR = {lr:.2e}")

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.stop_signal is not None:  # a second signal: leave at once
                os._exit(128 + signum)
            self.stop_signal = signum
            log.warning("signal %d: finishing step %d, saving, then exiting", signum, self.step)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, handler)

    def _stop_on_signal(self) -> None:
        self.save()
        self.metrics.close()
        raise SystemExit(128 + self.stop_signal)


def check_config_drift(saved: dict, current: dict) -> None:
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != current.get(k)]
    if changed and current.get("allow_config_change"):
        log.warning("resuming with changed settings (--allow_config_change): %s", ", ".join(changed))
    elif changed:
        detail = ", ".join(f"--{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume: settings differ from the checkpoint's ({detail}); "
                          "use a new --save_dir, or --allow_config_change")


def load_model_from_checkpoint(path: str | Path, *, device: torch.device) -> tuple[ChestCTCLIP, dict, int]:
    """Rebuild the model a checkpoint was trained with and load its weights (strict)."""
    state = ckpt.load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    cfg_for_build = Config.from_dict({**state["config"], "image_weights": "none", "text_model_path": None,
                                      "init_from": None})
    model = build_model(cfg_for_build, device=device)
    model.load_state_dict(state["model"])
    return model, asdict(cfg), int(state.get("step", 0))


# ----------------------------------------------------------------------------- entry point
def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s",
                        handlers=handlers, force=True)


def run(cfg: Config) -> dict[str, float]:
    """Build everything from a resolved config and train; returns the final validation metrics."""
    from .distributed import init_distributed

    rank, world_size, local_rank = init_distributed()
    device = resolve_device(cfg.device)
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
    log.info("Found %d training samples%s", len(train_table),
             f" and {len(val_table)} validation samples" if val_table is not None else " (no validation split)")
    for name, table in (("train", train_table), ("val", val_table)):
        if table is not None and table.missing_reports:
            log.warning("%d %s samples have no report; using %r", table.missing_reports, name,
                        cfg.missing_report_text)
    if rank == 0:
        cfg.save(run_dir / "config.json")
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
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    trainer = SigLIPTrainer(cfg, model, train_table, val_table, device=device, rank=rank, world_size=world_size,
                            ddp_model=ddp_model)
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
    """CLI entry point: `python siglip_trainer.py --csv_file data.csv ...` (or `--demo`)."""
    cfg = parse_config(argv)
    if cfg.demo:
        from .demo import demo_config

        cfg = demo_config(cfg, argv)
    try:
        metrics = run(cfg)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.demo and metrics:
        from .demo import print_demo_summary

        print_demo_summary(cfg, metrics)
    return 0
