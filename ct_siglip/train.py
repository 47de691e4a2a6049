"""The training command: `python siglip_trainer.py ...` (also `ct-siglip-train`, `python -m ct_siglip.train`).

`main(argv)` parses the flags into one Config; `run(cfg)` sets up the process (device, torchrun, logging,
seeds), reads and checks the data, builds the model and hands everything to `SigLIPTrainer.train()`.
Errors a user can fix end here as one line and an exit status (see `main`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, parse_config
from .distributed import init_distributed, shutdown_distributed
from .errors import ConfigError, DataError, LoaderFailure, PeerFailure, RunLogError
from .loaders import load_table
from .model import ChestCTCLIP, build_model, count_parameters, init_from
from .plots import write_run_plots
from .preflight import preflight_tables
from .runlog import FILE_ONLY, setup_logging
from .runtime import resolve_device, seed_everything
from .tables import Table, rows_text
from .trainer import SigLIPTrainer

log = logging.getLogger("ct_siglip")


def run(cfg: Config) -> dict[str, float]:
    """Build everything from a resolved config and train; returns the final validation metrics."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: this machine has no CUDA GPU that torch can use; pass --device cpu")
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
    if "wandb" in cfg.reporters():
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--report_to wandb: the wandb package is not installed; pip install wandb") from None
    if cfg.warmup_steps >= cfg.max_steps:
        log.warning(
            "--warmup_steps %d >= --max_steps %d: the learning rate never finishes its warm-up (lower --warmup_steps)",
            cfg.warmup_steps,
            cfg.max_steps,
        )
    train_table, val_table = load_data(cfg, run_dir, rank, world_size)
    if rank == 0:
        cfg.save(run_dir / "config.json")
        ckpt.remove_stale_temps(run_dir)
    model, ddp_model = setup_model(cfg, device, rank, world_size)
    trainer = SigLIPTrainer(
        cfg, model, train_table, val_table, device=device, rank=rank, world_size=world_size, ddp_model=ddp_model
    )
    log.info("Starting training...")
    metrics = trainer.train()
    if rank == 0 and metrics is not None:
        try:  # pictures are a convenience: a missing font or a full disk must not fail a finished run
            for path in write_run_plots(run_dir):
                log.info("Plot: %s", path)
        except Exception as e:
            log.warning(
                "could not draw the run's plots (%s); python -m ct_siglip.plots %s draws them later", e, run_dir
            )
    return metrics


def load_data(cfg: Config, run_dir: Path, rank: int, world_size: int) -> tuple[Table, Table | None]:
    """The training and validation tables, announced on the console and checked file by file (`--preflight`)."""
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
        train_table, val_table = preflight_tables(cfg, train_table, val_table, run_dir, rank, world_size)
    return train_table, val_table


def setup_model(cfg: Config, device: torch.device, rank: int, world_size: int) -> tuple[ChestCTCLIP, nn.Module | None]:
    """The model (weights from `--init_from` if given) and, under torchrun, its DDP wrapper."""
    log.info("Creating model...")
    text_dtype = torch.bfloat16 if device.type == "cuda" and cfg.text_train in ("lora", "frozen") else None
    model = build_model(cfg, device=device, rank=rank, world_size=world_size, text_dtype=text_dtype)
    if cfg.init_from:
        init_from(model, cfg.init_from)
        log.info("Initialised model weights from %s (fresh optimizer and schedule)", cfg.init_from)
    total, trainable = count_parameters(model)
    log.info("Total parameters: %s", f"{total:,}")
    log.info("Trainable parameters: %s", f"{trainable:,}")
    if world_size == 1:
        return model, None
    # t' and b are used by the loss outside DDP's forward; the trainer averages their gradients itself.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [n for n, _ in model.loss_fn.named_parameters(prefix="loss_fn")]
    )
    ddp_model = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
    )
    return model, ddp_model


def probe_writable(run_dir: Path) -> None:
    """Fail before any work when `--save_dir` cannot hold a checkpoint."""
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
    try:
        if cfg.demo:
            from .demo import demo_config

            cfg = demo_config(cfg, argv)
        metrics = run(cfg)
    except (DataError, ConfigError, ckpt.CheckpointError) as e:
        log.error("error: %s", e, extra=FILE_ONLY)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (LoaderFailure, PeerFailure, RunLogError) as e:
        log.error("error: %s", e, extra=FILE_ONLY)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.demo and metrics:
        from .demo import print_demo_summary

        print_demo_summary(cfg, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
