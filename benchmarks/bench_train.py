"""Training-throughput benchmark of ct_siglip on one GPU: image tower, text tower, whole step, heads, data.

Builds the real-size towers with random weights (no download: Merlin's I3ResNet-152 and a Llama-3.2-1B-shaped
LLM2Vec model written once to `--work_dir`), then times each configuration after warm-up with the device
synchronised around every step: median step time -> volumes (or samples) per second, and peak allocated memory
from a reset at the start of the configuration (so model, optimizer state and activations all count).

    python benchmarks/bench_train.py                      # everything, an estimated 4-5 minutes on an H100
    python benchmarks/bench_train.py --only image,whole   # some sections
    python benchmarks/bench_train.py --tiny --device cpu  # tiny sizes, seconds on a CPU (the test)
    python benchmarks/bench_train.py --report benchmarks/results.jsonl   # Markdown table of the last run

Every row is appended to `--out` as one JSON line as soon as it is measured, so a run that is cut short keeps
what it finished. A configuration that fails (CUDA out of memory included) is recorded with its error and the
run goes on. See benchmarks/README.md for what each row measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/bench_train.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ct_siglip.image_tower import ImageEncoder  # noqa: E402
from ct_siglip.loss import SigLIPLoss  # noqa: E402
from ct_siglip.model import ChestCTCLIP  # noqa: E402

SECTIONS = ("baseline", "image", "text", "whole", "heads", "data")
EMBED_DIM = 512
DEFAULT_OUT = Path(__file__).resolve().parent / "results.jsonl"
# The trainer's optimizer settings (ct_siglip.trainer.build_optimizer); the values do not change the timing.
ADAMW = {"lr": 1e-4, "betas": (0.9, 0.98), "eps": 1e-6}
WEIGHT_DECAY = 1e-4
GRAD_CLIP = 1.0
# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), random weights.
LLAMA_1B = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}  # fmt: skip
TINY_LLAMA = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 1000}
_FRESH_REPORTS = itertools.count(1)  # text hashes never seen before: batch * n + row, n >= 1 (cached rows use 0..B-1)
DATA_FORMAT_VERSION = 1  # bump when the synthetic volumes change, so cached files are rewritten


# ---------------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections: {','.join(SECTIONS)} (default: all), or compile (the --compile rows alone)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny sizes (depth 14 width 8, 2x16x32x32, 2-layer Llama)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="volume size (default 192 256 256)")
    p.add_argument("--in_channels", type=int, default=2, help="C of the image rows (the baseline uses 1)")
    p.add_argument("--image_batches", type=_ints, default=[4, 8], help="batches of the image grid")
    p.add_argument("--stage_batch", type=int, default=16, help="extra batch for stage checkpointing (0: none)")
    p.add_argument("--baseline_batch", type=int, default=4)
    p.add_argument("--text_batches", type=_ints, default=[4, 32])
    p.add_argument("--text_modes", default="full,lora,frozen", help="text tower modes to time")
    p.add_argument("--text_tokens", type=int, help="tokens per report (default 512)")
    p.add_argument("--text_pad", type=int, help="left-padding tokens per row (default 100)")
    p.add_argument("--whole_batches", type=_ints, default=[4, 8])
    p.add_argument("--heads_batches", type=_ints, default=[256, 1024])
    p.add_argument("--cache_batch", type=int, default=8, help="batch of the frozen-backbone (cache building) row")
    p.add_argument("--compile", action="store_true", help="add torch.compile image rows (first step ~2 min each)")
    p.add_argument("--compile_batches", type=_ints, default=[4])
    p.add_argument("--volumes", type=int, help="data: files per format (default 32)")
    p.add_argument("--unique_volumes", type=int, help="data: distinct phantoms among them (default 4)")
    p.add_argument("--workers", type=int, help="data: loader processes (default min(16, CPUs))")
    p.add_argument("--data_passes", type=int, default=2, help="data: timed passes over the files with workers")
    p.add_argument(
        "--work_dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ct_siglip_bench",
        help="random text model and data files (reused when present)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines appended here")
    p.add_argument(
        "--time_budget",
        type=float,
        default=0.0,
        help="seconds; rows that would start after it are recorded as skipped (0: no limit)",
    )
    p.add_argument("--cpu_threads", type=int, help="torch threads (default: 1 with --tiny, else unchanged)")
    p.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    p.add_argument("--report", type=Path, metavar="JSONL", help="only print the Markdown table of a results file")
    p.add_argument("--run_id", help="with --report: which run (default: the last one in the file)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - {*SECTIONS, "compile"})
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)}, compile)")
    args.text_modes = [m.strip() for m in args.text_modes.split(",") if m.strip()]
    if bad := sorted(set(args.text_modes) - {"full", "lora", "frozen"}):
        p.error(f"--text_modes: unknown {', '.join(bad)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    tiny = args.tiny
    args.shape = tuple(args.shape or ((16, 32, 32) if tiny else (192, 256, 256)))
    args.text_tokens = args.text_tokens or (32 if tiny else 512)
    args.text_pad = args.text_pad if args.text_pad is not None else (6 if tiny else 100)
    if not 0 <= args.text_pad < args.text_tokens - 1:
        p.error("--text_pad must leave at least two real tokens")
    args.volumes = args.volumes or (4 if tiny else 32)
    args.unique_volumes = min(args.unique_volumes or (2 if tiny else 4), args.volumes)
    args.workers = args.workers or (2 if tiny else min(16, _cpus()))
    args.depth, args.width = (14, 8) if tiny else (152, 64)
    return args


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------- rows
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

    def amp(self, precision: str) -> tuple[Callable[[], contextlib.AbstractContextManager], str]:
        """Autocast factory and the precision actually used. On a CPU half-precision 3D convolutions are
        emulated and 10-20x slower than float32, so CPU runs (the tiny test) use float32."""
        if precision == "fp32" or not self.cuda:
            return contextlib.nullcontext, "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        return (lambda: torch.autocast(self.device.type, dtype=dtype)), precision

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


# ---------------------------------------------------------------------------------------------------- steps
def adamw(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """The trainer's AdamW: decay on matrices and kernels only; fused kernels on a GPU when asked."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.startswith("loss_fn.") else decay).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **ADAMW, fused=fused or None)


