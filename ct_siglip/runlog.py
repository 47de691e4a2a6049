"""Run outputs: the console and `train.log`, metrics to `metrics.jsonl` and TensorBoard (rank 0 only), tables."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import RunLogError

FILE_ONLY = {"file_only": True}  # `extra=` for a record the console already shows (on stderr)


def bars(mode: str) -> bool | None:
    """`--progress` -> tqdm bars shown (True), hidden (False) or, for `auto`, shown on a terminal only (None)."""
    return {"bar": True, "lines": False, "none": False}.get(mode)


def plain_lines(mode: str) -> bool:
    """Whether `--progress` asks for plain progress lines: `lines`, or `auto` when stderr is not a terminal (a
    batch job's log file, where carriage-return bars would pile up)."""
    return mode == "lines" or (mode == "auto" and not sys.stderr.isatty())


def tqdm_disable(show: bool | None) -> bool | None:
    """tqdm's `disable` for a tri-state `show` (None: tqdm's own rule, hidden when the stream is no terminal)."""
    return None if show is None else not show


class _Console(logging.StreamHandler):
    """The console: through `tqdm.write`, so a message never lands in the middle of a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class _FileHandler(logging.FileHandler):
    """`train.log`: a write that fails (disk full) is said once on the console, not as a traceback per message."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            print(f"warning: cannot write {self.baseFilename}; the console keeps every message", file=sys.stderr)


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Messages to the console (rank 0 at INFO, other ranks warnings only) and to `run_dir/train.log`, which so
    holds what the console shows: the step lines, the validation tables, the warnings."""
    console = _Console(sys.stdout)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [console]
    if run_dir is not None and is_main:
        handlers.append(_FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(message)s", handlers=handlers, force=True
    )


class MetricsLogger:
    """Appends one JSON object per event (`{"step": N, "time": ..., name: value...}`) and mirrors
    scalars to TensorBoard. Appending keeps the history of a resumed run in one file."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        jsonl: bool = True,
        wandb: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.use_tb, self.use_jsonl = enabled and tensorboard, jsonl
        self.tb = None
        self.purge_step: int | None = None
        self.wandb_settings, self.wandb_run = (wandb if enabled else None), None
        self.hparams = hparams

    @classmethod
    def for_run(cls, cfg, *, enabled: bool) -> MetricsLogger:
        """The sinks a training run's `--report_to` names, with its settings as hyperparameters."""
        targets = cfg.reporters()
        wandb = None
        if "wandb" in targets:
            name = cfg.run_name or Path(cfg.save_dir).resolve().name
            wandb = {"project": cfg.wandb_project, "entity": cfg.wandb_entity, "name": name}
        return cls(cfg.save_dir, enabled=enabled, tensorboard="tensorboard" in targets, jsonl="jsonl" in targets,
                   wandb=wandb, hparams=dataclasses.asdict(cfg))  # fmt: skip

    def purge_after(self, step: int) -> None:
        """On resume: TensorBoard hides the events a killed run logged after its checkpoint's `step`
        (metrics.jsonl is truncated by the trainer)."""
        self.purge_step = step + 1

    def _writer(self):
        if self.tb is None and self.use_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.purge_step)
            except ImportError:  # tensorboard is optional at run time
                self.use_tb = False
            else:
                if self.hparams:
                    _write_hparams(self.tb, self.hparams)
        return self.tb

    def _wandb(self):
        """The Weights & Biases run, started on the first record; its id is kept in the run folder, so a resumed
        run continues the same wandb run."""
        if self.wandb_run is None and self.wandb_settings is not None:
            import wandb

            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            s = self.wandb_settings
            self.wandb_run = wandb.init(project=s["project"], entity=s["entity"], name=s["name"], id=run_id,
                                        resume="allow", dir=str(self.run_dir), config=self.hparams)  # fmt: skip
        return self.wandb_run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self.use_jsonl:
            self._append(json.dumps(record) + "\n", step)
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        if (run := self._wandb()) is not None:
            run.log(scalars, step=int(step))
        tb = self._writer()
        if tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(k, v, step)
            tb.flush()

    def _append(self, line: str, step: int) -> None:
        """One whole line or none: a write that fails (disk full) is cut back to the previous line's end."""
        data = line.encode()
        try:
            with open(self.path, "ab") as f:
                end = f.tell()
                try:
                    f.write(data)
                    f.flush()
                except OSError:
                    f.truncate(end)
                    raise
        except OSError as e:
            raise RunLogError(
                f"could not write {self.path} at step {step} ({e.strerror or e}); its earlier records are intact. "
                "Free disk space or fix permissions, then rerun with --resume auto"
            ) from None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _write_hparams(writer, hparams: dict[str, Any]) -> None:
    """The run's settings in TensorBoard's HPARAMS tab, in the run's own event file (`add_hparams` would start
    another one)."""
    from torch.utils.tensorboard.summary import hparams as summary

    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
    for part in summary(values, {}):
        writer._get_file_writer().add_summary(part)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null means "undefined" (e.g. AUROC of a one-class label)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_table(metrics: dict[str, Any], title: str = "Validation") -> str:
    """A small two-column table for the console."""
    rows = [
        (
            k,
            "n/a"
            if v is None or (isinstance(v, float) and not math.isfinite(v))
            else (f"{v:.4f}" if isinstance(v, float) else str(v)),
        )
        for k, v in metrics.items()
    ]
    width = max([len(k) for k, _ in rows] + [len(title)])
    vwidth = max([len(v) for _, v in rows] + [6])
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [line, f"| {title.ljust(width)} | {'value'.rjust(vwidth)} |", line]
    out += [f"| {k.ljust(width)} | {v.rjust(vwidth)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)
