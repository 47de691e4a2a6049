"""The training loop: `SigLIPTrainer.train()` calls `train_step`, `validate`, `save` and `resume`.

Everything a run needs to continue exactly (model, optimizer, scheduler, scaler, step, per-rank RNG
states, best metric, bad-sample counts, config, data fingerprint) is one checkpoint dict; the data
position is the step, because every step consumes one fixed global batch (see `GlobalBatchSampler`).

Under torchrun every rank takes the same decisions at the same step: before each step one tiny
all-gather tells all ranks whether any rank was signalled, hit bad data or lost its loader, so they
all save the same step and stop together instead of leaving the others blocked in a collective.

The step itself (forward, backward, clip, optimizer) is `ct_siglip.step.TrainStep`; the command line,
set-up and logging are `ct_siglip.train`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config
from .data import CTReportDataset, GlobalBatchSampler
from .distributed import (
    Watchdog,
    all_gather_objects,
    all_gather_rows,
    all_gather_tensors,
    barrier,
    broadcast_object,
    gather_ints,
)
from .errors import DataError, LoaderFailure, PeerFailure, RunLogError
from .evaluate import compute_embeddings, evaluate_embeddings, raise_batch_errors, text_encoder_fn
from .feature_cache import cached_feature_loader
from .loaders import build_eval_loader, build_loader, loader_failure
from .model import ChestCTCLIP, load_weights, run_checkpoint
from .resume import RESUME_MUST_MATCH, check_config_drift, csv_step, jsonl_step, resumed_config, truncate_log
from .runlog import FILE_ONLY, MetricsLogger, bars, format_table, plain_lines, tqdm_disable
from .runtime import rng_state, set_rng_state
from .step import TrainStep
from .tables import Table, table_fingerprint

log = logging.getLogger("ct_siglip")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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
        self.train_loader = build_loader(cfg, self.train_set, self.sampler, tokenizer, cfg.batch_size, device)
        self.val_loader = None
        if val_table is not None:
            self.val_loader, _ = build_eval_loader(
                cfg, val_table, tokenizer, world_size=world_size, rank=rank, device=device
            )
        self.stepper = TrainStep(model, cfg, device=device, world_size=world_size, forward_model=self.forward_model)
        # The step's own objects, under the names a checkpoint and its readers use.
        self.optimizer, self.scheduler, self.scaler = (
            self.stepper.optimizer,
            self.stepper.scheduler,
            self.stepper.scaler,
        )
        self.precision, self.autocast = self.stepper.precision, self.stepper.autocast
        self.metrics = MetricsLogger.for_run(cfg, enabled=self.is_main)
        self.watchdog = Watchdog(0)  # replaced by an active one while train() runs
        self.step = 0
        self.best: float | None = None
        self.bad_samples = 0
        self.skipped_steps = 0
        self.stop_signal: int | None = None
        self._new_bad: list[dict] = []  # bad-sample notes since the last step, not yet shared across ranks
        self._fetching = self._worker_exited = False  # see `_defer_worker_errors`
        self._sigchld_previous = None
        self._log_error: RunLogError | None = None  # see `_log`
        self.show_bars, self.plain_lines = bars(cfg.progress), self.is_main and plain_lines(cfg.progress)
        self._last_line = self._start_time = time.monotonic()
        self._start_step = 0

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint. Collective under torchrun (every rank's RNG state is gathered): call on all ranks."""
        return {
            "model": self.model.state_dict(),
            **self.stepper.state_dict(),  # optimizer, scheduler, scaler
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

    def load_state_dict(self, state: dict, source: str | Path = "checkpoint") -> None:
        load_weights(self.model, state["model"], source, "--resume")
        self.stepper.load_state_dict(state)
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
        path, damaged = None, []
        if self.is_main:  # one rank hashes the candidates; the others load what it chose
            path = ckpt.find_latest(self.run_dir) if self.cfg.resume == "auto" else Path(self.cfg.resume)
            if path is None:
                damaged = [f"{p.name}: {ckpt.verify_checkpoint(p)}" for p in ckpt.list_checkpoints(self.run_dir)]
        path, damaged = broadcast_object((path, damaged))
        if path is None and damaged:  # starting over would silently throw away (and re-log) what was trained
            raise ckpt.CheckpointError(
                f"--resume auto: {self.run_dir} holds {len(damaged)} checkpoints but none is intact "
                f"({'; '.join(damaged[-3:])}). Pass --resume PATH of an intact copy, or move them out of "
                "--save_dir to start again from step 0"
            )
        if path is None:
            log.info("--resume auto: no complete checkpoint in %s, starting from scratch", self.run_dir)
            self._truncate_logs()  # what a run killed before its first checkpoint logged is logged again now
            return
        # find_latest has just hashed it; an explicit path is checked here (by one rank: the file is shared).
        state = ckpt.load_checkpoint(path, verify=self.is_main and self.cfg.resume != "auto")
        state = run_checkpoint(state, path, "--resume")
        check_config_drift(state, self.identity(), allow=self.cfg.allow_config_change)
        self.load_state_dict(state, path)
        self.cfg, applied, ignored = resumed_config(state["config"], self.cfg)
        if applied:
            self.stepper.apply_schedule(self.cfg)
            log.warning(
                "resuming with new training settings, applied from step %d: %s", self.step + 1, "; ".join(applied)
            )
        if ignored and self.is_main:  # the checkpoint's weights hold what these set; config.json says what was kept
            log.warning("not applied on resume (the checkpoint's weights hold them): %s", "; ".join(ignored))
            self.cfg.save(self.run_dir / "config.json")
        self._truncate_logs()
        log.info("Resumed from %s at step %d", path, self.step)

    def _truncate_logs(self) -> None:
        """Drop the log records of steps after `self.step` (and torn last lines): each step is logged once."""
        if self.is_main:
            truncate_log(self.run_dir / "metrics.jsonl", self.step, jsonl_step)
            truncate_log(self.run_dir / "bad_samples.csv", self.step, csv_step)
            self.metrics.purge_after(self.step)
        barrier()

    def identity(self) -> dict:
        """What a checkpoint must share with this run to be continued by it (see `check_config_drift`)."""
        cfg = asdict(self.cfg)
        return {
            "config": {k: cfg[k] for k in RESUME_MUST_MATCH},
            "global_batch": self.global_batch,
            "data_sha256": self.data_fingerprint,
        }

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over the global batch (see `TrainStep`); returns its loss and gradient norm."""
        return self.stepper(micro_batches)

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
        fault: Exception | None = self._log_error
        micro: list[dict] = []
        if fault is None:
            try:
                micro = next(data)
            except (DataError, LoaderFailure) as e:
                fault = e
        status = gather_ints([fault is not None, self.stop_signal or 0, len(self._new_bad)], self.device)
        if any(s[2] for s in status):
            fault = self._record_bad_samples() or fault
        if fault is not None or any(s[0] for s in status):
            self._stop_on_fault(fault)
        if signum := max(s[1] for s in status):
            self._stop_on_signal(signum)
        return micro

    def _stop_on_fault(self, fault: Exception | None) -> None:
        """Some rank failed (`fault` is this rank's error, or None): all save the step reached, then stop."""
        messages = all_gather_objects(None if fault is None else str(fault))
        if self.step > 0:  # keep what was trained
            self.save()
        if fault is not None:
            raise fault
        rank, msg = next((r, m) for r, m in enumerate(messages) if m)
        raise PeerFailure(f"rank {rank} stopped the run: {msg}")

    def _stop_on_signal(self, signum: int) -> None:
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
        limit = self.cfg.max_bad_fraction
        # 1.0 means never: replacements that are bad too count as bad draws, so the count can exceed `seen`
        if limit < 1.0 and self.bad_samples > limit * max(seen, len(self.train_set)):
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
                scores: dict = {}  # per label, for the ROC picture of the last validation (ct_siglip.plots)
                encode = text_encoder_fn(self.model, self.device, self.autocast)
                metrics = evaluate_embeddings(emb, labels=labels, encode_text=encode, scores_out=scores)
                if scores:
                    np.savez(self.run_dir / "zeroshot_val.npz", **scores)
                self._log(metrics)
                log.info(format_table(metrics, title=f"Validation at step {self.step}"))
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
            show = self.show_bars if self.is_main else False
            emb = compute_embeddings(self.model, self.val_loader, self.device, self.precision, progress=show)
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
        show = self.show_bars if self.is_main else False
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=tqdm_disable(show), dynamic_ncols=True)
        self._start_step, self._start_time = self.step, time.monotonic()
        self.watchdog = Watchdog(cfg.watchdog_timeout, describe=lambda: f"rank {self.rank}, at step {self.step + 1}")
        try:
            with self._signal_handlers(), self.watchdog:
                last_val = self._loop(data, bar)
                bar.close()
                if not last_val or self.step % max(cfg.eval_interval, 1) != 0:
                    last_val = self.validate()
            if self._log_error is not None:  # at the last step or after it: the checkpoint is written
                raise self._log_error
        finally:
            bar.close()  # also on an error: the message that follows starts on a line of its own
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
            self._heartbeat(out)
            if not out["finite"]:
                self._on_nonfinite(out)
            if cfg.log_sample_ids:
                ids = torch.cat([b["index"] for b in micro]).to(self.device)
                self._log({"train/sample_ids": torch.cat(all_gather_tensors(ids)).tolist()})
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t0
                self._log_train(out, samples / max(elapsed, 1e-9))
                t0, samples = time.perf_counter(), 0
            if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                last_val = self.validate()
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                self.save()
        return last_val

    def _log(self, metrics: dict) -> None:
        """A metrics record of this step. A write that fails (disk full) does not stop the step half-way: it
        becomes this rank's fault, which the next step's agreement turns into a save and a stop on every rank."""
        try:
            self.metrics.log(self.step, metrics)
        except RunLogError as e:
            self._log_error = self._log_error or e

    def _on_nonfinite(self, out: dict) -> None:
        self.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss or gradient (loss %s, gradient norm %s); step skipped, %d in a row",
            self.step,
            out["loss"],
            out["grad_norm"],
            self.stepper.bad_steps_in_row,
        )
        self._log({"train/skipped_steps": self.skipped_steps})
        if self.stepper.bad_steps_in_row >= self.cfg.max_bad_steps:
            self.save()
            msg = (
                f"error: {self.stepper.bad_steps_in_row} non-finite steps in a row (--max_bad_steps); saved step "
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
        self._log(metrics)
        if self.is_main:
            log.info("Step %d: Loss = %.4f, LR = %.2e%s", self.step, out["loss"], lr, self._progress(throughput))

    def _progress(self, throughput: float | None = None) -> str:
        """`--progress lines`: where the run is, for a log file that has no progress bar."""
        if not self.plain_lines:
            return ""
        self._last_line = time.monotonic()
        done = self.step - self._start_step
        rate = done / max(time.monotonic() - self._start_time, 1e-9)
        eta = (self.cfg.max_steps - self.step) / rate if rate > 0 else float("inf")
        speed = f", {throughput:.1f} samples/s" if throughput is not None else ""
        return f" ({self.step}/{self.cfg.max_steps}{speed}, ETA {_duration(eta)})"

    def _heartbeat(self, out: dict) -> None:
        """With plain lines, a line at least every 60 s, so a slow run's log shows it is alive."""
        if self.plain_lines and time.monotonic() - self._last_line > 60:
            log.info("Step %d: Loss = %.4f%s", self.step, out["loss"], self._progress())

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


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