def train_step(
    loss_of: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[], torch.Tensor]:
    """The trainer's step: autocast forward, fp32 loss, (scaled) backward, unscale, clip, step, zero_grad."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> torch.Tensor:
        with autocast():
            loss = loss_of()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def unit_rows(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return F.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1).to(device)


def random_volumes(ctx: Context, batch: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Uniform [0, 1) volumes on the device, in the dtype the trainer feeds (`move_batch` casts on the device)."""
    if not ctx.cuda:
        dtype = torch.float32
    return torch.rand(batch, channels, *ctx.args.shape, device=ctx.device).to(dtype)


def text_batch(ctx: Context, batch: int, vocab: int, hashes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random token ids, left-padded like `TextTokenizer` output: `pad` pad tokens, BOS, then report tokens
    (the embed mask covers the report tokens only)."""
    length, pad = ctx.args.text_tokens, ctx.args.text_pad
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(8, vocab, (batch, length), generator=g)
    ids[:, :pad] = 1
    ids[:, pad] = 0
    attention = torch.zeros(batch, length, dtype=torch.long)
    attention[:, pad:] = 1
    embed = attention.clone()
    embed[:, pad] = 0
    out = {"input_ids": ids, "attention_mask": attention, "embed_mask": embed}
    out["text_hash"] = torch.arange(batch, dtype=torch.int64) if hashes is None else hashes
    return {k: v.to(ctx.device) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- image
def image_row(
    ctx: Context,
    section: str,
    name: str,
    label: str,
    *,
    batch: int,
    channels: int,
    checkpointing: str,
    channels_last: bool,
    precision: str,
    fused: bool,
    cudnn_benchmark: bool,
    compile: bool = False,
    freeze_stem: bool = False,
) -> Row:
    args = ctx.args
    settings = {"in_channels": channels, "shape_dhw": list(args.shape), "depth": args.depth, "width": args.width,
                "checkpointing": checkpointing, "channels_last": channels_last, "precision": precision,
                "freeze_stem": freeze_stem,
                "grad_scaler": precision == "fp16", "optimizer": "AdamW fused" if fused else "AdamW foreach",
                "cudnn_benchmark": cudnn_benchmark, "compile": compile, "grad_clip": GRAD_CLIP}  # fmt: skip

    def run(ctx: Context) -> Measurement:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        autocast, used = ctx.amp(precision)
        with ctx.build():
            enc = ImageEncoder(
                in_channels=channels,
                depth=args.depth,
                width=args.width,
                embed_dim=EMBED_DIM,
                checkpointing=checkpointing,
                channels_last=channels_last,
                compile=compile,
                freeze_stem=freeze_stem,
            )
            loss_fn = SigLIPLoss()
        model = nn.ModuleDict({"image_encoder": enc, "loss_fn": loss_fn}).to(ctx.device).train()
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=used == "fp16")
        x = random_volumes(ctx, batch, channels, torch.float32 if precision == "fp16" else torch.bfloat16)
        texts = unit_rows(batch, ctx.device)
        step = train_step(lambda: loss_fn(enc(x), texts), adamw(model, fused and ctx.cuda), scaler, autocast)
        try:
            m = ctx.measure(step, batch)
        finally:
            if compile:
                torch._dynamo.reset()  # free the compiled graphs before the next row
        m.settings = {"precision_used": used, "grad_scaler": scaler.is_enabled()}
        if compile:
            m.settings["compile_s"] = round(m.first_step_s, 1)  # the first step compiles
        return m

    return Row(section, name, label, batch, "volumes/s", run, settings, estimate_s=150.0 if compile and ctx.cuda else 0)


def image_rows(ctx: Context) -> list[Row]:
    args, rows = ctx.args, []
    for ckpt in ("none", "stage", "block"):
        for cl in (False, True):
            batches = list(args.image_batches)
            if ckpt == "stage" and cl and args.stage_batch and args.stage_batch not in batches:
                batches.append(args.stage_batch)
            for b in batches:
                layout = "channels_last_3d" if cl else "contiguous"
                rows.append(image_row(
                    ctx, "image", f"image.{ckpt}.{'cl' if cl else 'ncdhw'}.bf16",
                    f"image C={args.in_channels}: checkpointing {ckpt}, {layout}, bf16, fused AdamW",
                    batch=b, channels=args.in_channels, checkpointing=ckpt, channels_last=cl, precision="bf16",
                    fused=True, cudnn_benchmark=True))  # fmt: skip
    rows.append(image_row(  # --freeze_image_stem: conv1's weight gradient skipped (about 30 % of the demo's CPU step)
        ctx, "image", "image.none.cl.bf16.stem_frozen",
        f"image C={args.in_channels}: checkpointing none, channels_last_3d, bf16, fused AdamW, --freeze_image_stem",
        batch=args.image_batches[0], channels=args.in_channels, checkpointing="none", channels_last=True,
        precision="bf16", fused=True, cudnn_benchmark=True, freeze_stem=True))  # fmt: skip
    return rows


def compile_rows(ctx: Context) -> list[Row]:
    args = ctx.args
    return [image_row(ctx, "image", "image.none.cl.bf16.compile",
                      f"image C={args.in_channels}: torch.compile, checkpointing none, channels_last_3d, bf16",
                      batch=b, channels=args.in_channels, checkpointing="none", channels_last=True, precision="bf16",
                      fused=True, cudnn_benchmark=True, compile=True) for b in args.compile_batches]  # fmt: skip


def cache_build_row(ctx: Context) -> Row:
    args, batch = ctx.args, ctx.args.cache_batch

    def run(ctx: Context) -> Measurement:
        torch.backends.cudnn.benchmark = True
        autocast, used = ctx.amp("bf16")
        with ctx.build():
            enc = ImageEncoder(
                in_channels=args.in_channels,
                depth=args.depth,
                width=args.width,
                embed_dim=EMBED_DIM,
                freeze_backbone=True,
                channels_last=True,
            )
        enc.to(ctx.device).train()  # a frozen backbone stays in eval mode whatever train() says
        x = random_volumes(ctx, batch, args.in_channels, torch.bfloat16)

        def step() -> torch.Tensor:
            with autocast():
                return enc.embed(x)  # no_grad inside: what `feature_cache.compute_features` runs once per volume

        m = ctx.measure(step, batch)
        m.settings = {"precision_used": used}
        return m

    settings = {
        "in_channels": args.in_channels,
        "shape_dhw": list(args.shape),
        "depth": args.depth,
        "freeze_backbone": True,
        "channels_last": True,
        "precision": "bf16",
        "cudnn_benchmark": True,
    }
    return Row(
        "heads",
        "heads.cache_build",
        "building the cache: frozen backbone forward, bf16, channels_last_3d",
        batch,
        "volumes/s",
        run,
        settings,
    )


# ---------------------------------------------------------------------------------------------------- text
def ensure_text_model(ctx: Context) -> Path:
    """A random Llama folder loadable by llm2vec: real 1B shape, or the tiny one with --tiny. Reused if present."""
    if ctx.text_folder is not None:
        return ctx.text_folder
    from ct_siglip.text_tower import build_tiny_llama

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


def text_vocab(ctx: Context) -> int:
    return int(ctx.text_encoder.model.config.vocab_size)


def _text_dtype(ctx: Context, mode: str, bf16_weights: bool | None = None) -> str:
    """The trainer's choice: bf16 weights for lora/frozen on a GPU, float32 master weights for full fine-tuning."""
    if not ctx.cuda:
        return "float32"
    if bf16_weights is None:
        bf16_weights = mode in ("lora", "frozen")
    return "bfloat16" if bf16_weights else "float32"


def text_row(
    ctx: Context, section: str, name: str, label: str, *, batch: int, mode: str, dtype: str, fresh_reports: bool = False
) -> Row:
    """Text tower alone: TextEncoder forward (512 tokens) -> SigLIP loss against fixed image embeddings -> step."""
    args = ctx.args

    def run(ctx: Context) -> Measurement:
        enc, load_s = ctx.text((mode, dtype))
        autocast, used = ctx.amp("bf16")
        loss_fn = SigLIPLoss().to(ctx.device)
        model = nn.ModuleDict({"text_encoder": enc, "loss_fn": loss_fn}).train()
        vocab = text_vocab(ctx)
        images = unit_rows(batch, ctx.device, seed=1)
        batch_in = text_batch(ctx, batch, vocab)

        def loss_of() -> torch.Tensor:
            if fresh_reports:  # every step brings reports the frozen-mode cache has not seen
                batch_in["text_hash"] = torch.arange(batch, device=ctx.device) + batch * next(_FRESH_REPORTS)
            return loss_fn(images, enc(batch_in))

        scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)
        try:
            m = ctx.measure(train_step(loss_of, adamw(model, ctx.cuda), scaler, autocast), batch)
        finally:
            model.zero_grad(set_to_none=True)
        m.settings = {
            "precision_used": used,
            "text_load_s": round(load_s, 2) if load_s else None,
            "trainable_params": sum(p.numel() for p in enc.parameters() if p.requires_grad),
        }
        return m

    settings = {"train_mode": mode, "weights_dtype": dtype, "tokens": args.text_tokens, "left_pad": args.text_pad,
                "gradient_checkpointing": mode != "frozen", "precision": "bf16", "optimizer": "AdamW fused",
                "attn_implementation": "sdpa", "bidirectional": True, "grad_clip": GRAD_CLIP}  # fmt: skip
    if mode == "frozen":
        settings["reports"] = "new each step (LLM forward)" if fresh_reports else "cached (projection only)"
    return Row(section, name, label, batch, "samples/s", run, settings, text_key=(mode, dtype))


