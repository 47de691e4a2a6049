"""Step rows: the image tower, the text tower, the whole model and the cached-feature heads, each trained by the
trainer's own step (`ct_siglip.step.TrainStep`, which `SigLIPTrainer.train_step` runs) on collated batches of the
trainer's format, so the rows time what users run: loss, backward, clipping, the optimizer, the host syncs.

A row that times one tower stands the other in with `FixedEmbeddings` (the same unit rows every step, nothing to
train), so the step, the loss and the optimizer are the trainer's and only that tower's work is added.
"""

from __future__ import annotations

import itertools
import types

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_core import EMBED_DIM, LLAMA_1B, TINY_LLAMA, Context, Measurement, Row
from ct_siglip.config import Config, parse_config
from ct_siglip.image_tower import ImageEncoder
from ct_siglip.loss import SigLIPLoss
from ct_siglip.model import ChestCTCLIP
from ct_siglip.step import TrainStep

# The CLI's defaults for everything the step does (AdamW betas, eps, weight decay, grad clip 1.0, learning rate
# 1e-4) except the schedule: no warm-up, so the timed steps run at the peak learning rate.
STEP_FLAGS = ("--warmup_steps", "0", "--max_steps", "1000000")
_FRESH_REPORTS = itertools.count(1)  # text hashes never seen before: batch * n + row, n >= 1 (cached rows use 0..B-1)


def step_config(precision: str) -> Config:
    """The trainer's Config as the command line builds it, for a step in `precision` (no data is read)."""
    return parse_config(["--csv_file", "(in-memory batches)", *STEP_FLAGS, "--precision", precision])


def trainer_step(ctx: Context, model: nn.Module, precision: str, *, fused: bool | None = None) -> TrainStep:
    """The trainer's step over `model`; `fused` AdamW defaults to the trainer's choice (on a GPU)."""
    return TrainStep(model, step_config(precision), device=ctx.device, fused=fused)


