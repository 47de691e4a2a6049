"""Running rows: what a row is, the shared context (device, loaded text tower, results), the timing loop, and the
random real-size text model the text rows load.

A row's `run(ctx)` builds what it needs and returns a `Measurement`; `execute` turns any failure, out of memory
included, into the record's `error`, so one configuration never stops the others.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SECTIONS = ("baseline", "image", "text", "whole", "heads", "data")
EMBED_DIM = 512
# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_1B = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}  # fmt: skip
TINY_LLAMA = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 1000}


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Row:
    """One configuration: `run(ctx)` builds what it needs and returns a Measurement (or raises)."""

    section: str
    name: str  # stable id, e.g. "image.stage.cl.bf16"
    label: str  # the table's description
    batch: int | None
    unit: str
    run: Callable[[Context], Measurement]
    settings: dict[str, Any] = field(default_factory=dict)
    text_key: tuple[str, str] | None = None  # (train mode, weight dtype) of the text tower it needs loaded
    estimate_s: float = 0.0  # for --time_budget: rows known to be long (compilation)


@dataclass
class Measurement:
    value: float
    step_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


class Context:
    """What the rows share: arguments, device, the loaded text tower, results so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        name = args.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.results: list[dict] = []
        self.start = time.perf_counter()
        self.text_key: tuple[str, str] | None = None
        self.text_encoder = None
        self.text_folder: Path | None = None
        self.data_files: dict | None = None
        self.data_error: str | None = None

    # -- device helpers ------------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def precision(self, precision: str) -> str:
        """The precision a row really runs in. On a CPU half-precision 3D convolutions are emulated and 10-20x
        slower than float32, so CPU runs (the tiny test) use float32."""
        return precision if self.cuda else "fp32"

    def build(self) -> contextlib.AbstractContextManager:
        """Create modules directly on the GPU: random init of 117M parameters on the host costs seconds."""
        return torch.device(self.device) if self.cuda else contextlib.nullcontext()

    def measure(
        self, step: Callable[[], Any], items: int, *, warmup: int | None = None, steps: int | None = None
    ) -> Measurement:
        """Median of `steps` timed steps after `warmup` untimed ones; device synchronised around each step."""
        warmup = self.args.warmup if warmup is None else warmup
        steps = self.args.steps if steps is None else steps

        def timed() -> float:
            self.sync()
            t = time.perf_counter()
            step()
            self.sync()
            return time.perf_counter() - t

        first = timed() if warmup > 0 else None
        for _ in range(warmup - 1):
            timed()
        times = [timed() for _ in range(steps)]
        median = statistics.median(times)
        return Measurement(items / median, median, [round(t, 5) for t in times], times[0] if first is None else first)

    # -- text tower ----------------------------------------------------------------------------------------------
    def text(self, key: tuple[str, str]):
        """The TextEncoder for (mode, dtype), loaded through its real code path; one kept at a time."""
        if self.text_key == key:
            return self.text_encoder, 0.0
        self.drop_text()
        from ct_siglip.text_tower import TextEncoder

        folder = ensure_text_model(self)
        mode, dtype = key
        t = time.perf_counter()
        enc = TextEncoder(str(folder), train_mode=mode, max_length=self.args.text_tokens, embed_dim=EMBED_DIM,
                          torch_dtype=getattr(torch, dtype) if dtype != "float32" else None,
                          gradient_checkpointing=True)  # fmt: skip
        enc.to(self.device)
        self.text_encoder, self.text_key = enc, key
        return enc, time.perf_counter() - t

    def drop_text(self) -> None:
        if self.text_encoder is not None:
            self.text_encoder, self.text_key = None, None
            self.cleanup()

    def result(self, name: str, batch: int | None = None) -> dict | None:
        for r in self.results:
            if r["name"] == name and (batch is None or r["batch"] == batch) and r["error"] is None:
                return r
        return None


