"""A run's data, from its Config: the tables of each split and the DataLoaders over them.

Shared by the trainer and the evaluation CLI, so both read a split the same way (columns, placeholder
reports, bad-row policy) and evaluation sees the same items whoever runs it.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .config import Config
from .data import Collator, CTReportDataset, EvalSampler, ignore_stop_signals
from .errors import DataError, LoaderFailure
from .tables import Table, read_csv_table, read_directory_table, rows_text


def load_table(cfg: Config, split: str, *, train: bool) -> Table | None:
    """The rows of `split` (CSV mode) or of the training / validation folder (directory mode), or None.

    A split in which more than `--max_missing_reports` of the rows have no report stops here: a reports file
    keyed the wrong way, or the wrong column, would otherwise train a CLIP model on the placeholder text alone.
    """
    table = _read_table(cfg, split, train=train)
    if table is not None and table.missing_reports > cfg.max_missing_reports * len(table):
        raise DataError(
            f"{table.missing_reports} of {len(table)} {'training' if train else 'evaluation'} rows have no report "
            f"(above --max_missing_reports {cfg.max_missing_reports:g}; {rows_text(table.missing_report_rows)}): "
            f"{table.report_source}",
            path=table.source,
            hint="fix the reports, or raise --max_missing_reports to train with the placeholder text",
        )
    return table


def _read_table(cfg: Config, split: str, *, train: bool) -> Table | None:
    if cfg.csv_file:
        if not split:
            return None
        # Rows the run will not use are named once, when the training split is read.
        known = (cfg.train_split, cfg.val_split) if train else ()
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


def build_loader(cfg: Config, dataset, sampler, tokenizer, batch_size: int, device: torch.device) -> DataLoader:
    """The DataLoader settings of every training and evaluation loader of a run."""
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
    cfg: Config,
    split: str | Table,
    tokenizer,
    *,
    world_size: int = 1,
    rank: int = 0,
    device: torch.device | None = None,
) -> tuple[DataLoader, Table]:
    """An evaluation loader over `split` (a split name, or a table already read), this rank's shard."""
    table = load_table(cfg, split, train=False) if isinstance(split, str) else split
    ds = eval_dataset(cfg, table)
    loader = build_loader(
        cfg,
        ds,
        EvalSampler(len(ds), world_size, rank),
        tokenizer,
        cfg.eval_batch_size or cfg.batch_size,
        device or torch.device("cpu"),
    )
    return loader, table