class FixedEmbeddings(nn.Module):
    """Stands in for the tower a row does not time: returns the same unit rows every step; nothing to train."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows  # a plain attribute, not a buffer: the step does not save and restore it

    def forward(self, _inputs) -> torch.Tensor:
        return self.rows


def unit_rows(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return F.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1).to(device)


def random_volumes(ctx: Context, batch: int, channels: int) -> torch.Tensor:
    """Uniform [0, 1) volumes on the device, float16 as the loader delivers them (the step casts them there)."""
    return torch.rand(batch, channels, *ctx.args.shape, device=ctx.device).to(torch.float16)


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


def collated(images: torch.Tensor, text: dict[str, torch.Tensor] | None = None) -> dict:
    """A batch as `ct_siglip.data.Collator` makes it (volumes, token tensors, no partner texts)."""
    return {"images": images, "text": text or {}, "pairs": False}


def text_vocab(ctx: Context) -> int:
    return int(ctx.text_encoder.model.config.vocab_size)


def text_dtype(ctx: Context, mode: str, bf16_weights: bool | None = None) -> str:
    """The trainer's choice: bf16 weights for lora/frozen on a GPU, float32 master weights for full fine-tuning."""
    if not ctx.cuda:
        return "float32"
    if bf16_weights is None:
        bf16_weights = mode in ("lora", "frozen")
    return "bfloat16" if bf16_weights else "float32"


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
    """Image tower trained against fixed text embeddings, by the trainer's step."""
    args = ctx.args
    settings = {"in_channels": channels, "shape_dhw": list(args.shape), "depth": args.depth, "width": args.width,
                "checkpointing": checkpointing, "channels_last": channels_last, "precision": precision,
                "freeze_stem": freeze_stem, "grad_scaler": precision == "fp16",
                "optimizer": "AdamW fused" if fused else "AdamW foreach", "cudnn_benchmark": cudnn_benchmark,
                "compile": compile, "grad_clip": step_config("fp32").grad_clip}  # fmt: skip

    def run(ctx: Context) -> Measurement:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        used = ctx.precision(precision)
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
            model = ChestCTCLIP(enc, FixedEmbeddings(unit_rows(batch, ctx.device)), SigLIPLoss())
        model.to(ctx.device)
        step = trainer_step(ctx, model, used, fused=fused and ctx.cuda)
        data = [collated(random_volumes(ctx, batch, channels))]
        try:
            m = ctx.measure(lambda: step(data), batch)
        finally:
            if compile:
                torch._dynamo.reset()  # free the compiled graphs before the next row
        m.settings = {"precision_used": used, "grad_scaler": step.scaler.is_enabled()}
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
    """Building the image feature cache: the frozen backbone's forward, as `feature_cache.compute_features`."""
    args, batch = ctx.args, ctx.args.cache_batch

    def run(ctx: Context) -> Measurement:
        from ct_siglip.runtime import autocast_factory

        torch.backends.cudnn.benchmark = True
        used = ctx.precision("bf16")
        autocast = autocast_factory(ctx.device, used)
        with ctx.build():
            enc = ImageEncoder(in_channels=args.in_channels, depth=args.depth, width=args.width, embed_dim=EMBED_DIM,
                               freeze_backbone=True, channels_last=True)  # fmt: skip
        enc.to(ctx.device).train()  # a frozen backbone stays in eval mode whatever train() says
        x = random_volumes(ctx, batch, args.in_channels).to(torch.bfloat16 if used == "bf16" else torch.float32)

        def step() -> torch.Tensor:
            with autocast():
                return enc.embed(x)  # no_grad inside: what `feature_cache.compute_features` runs once per volume

        m = ctx.measure(step, batch)
        m.settings = {"precision_used": used}
        return m

    settings = {"in_channels": args.in_channels, "shape_dhw": list(args.shape), "depth": args.depth,
                "freeze_backbone": True, "channels_last": True, "precision": "bf16", "cudnn_benchmark": True}  # fmt: skip
    return Row("heads", "heads.cache_build", "building the cache: frozen backbone forward, bf16, channels_last_3d",
               batch, "volumes/s", run, settings)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- text
def text_row(
    ctx: Context, section: str, name: str, label: str, *, batch: int, mode: str, dtype: str, fresh_reports: bool = False
) -> Row:
    """Text tower alone: TextEncoder forward (512 tokens) -> SigLIP loss against fixed image embeddings -> step."""
    args = ctx.args

    def run(ctx: Context) -> Measurement:
        enc, load_s = ctx.text((mode, dtype))
        used = ctx.precision("bf16")
        model = ChestCTCLIP(FixedEmbeddings(unit_rows(batch, ctx.device, seed=1)), enc, SigLIPLoss().to(ctx.device))
        step = trainer_step(ctx, model, used)
        vocab = text_vocab(ctx)
        tokens = text_batch(ctx, batch, vocab)
        no_images = torch.zeros(batch, 1, dtype=torch.float16, device=ctx.device)  # read by FixedEmbeddings only

        def one_step() -> dict:
            if fresh_reports:  # every step brings reports the frozen-mode cache has not seen
                tokens["text_hash"] = torch.arange(batch, device=ctx.device) + batch * next(_FRESH_REPORTS)
            return step([collated(no_images, tokens)])

        try:
            m = ctx.measure(one_step, batch)
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
                "attn_implementation": "sdpa", "bidirectional": True,
                "grad_clip": step_config("fp32").grad_clip}  # fmt: skip
    if mode == "frozen":
        settings["reports"] = "new each step (LLM forward)" if fresh_reports else "cached (projection only)"
    return Row(section, name, label, batch, "samples/s", run, settings, text_key=(mode, dtype))