# ---------------------------------------------------------------------------------------------------- text model
def ensure_text_model(ctx: Context) -> Path:
    """A random Llama folder loadable by llm2vec: real 1B shape, or the tiny one with --tiny. Reused if present."""
    if ctx.text_folder is not None:
        return ctx.text_folder
    from ct_siglip.tiny_models import build_tiny_llama

    args = ctx.args
    spec = {"tiny": TINY_LLAMA} if args.tiny else {"llama": LLAMA_1B, "dtype": "bfloat16", "seed": 0}
    folder = args.work_dir / ("tiny-llama" if args.tiny else "llama-3.2-1b-shape-random")
    marker = folder / "bench_model.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(spec)):
        ctx.text_folder = folder
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.tiny:
        build_tiny_llama(tmp, **{k: v for k, v in TINY_LLAMA.items()})
    else:
        # The tokenizer only has to load: inputs are random ids over the model's full vocabulary.
        build_tiny_llama(tmp / "tokenizer", hidden_size=32, num_layers=1, num_heads=4, vocab_size=1000)
        for f in (tmp / "tokenizer").iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                shutil.move(str(f), tmp / f.name)
        shutil.rmtree(tmp / "tokenizer")
        from transformers import AutoTokenizer, LlamaConfig, LlamaModel

        tok = AutoTokenizer.from_pretrained(tmp)
        config = LlamaConfig(**LLAMA_1B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             initializer_range=0.02, torch_dtype="bfloat16")  # fmt: skip
        with torch.random.fork_rng(devices=[]), ctx.build():
            torch.manual_seed(0)
            model = LlamaModel(config).to(torch.bfloat16)  # initialised on the GPU: seconds, not minutes
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        del model
        ctx.cleanup()
    (tmp / "bench_model.json").write_text(json.dumps(spec))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    ctx.text_folder = folder
    return folder


# ---------------------------------------------------------------------------------------------------- running
def environment(ctx: Context) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    device = torch.cuda.get_device_name(ctx.device) if ctx.cuda else (platform.processor() or platform.machine())
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _transformers_version() or ver("transformers"),
        "versions": {"cudnn": torch.backends.cudnn.version() if ctx.cuda else None, "llm2vec": ver("llm2vec"),
                     "peft": ver("peft"), "numpy": np.__version__, "python": platform.python_version(),
                     "cpus": cpus(), "host": platform.node()},
    }  # fmt: skip


def _transformers_version() -> str | None:
    """The imported module's version: the one a --target install on PYTHONPATH shadows the system's with."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def speedup(ctx: Context, row: Row, value: float) -> tuple[float | None, str | None]:
    """Against the baseline row that answers the same question: image and whole rows against Merlin as shipped
    (whole rows against the original trainer equivalent), text rows against the baseline text row."""
    ref_name = {"image": "baseline.image", "whole": "baseline.original_trainer", "text": "baseline.text_full_bf16"}.get(
        row.section
    )
    if ref_name is None:
        return None, None
    ref = ctx.result(ref_name, row.batch if row.section == "text" else None)
    if ref is None or not ref["value"]:
        return None, None
    return round(value / ref["value"], 3), ref_name


def execute(ctx: Context, row: Row, common: dict[str, Any]) -> dict:
    """Run one row; any failure (OOM included) becomes the record's `error` and the run goes on."""
    record = {
        **common,
        "section": row.section,
        "name": row.name,
        "label": row.label,
        "batch": row.batch,
        "settings": dict(row.settings),
        "value": None,
        "unit": row.unit,
        "peak_gib": None,
        "speedup": None,
        "speedup_vs": None,
        "step_s": None,
        "times_s": None,
        "first_step_s": None,
        "error": None,
        "oom": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    elapsed = time.perf_counter() - ctx.start
    if ctx.args.time_budget and elapsed + row.estimate_s > ctx.args.time_budget:
        record["error"] = f"skipped: --time_budget {ctx.args.time_budget:g} s (at {elapsed:.0f} s)"
        return record
    if row.text_key != ctx.text_key:
        ctx.drop_text()  # only one text tower on the device at a time: peaks stay per configuration
    ctx.reset_peak()
    t = time.perf_counter()
    error = None
    try:
        m = row.run(ctx)
    except torch.OutOfMemoryError as e:
        error, record["oom"] = f"OOM: {first_line(e)}", True
    except Exception as e:  # one failing configuration must not stop the others
        oom = any(m in str(e).lower() for m in ("out of memory", "alloc_failed"))  # cuDNN's workspace OOM too
        error, record["oom"] = f"{'OOM: ' if oom else ''}{type(e).__name__}: {first_line(e)}", oom
        if not oom:
            record["traceback"] = traceback.format_exc(limit=-4)
    else:
        record.update(value=m.value, step_s=m.step_s, times_s=m.times_s or None, first_step_s=m.first_step_s)
        record["settings"].update(m.settings)
        record["speedup"], record["speedup_vs"] = speedup(ctx, row, m.value)
    record["error"] = error
    record["peak_gib"] = round(ctx.peak_gib(), 2) if ctx.cuda else None
    record["wall_s"] = round(time.perf_counter() - t, 2)
    if error is not None:
        ctx.drop_text()  # a failed row may leave the text tower in an unknown state
    ctx.cleanup()
    return record


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
