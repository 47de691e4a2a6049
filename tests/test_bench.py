"""benchmarks/bench_train.py: the tiny run covers every section and writes complete records; failures are recorded
and the run goes on; and the speed options it times do not change what is trained."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_steps
from benchmarks import bench_train as bench
from ct_siglip.config import parse_config
from ct_siglip.image_tower import ImageEncoder
from ct_siglip.loaders import load_table
from ct_siglip.loss import SigLIPLoss
from ct_siglip.model import ChestCTCLIP
from ct_siglip.trainer import SigLIPTrainer

RECORD_FIELDS = {"run_id", "name", "label", "section", "batch", "settings", "value", "unit", "peak_gib", "device",
                 "torch", "cuda", "transformers", "versions", "date", "command", "error", "oom", "speedup"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny CPU kernels are dominated by thread hand-offs; one thread is fast and steady on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run of every section (about 15 s on two cores); its records and its console output."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.jsonl"
    argv = ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out), "--work_dir",
            str(tmp / "work"), "--markdown"]  # fmt: skip
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert bench.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, console.getvalue(), out


def test_tiny_run_covers_every_section_without_errors(tiny_run):
    records, _, _ = tiny_run
    assert {r["section"] for r in records} == set(bench.SECTIONS)
    failed = [(r["name"], r["batch"], r["error"]) for r in records if r["error"] is not None]
    assert not failed
    names = {r["name"] for r in records}
    for expected in ("baseline.image", "baseline.text_full_bf16", "baseline.original_trainer", "text.full",
                     "text.lora", "text.frozen.new", "text.frozen.cached", "whole.image_trained.text_lora",
                     "whole.image_trained.text_full", "heads.cached_features", "heads.cache_build", "data.npz.main",
                     "data.npz.w2", "data.npy.main", "data.npy.w2"):  # fmt: skip
        assert expected in names
    grid = {(r["settings"]["checkpointing"], r["settings"]["channels_last"], r["batch"])
            for r in records if r["section"] == "image"}  # fmt: skip
    assert grid >= set(itertools.product(("none", "stage", "block"), (False, True), (4, 8)))
    assert ("stage", True, 16) in grid


def test_records_are_complete_and_values_positive(tiny_run):
    records, _, _ = tiny_run
    run_ids = {r["run_id"] for r in records}
    assert len(run_ids) == 1
    for r in records:
        assert set(r) >= RECORD_FIELDS, r["name"]
        assert math.isfinite(r["value"]) and r["value"] > 0, r["name"]
        assert r["unit"] in ("volumes/s", "samples/s")
        assert r["device"] and r["torch"] == torch.__version__ and r["transformers"]
        assert r["command"].startswith("python benchmarks/bench_train.py --tiny")
        assert r["peak_gib"] is None  # CPU: no allocator statistics
        if r["section"] not in ("data",) and r["name"] != "baseline.original_trainer":
            assert r["step_s"] > 0 and len(r["times_s"]) == 2
    by_name = {(r["name"], r["batch"]): r for r in records}
    whole = by_name[("whole.image_trained.text_lora", 4)]
    assert whole["settings"]["image_checkpointing"] in ("none", "stage", "block")  # the fastest image row's option
    assert whole["speedup_vs"] == "baseline.original_trainer" and whole["speedup"] > 0
    image = by_name[("image.none.cl.bf16", 4)]
    assert image["speedup"] == pytest.approx(image["value"] / by_name[("baseline.image", 4)]["value"], rel=1e-2)
    base = by_name[("baseline.original_trainer", None)]
    img, txt = by_name[("baseline.image", 4)]["value"], by_name[("baseline.text_full_bf16", 4)]["value"]
    assert base["value"] == pytest.approx(1 / (1 / img + 1 / txt))  # time per volume adds up
    data = by_name[("data.npz.main", None)]["settings"]
    assert data["raw_mb"] == pytest.approx(2 * 16 * 32 * 32 * 2 / 1e6, abs=0.01) and data["npz_mb"] > 0


def test_console_table_and_markdown_report(tiny_run, capsys):
    records, console, out = tiny_run
    assert f"{len(records)} rows, 0 failed" in console
    assert "| section | configuration | batch | throughput | peak GiB | vs baseline |" in console
    assert bench.main(["--report", str(out)]) == 0
    md = capsys.readouterr().out
    assert md.count("\n| ") == len(records) + 1  # header + one line per row (the separator starts with "|---")
    assert "`python benchmarks/bench_train.py --tiny" in md


def test_failing_rows_are_recorded_and_the_run_goes_on(tmp_path):
    ctx = bench.Context(bench.parse_args(["--tiny", "--device", "cpu"]))

    def oom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def broken(ctx):
        raise ValueError("bad shape\nsecond line")

    def fine(ctx):
        return ctx.measure(lambda: torch.ones(4).sum(), items=4, warmup=1, steps=2)

    rows = [bench.Row("image", "oom", "oom", 8, "volumes/s", oom), bench.Row("image", "broken", "b", 4, "volumes/s",
            broken), bench.Row("image", "fine", "f", 4, "volumes/s", fine),
            bench.Row("image", "long", "l", 4, "volumes/s", fine, estimate_s=1e9)]  # fmt: skip
    ctx.args.time_budget = 3600.0
    out = tmp_path / "r.jsonl"
    records = bench.run_rows(ctx, rows, {"run_id": "x"}, out)
    by = {r["name"]: r for r in records}
    assert by["oom"]["oom"] and by["oom"]["error"].startswith("OOM") and by["oom"]["value"] is None
    assert by["broken"]["error"] == "ValueError: bad shape" and "traceback" in by["broken"]
    assert by["fine"]["error"] is None and by["fine"]["value"] > 0
    assert by["long"]["error"].startswith("skipped: --time_budget")
    assert len(out.read_text().splitlines()) == 4  # every row written as it finished
    assert "OOM" in bench.markdown_table(records)


def test_the_whole_step_row_runs_the_trainers_own_step(small_csv, tiny_llama_dir, tmp_path):
    """The whole-step row times `SigLIPTrainer.train_step` itself: on copies of one model and the same batch, the
    benchmark's step and the trainer's give the same loss and gradient norm and leave the same weights, bit for bit
    (float32 on a CPU, one thread: the same code runs the same operations in the same order). A benchmark with its
    own copy of the step (another AdamW setting, no clipping, a schedule of its own) fails here."""
    ctx = bench.Context(bench.parse_args(["--tiny", "--device", "cpu", "--work_dir", str(tmp_path / "work")]))
    ctx.text_folder = tiny_llama_dir  # the session's tiny Llama instead of writing another one
    torch.manual_seed(0)
    text, _ = ctx.text(("full", "float32"))
    bench_model = bench_steps.whole_model(ctx, text, checkpointing="none", channels_last=False)
    trainer_model = copy.deepcopy(bench_model)
    before = {n: p.detach().clone() for n, p in bench_model.named_parameters()}
    batch = bench_steps.whole_batch(ctx, 4)
    bench_out = bench_steps.trainer_step(ctx, bench_model, "fp32")([batch])

    cfg = parse_config(["--csv_file", str(small_csv), "--save_dir", str(tmp_path / "run"), "--text_model",
                        str(tiny_llama_dir), "--max_text_length", str(ctx.args.text_tokens), "--embed_dim", "512",
                        "--num_workers", "0", "--precision", "fp32", *bench_steps.STEP_FLAGS])  # fmt: skip
    trainer = SigLIPTrainer(cfg, trainer_model, load_table(cfg, "train", train=True), None, device=torch.device("cpu"))
    trainer_out = trainer.train_step([batch])
    assert bench_out == trainer_out and bench_out["finite"]
    assert bench_out["grad_norm"] > 0
    for (name, p), (_, q) in zip(bench_model.named_parameters(), trainer_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    moved = {n.split(".")[0] for n, p in bench_model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"image_encoder", "text_encoder", "loss_fn"}  # the step trained what it is compared on


# --------------------------------------------------------------------------------------- speed options vs plain
def _train_losses(*, checkpointing="none", channels_last=False, fused=False, amp=None, steps=3):
    """Losses of `steps` steps of the tiny tower from the same seed, on the same batch, by the step the benchmark
    times (the trainer's `TrainStep`, against fixed text embeddings as in the image rows)."""
    torch.manual_seed(0)
    enc = ImageEncoder(in_channels=2, depth=14, width=8, embed_dim=16, proj_hidden=32,
                       checkpointing=checkpointing, channels_last=channels_last)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 2, 16, 32, 32, generator=g)
    texts = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    model = ChestCTCLIP(enc, bench_steps.FixedEmbeddings(texts), SigLIPLoss())
    ctx = bench.Context(bench.parse_args(["--tiny", "--device", "cpu"]))
    step = bench_steps.trainer_step(ctx, model, "bf16" if amp == torch.bfloat16 else "fp32", fused=fused)
    batch = [bench_steps.collated(x)]
    losses = torch.tensor([step(batch)["loss"] for _ in range(steps)])
    return losses, {k: v.clone() for k, v in enc.backbone.named_buffers()}