def best_image_options(ctx: Context, batch: int) -> list[tuple[str, bool]]:
    """(checkpointing, channels_last) candidates for the whole step, fastest measured at this batch first."""
    measured = sorted((r for r in ctx.results if r["section"] == "image" and r["batch"] == batch and r["error"] is None
                       and not r["settings"].get("compile")), key=lambda r: -r["value"])  # fmt: skip
    options = [(r["settings"]["checkpointing"], r["settings"]["channels_last"]) for r in measured]
    for default in (("none", True), ("stage", True), ("block", True)):  # BASELINES' order when nothing measured
        if default not in options:
            options.append(default)
    return options


def whole_row(ctx: Context, *, batch: int, mode: str, dtype: str) -> Row:
    """Image tower trained + text tower (LoRA or full) + SigLIP loss: the trainer's single-micro-batch step."""
    args = ctx.args

    def attempt(ctx: Context, ckpt: str, cl: bool) -> Measurement:
        from ct_siglip.model import ChestCTCLIP

        torch.backends.cudnn.benchmark = True
        text, load_s = ctx.text((mode, dtype))
        autocast, used = ctx.amp("bf16")
        with ctx.build():
            image = ImageEncoder(
                in_channels=args.in_channels,
                depth=args.depth,
                width=args.width,
                embed_dim=EMBED_DIM,
                checkpointing=ckpt,
                channels_last=cl,
            )
            loss_fn = SigLIPLoss()
        model = ChestCTCLIP(image, text, loss_fn).to(ctx.device).train()
        x = random_volumes(ctx, batch, args.in_channels, torch.bfloat16)
        tb = text_batch(ctx, batch, text_vocab(ctx))

        def loss_of() -> torch.Tensor:
            img, txt, _ = model(x, tb, compute_loss=False)
            return loss_fn(img, txt)

        scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)
        try:
            m = ctx.measure(train_step(loss_of, adamw(model, ctx.cuda), scaler, autocast), batch)
        finally:
            model.zero_grad(set_to_none=True)
        m.settings = {"precision_used": used, "text_load_s": round(load_s, 2) if load_s else None}
        return m

    def run(ctx: Context) -> Measurement:
        tried: list[str] = []
        out_of_memory: set[str] = set()
        for ckpt, cl in best_image_options(ctx, batch):
            if ckpt in out_of_memory:  # the layout barely changes memory: try less activation memory instead
                continue
            ctx.reset_peak()
            try:
                m = attempt(ctx, ckpt, cl)
            except torch.OutOfMemoryError:
                tried.append(f"checkpointing {ckpt}, channels_last {cl}: OOM")
                out_of_memory.add(ckpt)
            else:
                m.settings.update({"image_checkpointing": ckpt, "image_channels_last": cl, "image_tried_first": tried})
                return m
            ctx.cleanup()  # outside the except block: the traceback no longer pins the failed attempt's tensors
        raise torch.OutOfMemoryError("every image option ran out of memory: " + "; ".join(tried))

    text_desc = ("full fine-tune" if mode == "full" else "LoRA") + f" ({dtype} weights)"
    settings = {
        "in_channels": args.in_channels,
        "shape_dhw": list(args.shape),
        "text_train_mode": mode,
        "text_weights_dtype": dtype,
        "tokens": args.text_tokens,
        "precision": "bf16",
        "optimizer": "AdamW fused",
        "image_options": "fastest image row at this batch (OOM: next)",
    }
    return Row("whole", f"whole.image_trained.text_{mode}", f"whole step: image trained (best options) + text "
               f"{text_desc} + SigLIP loss", batch, "volumes/s", run, settings, text_key=(mode, dtype))  # fmt: skip


