"""Run outputs: the console and `train.log`, metrics to `metrics.jsonl` and TensorBoard (rank 0 only), tables."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
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

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.use_tb = enabled and tensorboard
        self.tb = None
        self.purge_step: int | None = None

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
        return self.tb

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self._append(json.dumps(record) + "\n", step)
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