@pytest.fixture(scope="module")
def plain():
    return _train_losses()


@pytest.mark.parametrize(("checkpointing", "channels_last", "fused"),
                         [c for c in itertools.product(("none", "stage", "block"), (False, True), (False, True))
                          if c != ("none", False, False)])  # fmt: skip
def test_speed_options_train_like_the_plain_configuration(plain, checkpointing, channels_last, fused):
    """Three training steps (forward, backward, clip, AdamW) give the plain configuration's losses and batch-norm
    statistics. test_image_tower checks checkpointing alone in float64 and channels_last in eval mode; this covers
    them combined, in train mode, through the optimizer, in the benchmark's own step.

    Tolerance: channels_last switches the CPU convolution kernels (oneDNN instead of the native ones) and fused
    AdamW reorders the update's arithmetic: the same maths with float32 rounding in another order. Observed
    differences are at most ~1e-6 relative after three steps (~1e-5 at a 10x learning rate); 1e-4 keeps a wide
    margin, while a real fault (a wrong layout, a recomputed segment counting batch statistics twice, a skipped
    update) moves the loss by percent."""
    ref_losses, ref_buffers = plain
    losses, buffers = _train_losses(checkpointing=checkpointing, channels_last=channels_last, fused=fused)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=0)
    for name, ref in ref_buffers.items():
        if ref.dtype == torch.long:
            assert torch.equal(buffers[name], ref), name  # each batch counted exactly once
        else:
            torch.testing.assert_close(buffers[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_with_every_speed_option_stays_within_bf16_rounding(plain):
    """bf16 autocast + stage checkpointing + channels_last + fused AdamW against plain float32, first step (same
    weights): bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 % per operation); the SigLIP logits
    t * cos + b with t = 10 amplify the embeddings' error, which gives ~0.8 % here. 2 % bounds bf16 rounding; a
    fault such as a dropped residual or wrong channel order changes the loss far more."""
    ref_losses, _ = plain
    losses, _ = _train_losses(checkpointing="stage", channels_last=True, fused=True, amp=torch.bfloat16, steps=1)
    torch.testing.assert_close(losses[0], ref_losses[0], rtol=2e-2, atol=0)