def original_equivalent_row() -> Row:
    """The original trainer's step time as the sum of its two measured towers (BASELINES' method)."""

    def run(ctx: Context) -> Measurement:
        image = ctx.result("baseline.image")
        text = ctx.result("baseline.text_full_bf16", image["batch"] if image else None)
        if image is None or text is None:
            raise RuntimeError("needs the baseline image row and the baseline text row at the same batch")
        b = image["batch"]
        seconds = b / image["value"] + b / text["value"]
        return Measurement(b / seconds, seconds, settings={"from": ["baseline.image", "baseline.text_full_bf16"]})

    return Row("baseline", "baseline.original_trainer", "original trainer equivalent: Merlin as shipped + text "
               "full fine-tune (sum of the two baseline rows)", None, "volumes/s", run)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- heads
def heads_row(ctx: Context, batch: int) -> Row:
    """Phase 1 on cached features (`--cache_features`): the trainer's heads-only forward,
    `ChestCTCLIP(..., pooled=True)` (image projection MLP + text projection), the SigLIP loss and AdamW."""
    args = ctx.args

    def run(ctx: Context) -> Measurement:
        from ct_siglip.text_tower import TextEncoder

        autocast, used = ctx.amp("bf16")
        hidden = TINY_LLAMA["hidden_size"] if args.tiny else LLAMA_1B["hidden_size"]
        with ctx.build():
            # The encoder's own projection head (2048 -> 1024 -> 512) behind a frozen depth-14 trunk of the same
            # width, built only to get it (frozen: AdamW skips it, as in the trainer). TextEncoder's head is an
            # `nn.Linear(hidden, embed_dim)` named `projection` run by `TextEncoder.project`; no LLM on cached features.
            image = ImageEncoder(in_channels=args.in_channels, depth=14, width=args.width, embed_dim=EMBED_DIM,
                                 freeze_backbone=True)  # fmt: skip
            text = nn.Module()
            text.projection = nn.Linear(hidden, EMBED_DIM)
            text.project = types.MethodType(TextEncoder.project, text)  # the tower's own head code, no LLM
            model = ChestCTCLIP(image, text, SigLIPLoss())
            # Cached image features have the backbone's output dtype (bf16 under bf16 autocast); text ones float32.
            img_feat = torch.randn(batch, image.backbone.out_features).to(
                torch.bfloat16 if used == "bf16" else torch.float32
            )
            txt_feat = torch.randn(batch, hidden)
        model.to(ctx.device).train()

        def loss_of() -> torch.Tensor:
            zi, zt, _ = model(img_feat, txt_feat, compute_loss=False, pooled=True)  # as SigLIPTrainer._embed
            return model.loss_fn(zi, zt)

        scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)
        step = train_step(loss_of, adamw(model, ctx.cuda), scaler, autocast)
        if ctx.cuda:  # a step takes about a millisecond: more of them for a stable median
            m = ctx.measure(step, batch, warmup=max(args.warmup, 3), steps=max(4 * args.steps, 20))
        else:
            m = ctx.measure(step, batch)
        m.settings = {"precision_used": used, "image_features": image.backbone.out_features, "text_features": hidden}
        return m

    return Row("heads", "heads.cached_features", "heads only on cached features (phase 1): projections + loss + "
               "AdamW", batch, "samples/s", run, {"precision": "bf16", "optimizer": "AdamW fused"})  # fmt: skip