# ---------------------------------------------------------------------------------------------------- whole
def best_image_options(ctx: Context, batch: int) -> list[tuple[str, bool]]:
    """(checkpointing, channels_last) candidates for the whole step, fastest measured at this batch first."""
    measured = sorted((r for r in ctx.results if r["section"] == "image" and r["batch"] == batch and r["error"] is None
                       and not r["settings"].get("compile")), key=lambda r: -r["value"])  # fmt: skip
    options = [(r["settings"]["checkpointing"], r["settings"]["channels_last"]) for r in measured]
    for default in (
        ("none", True),
        ("stage", True),
        ("block", True),
    ):  # the order measured on an H100 when nothing is measured yet
        if default not in options:
            options.append(default)
    return options


def whole_model(ctx: Context, text: nn.Module, *, checkpointing: str, channels_last: bool) -> ChestCTCLIP:
    """The trainer's model: a real-size (or --tiny) image tower, the loaded text tower and the SigLIP loss."""
    args = ctx.args
    with ctx.build():
        image = ImageEncoder(in_channels=args.in_channels, depth=args.depth, width=args.width, embed_dim=EMBED_DIM,
                             checkpointing=checkpointing, channels_last=channels_last)  # fmt: skip
        loss_fn = SigLIPLoss()
    return ChestCTCLIP(image, text, loss_fn).to(ctx.device)


def whole_batch(ctx: Context, batch: int) -> dict:
    return collated(random_volumes(ctx, batch, ctx.args.in_channels), text_batch(ctx, batch, text_vocab(ctx)))


def whole_row(ctx: Context, *, batch: int, mode: str, dtype: str) -> Row:
    """Image tower trained + text tower (LoRA or full) + SigLIP loss: the trainer's single-micro-batch step."""
    args = ctx.args

    def attempt(ctx: Context, ckpt: str, cl: bool) -> Measurement:
        torch.backends.cudnn.benchmark = True
        text, load_s = ctx.text((mode, dtype))
        used = ctx.precision("bf16")
        model = whole_model(ctx, text, checkpointing=ckpt, channels_last=cl)
        step = trainer_step(ctx, model, used)
        data = [whole_batch(ctx, batch)]
        try:
            m = ctx.measure(lambda: step(data), batch)
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
    settings = {"in_channels": args.in_channels, "shape_dhw": list(args.shape), "text_train_mode": mode,
                "text_weights_dtype": dtype, "tokens": args.text_tokens, "precision": "bf16", "optimizer": "AdamW fused",
                "image_options": "fastest image row at this batch (OOM: next)"}  # fmt: skip
    return Row("whole", f"whole.image_trained.text_{mode}", f"whole step: image trained (best options) + text "
               f"{text_desc} + SigLIP loss", batch, "volumes/s", run, settings, text_key=(mode, dtype))  # fmt: skip


def original_equivalent_row() -> Row:
    """The original trainer's step time as the sum of its two measured towers (as the baseline measurements add them)."""

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
    """Phase 1 on cached features (`--cache_features`): the trainer's step on a batch of pooled features, which
    runs `ChestCTCLIP(..., pooled=True)` (image projection MLP + text projection), the SigLIP loss and AdamW."""
    args = ctx.args

    def run(ctx: Context) -> Measurement:
        from ct_siglip.text_tower import TextEncoder

        used = ctx.precision("bf16")
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
        model.to(ctx.device)
        step = trainer_step(ctx, model, used)
        data = [{"image_features": img_feat, "text_features": txt_feat}]  # as `feature_cache` batches them
        if ctx.cuda:  # a step takes about a millisecond: more of them for a stable median
            m = ctx.measure(lambda: step(data), batch, warmup=max(args.warmup, 3), steps=max(4 * args.steps, 20))
        else:
            m = ctx.measure(lambda: step(data), batch)
        m.settings = {"precision_used": used, "image_features": image.backbone.out_features, "text_features": hidden}
        return m

    return Row("heads", "heads.cached_features", "heads only on cached features (phase 1): projections + loss + "
               "AdamW", batch, "samples/s", run, {"precision": "bf16", "optimizer": "AdamW fused"})  # fmt: skip
