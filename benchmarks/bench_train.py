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

Every step row runs the trainer's own step (`ct_siglip.step.TrainStep`, what `SigLIPTrainer.train_step` calls):
see `bench_steps`. This file is the command: its arguments, the plan of rows and `main`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/bench_train.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_core import SECTIONS, Context, Row, cpus, environment, execute, first_line  # noqa: E402
from benchmarks.bench_data import data_row, prepare_data  # noqa: E402
from benchmarks.bench_report import format_line, markdown_table, report, run_header, text_table  # noqa: E402
from benchmarks.bench_steps import (  # noqa: E402
    cache_build_row,
    compile_rows,
    heads_row,
    image_row,
    image_rows,
    original_equivalent_row,
    text_dtype,
    text_row,
    whole_row,
)

__all__ = ["SECTIONS", "Context", "Row", "main", "markdown_table", "parse_args", "plan", "run_rows"]
DEFAULT_OUT = Path(__file__).resolve().parent / "results.jsonl"


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
    args.workers = args.workers or (2 if tiny else min(16, cpus()))
    args.depth, args.width = (14, 8) if tiny else (152, 64)
    return args


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
        dtype = text_dtype(ctx, "full", bf16_weights=True)
        rows += [text_row(ctx, "baseline", "baseline.text_full_bf16", "baseline text tower: full fine-tune, bf16 "
                          "weights (the baseline measurement's setting), grad checkpointing", batch=b, mode="full", dtype=dtype)
                 for b in args.text_batches]  # fmt: skip
        rows.append(original_equivalent_row())
    for mode in args.text_modes:
        dtype = text_dtype(ctx, mode)
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


def run_rows(ctx: Context, rows: Iterable[Row], common: dict[str, Any], out: Path | None) -> list[dict]:
    for row in rows:
        record = execute(ctx, row, common)
        ctx.results.append(record)
        if out is not None:
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
        print(format_line(record), flush=True)
    return ctx.results


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
                ctx.data_error = f"{type(e).__name__}: {first_line(e)}"
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