# ---------------------------------------------------------------------------------------------------- data
def _make_volume(job: tuple[int, tuple[int, int, int], int, str, str]) -> dict:
    """Worker: one synthetic chest-CT phantom (smooth anatomy + noise, windowed like real data), written as
    compressed NPZ and as plain .npy; returns sizes and the compression time."""
    from ct_siglip.synthetic import make_case, window

    seed, shape, channels, npz_path, npy_path = job
    hu, _, _ = make_case(np.random.default_rng([seed, 7]), shape)
    vol = window(hu, dtype=np.float16)
    vol = vol[np.arange(channels) % len(vol)]  # C=2: the two windows of the data contract
    t = time.perf_counter()
    np.savez_compressed(npz_path, image=vol)
    compress_s = time.perf_counter() - t
    np.save(npy_path, vol)
    return {"raw_mb": vol.nbytes / 1e6, "npz_mb": os.path.getsize(npz_path) / 1e6, "compress_s": compress_s}


def prepare_data(ctx: Context) -> dict:
    """`--volumes` files per format, copies of `--unique_volumes` distinct phantoms (decode time does not depend
    on which phantom a file holds; generating 32 full-size ones would cost minutes). Reused when present."""
    if ctx.data_files is not None:
        return ctx.data_files
    if ctx.data_error is not None:
        raise RuntimeError(f"preparing the volumes failed: {ctx.data_error}")
    args = ctx.args
    spec = {
        "shape": list(args.shape),
        "channels": args.in_channels,
        "volumes": args.volumes,
        "unique": args.unique_volumes,
        "version": DATA_FORMAT_VERSION,
    }
    folder = args.work_dir / ("data-" + "x".join(map(str, [args.in_channels, *args.shape])))
    marker = folder / "bench_data.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("spec") == spec and all(Path(f).is_file() for fs in info["files"].values() for f in fs):
            ctx.data_files = info
            return info
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    jobs = [(u, args.shape, args.in_channels, str(folder / f"u{u}.npz"), str(folder / f"u{u}.npy"))
            for u in range(args.unique_volumes)]  # fmt: skip
    t = time.perf_counter()
    if math.prod(args.shape) >= 1_000_000 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(len(jobs), _cpus())) as pool:
            made = list(pool.map(_make_volume, jobs))
    else:
        made = [_make_volume(j) for j in jobs]
    files: dict[str, list[str]] = {"npz": [], "npy": []}
    for k in range(args.volumes):
        u = k % args.unique_volumes
        for fmt in files:
            dst = folder / f"vol{k:03d}.{fmt}"
            shutil.copyfile(folder / f"u{u}.{fmt}", dst)
            files[fmt].append(str(dst))
    info = {
        "spec": spec,
        "files": files,
        "raw_mb": made[0]["raw_mb"],
        "npz_mb": statistics.mean(m["npz_mb"] for m in made),
        "compress_s": statistics.mean(m["compress_s"] for m in made),
        "prepare_s": time.perf_counter() - t,
    }
    marker.write_text(json.dumps(info))
    ctx.data_files = info
    return info


class VolumeFiles(torch.utils.data.Dataset):
    """What a training data set does per sample to get the image tensor: NPZ through `load_volume` (decompress
    and check the data contract), .npy memory-mapped and copied into a tensor, or NPZ through the trainer's
    `--cache_dir` (`VolumeCache.load`: its .npy entry memory-mapped, copied and checked; filled by the untimed
    warm-up pass)."""

    def __init__(self, paths: list[str], fmt: str, channels: int, cache_dir: Path | None = None):
        from ct_siglip.volume_io import VolumeCache

        self.paths, self.fmt, self.channels = paths, fmt, channels
        self.cache = VolumeCache(cache_dir) if fmt == "cache" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            arr = self.cache.load(self.paths[i], channels=self.channels)
        elif self.fmt == "npz":
            from ct_siglip.volume_io import load_volume

            arr = load_volume(self.paths[i], channels=self.channels)
        else:
            arr = np.array(np.load(self.paths[i], mmap_mode="r"))  # a real copy: every page is read
        return torch.from_numpy(arr)


def data_row(ctx: Context, fmt: str, workers: int) -> Row:
    args = ctx.args

    def run(ctx: Context) -> Measurement:
        info = prepare_data(ctx)
        npz = info["files"]["npz"]
        # Inside the data folder, which is rebuilt when the volumes change; entries of a previous run are reused.
        cache_dir = Path(npz[0]).parent / "volume_cache"
        ds = VolumeFiles(npz if fmt == "cache" else info["files"][fmt], fmt, args.in_channels, cache_dir)
        extra = {
            "raw_mb": round(info["raw_mb"], 2),
            "npz_mb": round(info["npz_mb"], 2),
            "compress_s_per_volume": round(info["compress_s"], 3),
        }
        if workers == 0:
            n = min(len(ds), 8)
            for i in range(n):  # page cache warm: decode is measured, not the disk
                ds[i]
            t = time.perf_counter()
            for i in range(n):
                ds[i]
            seconds = time.perf_counter() - t
            return Measurement(n / seconds, seconds / n, settings={**extra, "volumes_timed": n})
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            persistent_workers=True,
            timeout=300,  # a wedged worker fails this row instead of hanging the run
            prefetch_factor=2,
            pin_memory=ctx.cuda,
        )
        try:
            for _ in loader:  # worker start-up and page cache warm-up, not timed
                pass
            t = time.perf_counter()
            n = 0
            for _ in range(args.data_passes):
                for _ in loader:
                    n += 1
            seconds = time.perf_counter() - t
        finally:
            del loader  # stops the persistent workers
        return Measurement(n / seconds, seconds / n, settings={**extra, "volumes_timed": n})

    procs = "1 process" if workers == 0 else f"{workers} worker processes"
    what = {"npz": "compressed NPZ (load_volume)", "npy": "uncompressed .npy, memory-mapped",
            "cache": "NPZ through --cache_dir (VolumeCache: .npy entry memory-mapped and checked)"}[fmt]  # fmt: skip
    settings = {
        "format": fmt,
        "workers": workers,
        "shape_cdhw": [args.in_channels, *args.shape],
        "dtype": "float16",
        "volumes": args.volumes,
        "cpus": _cpus(),
        "pin_memory": ctx.cuda,
        "page_cache": "warm",
    }
    return Row("data", f"data.{fmt}.{'w' + str(workers) if workers else 'main'}", f"data: {what}, {procs}", None,
               "volumes/s", run, settings)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- plan
def plan(ctx: Context) -> list[Row]:
    """Rows in run order: those sharing a loaded text tower are adjacent; compilation (long) goes last."""
    args, want = ctx.args, set(ctx.args.sections)
    rows: list[Row] = []
    if "baseline" in want:
        rows.append(image_row(
            ctx, "baseline", "baseline.image", "baseline, Merlin as shipped: C=1, per-block checkpointing, fp16 + "
            "GradScaler, AdamW", batch=args.baseline_batch, channels=1, checkpointing="block", channels_last=False,
            precision="fp16", fused=False, cudnn_benchmark=False))  # fmt: skip
    if "image" in want:
        rows += image_rows(ctx)
    if "baseline" in want:
        dtype = _text_dtype(ctx, "full", bf16_weights=True)
        rows += [text_row(ctx, "baseline", "baseline.text_full_bf16", "baseline text tower: full fine-tune, bf16 "
                          "weights (BASELINES' setting), grad checkpointing", batch=b, mode="full", dtype=dtype)
                 for b in args.text_batches]  # fmt: skip
        rows.append(original_equivalent_row())
    for mode in args.text_modes:
        dtype = _text_dtype(ctx, mode)
        if "text" in want:
            if mode == "frozen":
                for fresh, what in ((True, "new reports (building the text cache)"), (False, "cached reports")):
                    rows += [text_row(ctx, "text", f"text.frozen.{'new' if fresh else 'cached'}",
                                      f"text tower frozen ({dtype}): {what}", batch=b, mode=mode, dtype=dtype,
                                      fresh_reports=fresh) for b in args.text_batches]  # fmt: skip
            else:
                if mode == "full":
                    desc = f"full fine-tune ({'float32 master' if dtype == 'float32' else dtype} weights)"
                else:
                    desc = f"LoRA ({dtype} base weights)"
                rows += [text_row(ctx, "text", f"text.{mode}", f"text tower {desc}, grad checkpointing", batch=b,
                                  mode=mode, dtype=dtype) for b in args.text_batches]  # fmt: skip
        if "whole" in want and mode in ("full", "lora"):
            rows += [whole_row(ctx, batch=b, mode=mode, dtype=dtype) for b in args.whole_batches]
    if "heads" in want:
        rows += [heads_row(ctx, b) for b in args.heads_batches]
        rows.append(cache_build_row(ctx))
    if "data" in want:
        rows += [data_row(ctx, fmt, w) for fmt in ("npz", "npy", "cache") for w in (0, args.workers)]
    if ("image" in want and args.compile) or "compile" in want:
        rows += compile_rows(ctx)
    return rows


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
                     "cpus": _cpus(), "host": platform.node()},
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
        error, record["oom"] = f"OOM: {_first_line(e)}", True
    except Exception as e:  # one failing configuration must not stop the others
        oom = any(m in str(e).lower() for m in ("out of memory", "alloc_failed"))  # cuDNN's workspace OOM too
        error, record["oom"] = f"{'OOM: ' if oom else ''}{type(e).__name__}: {_first_line(e)}", oom
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def run_rows(ctx: Context, rows: Iterable[Row], common: dict[str, Any], out: Path | None) -> list[dict]:
    for row in rows:
        record = execute(ctx, row, common)
        ctx.results.append(record)
        if out is not None:
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
        print(format_line(record), flush=True)
    return ctx.results


# ---------------------------------------------------------------------------------------------------- output
def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if v < 1000 else f"{v:,.0f}"


def _outcome(r: dict) -> str:
    return f"{_num(r['value'])} {r['unit']}" if r["error"] is None else ("OOM" if r["oom"] else r["error"][:60])


def format_line(r: dict) -> str:
    batch = "" if r["batch"] is None else f"b{r['batch']}"
    peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
    sp = "" if r["speedup"] is None else f"x{r['speedup']:.2f}"
    return f"{r['name']:<32} {batch:>5} {_outcome(r):>24} {peak:>10} {sp:>7}  {r['label']}"


def _ordered(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: SECTIONS.index(r["section"]))  # stable: run order within a section


def text_table(records: list[dict]) -> str:
    head = f"{'configuration':<32} {'batch':>5} {'throughput':>24} {'peak':>10} {'vs base':>7}  description"
    return "\n".join([head, "-" * len(head), *(format_line(r) for r in _ordered(records))])


def markdown_table(records: list[dict]) -> str:
    """The BENCHMARKS.md table: one line per row, errors shown in the throughput column."""
    lines = ["| section | configuration | batch | throughput | peak GiB | vs baseline |", "|---|---|---|---|---|---|"]
    for r in _ordered(records):
        value = f"{_num(r['value'])} {r['unit']}" if r["error"] is None else ("OOM" if r["oom"] else
                                                                               f"error: {r['error'][:80]}")  # fmt: skip
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['section']} | {r['label']} | {r['batch'] or ''} | {value} | {peak} | {sp} |")
    return "\n".join(lines)


def run_header(r: dict) -> str:
    v = r.get("versions", {})
    return (f"{r['device']}, torch {r['torch']} (CUDA {r['cuda']}, cuDNN {v.get('cudnn')}), transformers "
            f"{r['transformers']}, llm2vec {v.get('llm2vec')}, Python {v.get('python')}, {v.get('cpus')} CPUs; "
            f"{r['date']}; volumes D x H x W = {' x '.join(map(str, r.get('shape_dhw', [])))}, median of "
            f"{r.get('steps')} steps after {r.get('warmup')} warm-up steps\n\n`{r['command']}`")  # fmt: skip


def report(path: Path, run_id: str | None = None) -> str:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no results")
    run_id = run_id or records[-1]["run_id"]
    records = [r for r in records if r["run_id"] == run_id]
    if not records:
        raise SystemExit(f"{path}: no run {run_id}")
    return run_header(records[0]) + "\n\n" + markdown_table(records)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(report(args.report, args.run_id))
        return 0
    threads = torch.get_num_threads()
    if args.cpu_threads or args.tiny:
        # Tiny CPU work is dominated by thread hand-offs: one thread is faster and steady on a shared machine.
        torch.set_num_threads(args.cpu_threads or 1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # everything is local: never wait on a network
        os.environ.setdefault(offline, "1")
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        ctx = Context(args)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if "data" in args.sections:
            # Before CUDA is initialised: the generator forks worker processes.
            try:
                prepare_data(ctx)
            except Exception as e:  # recorded by the data rows
                ctx.data_error = f"{type(e).__name__}: {_first_line(e)}"
        command = shlex.join(["python", "benchmarks/bench_train.py", *(sys.argv[1:] if argv is None else argv)])
        common = {
            "run_id": f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}",
            "command": command,
            **environment(ctx),
            "shape_dhw": list(args.shape),
            "steps": args.steps,
            "warmup": args.warmup,
        }
        print(f"# {common['device']} | torch {common['torch']} | CUDA {common['cuda']} | transformers "
              f"{common['transformers']} | run {common['run_id']} -> {args.out}", flush=True)  # fmt: skip
        if not ctx.cuda:
            print("# no GPU: bf16/fp16 rows run in float32 (half-precision 3D convolutions are emulated on a CPU)")
        rows = plan(ctx)
        records = run_rows(ctx, rows, common, args.out)
        ctx.drop_text()
        print(f"\n{text_table(records)}\n\n{len(records)} rows, {sum(r['error'] is not None for r in records)} "
              f"failed, {time.perf_counter() - ctx.start:.0f} s")  # fmt: skip
        if args.markdown and records:
            print("\n" + run_header(records[0]) + "\n\n" + markdown_table(records))
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return 0


if __name__ == "__main__":
    sys.exit(main())
