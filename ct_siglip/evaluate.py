"""Evaluation: validation loss, retrieval both ways, zero-shot AUROC per label; also a CLI.

`python -m ct_siglip.evaluate --checkpoint RUN/step_00001000.pt --csv_file data.csv --split test`
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .config import Config, OneLineParser
from .data import move_batch
from .errors import ConfigError, DataError
from .loaders import build_eval_loader
from .metrics import retrieval_recall, zero_shot_auroc
from .model import load_model_from_checkpoint
from .runlog import MetricsLogger, format_table, tqdm_disable
from .runtime import PRECISION_DTYPES, autocast_factory, resolve_device, resolve_precision

log = logging.getLogger(__name__)


@torch.no_grad()
def compute_embeddings(
    model, loader, device: torch.device, precision: str, *, progress: bool | None = True
) -> dict[str, torch.Tensor]:
    """Image and text embeddings of a whole split (float32, on the CPU), in data-set order, plus the
    mean SigLIP loss over the loader's batches (the same batch size as training, so comparable)."""
    autocast = autocast_factory(device, precision)
    was_training = model.training
    model.eval()
    images, texts, indices, losses, sizes = [], [], [], [], []
    for batch in tqdm(loader, desc="eval", leave=False, disable=tqdm_disable(progress)):
        if "errors" in batch:
            raise_batch_errors(batch)
        x, text = move_batch(batch, device, PRECISION_DTYPES[precision])
        with autocast():
            img, txt, _ = model(x, text, compute_loss=False)
        img, txt = img.float(), txt.float()
        losses.append(float(model.loss_fn(img, txt)))
        sizes.append(len(img))
        images.append(img.cpu())
        texts.append(txt.cpu())
        indices.append(batch["index"])
    model.train(was_training)
    loss = float(np.average(losses, weights=sizes)) if losses else math.nan
    return {"image": torch.cat(images), "text": torch.cat(texts), "index": torch.cat(indices), "loss": loss}


def raise_batch_errors(batch: dict) -> None:
    raise DataError(batch["errors"][0])


def evaluate_embeddings(
    emb: dict[str, torch.Tensor],
    *,
    labels: dict[str, np.ndarray] | None = None,
    encode_text: Callable[[list[str]], torch.Tensor] | None = None,
    prefix: str = "val/",
    scores_out: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Metrics under the spec's names: loss, i2t/t2i R@1/5/10 and zero-shot AUROC per label and mean.

    Also `zeroshot_text_auroc/<label>` (and its mean): the same prompts scoring the *reports'* embeddings. It tells
    where a weak zero-shot label loses: if the prompts cannot find the finding in the reports either, the text
    tower (its reading of the prompts) is at fault, not the image tower; the reports name every finding, so on a
    well-read label it is close to 1.
    """
    out: dict[str, float] = {f"{prefix}loss": emb["loss"]}
    sim = emb["image"] @ emb["text"].T
    out.update({f"{prefix}{k}": v for k, v in retrieval_recall(sim, ks=(1, 5, 10)).items()})
    if labels and encode_text is not None:
        order = emb["index"].numpy()
        ordered = {name: np.asarray(values)[order] for name, values in labels.items()}
        scores: dict[str, np.ndarray] = {}
        prompts: dict[tuple[str, ...], torch.Tensor] = {}

        def encode_once(texts: list[str]) -> torch.Tensor:  # both scorings use the same prompts: encode them once
            key = tuple(texts)
            if key not in prompts:
                prompts[key] = encode_text(texts)
            return prompts[key]

        auroc = zero_shot_auroc(emb["image"], encode_once, ordered, scores_out=scores)
        out.update({f"{prefix}{k}": v for k, v in auroc.items()})
        on_reports = zero_shot_auroc(emb["text"], encode_once, ordered)
        out.update({f"{prefix}{k.replace('zeroshot_auroc', 'zeroshot_text_auroc')}": v for k, v in on_reports.items()})
        if scores_out is not None:  # `score_<label>` / `label_<label>` arrays, as ct_siglip.plots reads them
            scores_out.update({f"score_{k}": v for k, v in scores.items()})
            scores_out.update({f"label_{k}": v for k, v in ordered.items()})
    return out


def text_encoder_fn(model, device: torch.device, autocast, batch_size: int = 64) -> Callable[[list[str]], torch.Tensor]:
    """Encode free texts (prompts) with the model's text tower, in eval mode, without caching them."""

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        outs = []
        for i in range(0, len(texts), batch_size):
            batch = model.text_encoder.tokenize(texts[i : i + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                outs.append(model.encode_text(batch).float().cpu())
        model.train(was_training)
        return torch.cat(outs)

    return encode


def main(argv: list[str] | None = None) -> int:
    """Evaluate a checkpoint of this package on one split of a CSV."""
    p = OneLineParser(description="Evaluate a chest-CT SigLIP checkpoint on one split.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this package (step_*.pt or best.pt)")
    p.add_argument("--csv_file", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--label_columns", nargs="*", default=None, help="default: the run's, or 'auto'")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--text_model", default=None, help="the text base model, when the folder the run used has moved")
    p.add_argument(
        "--out_dir", default=None, help="where metrics.jsonl and the embeddings go (default: beside the checkpoint)"
    )
    p.add_argument("--save_embeddings", action="store_true", help="write image/text embeddings of the split")
    args = p.parse_args(argv)
    try:
        return _evaluate(args)
    except (DataError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, cfg_dict, step = load_model_from_checkpoint(args.checkpoint, device=device, text_model=args.text_model)
    cfg_dict.update(
        csv_file=args.csv_file, train_data_dir=None, demo=False, num_workers=args.num_workers, val_split=args.split
    )
    if args.label_columns is not None:
        cfg_dict["label_columns"] = args.label_columns
    if args.batch_size:
        cfg_dict["eval_batch_size"] = args.batch_size
    cfg = Config.from_dict(cfg_dict)
    precision = resolve_precision(cfg.precision, device)
    autocast = autocast_factory(device, precision)
    loader, table = build_eval_loader(cfg, args.split, model.text_encoder.tokenizer)
    emb = compute_embeddings(model, loader, device, precision)
    labels = {c: table.frame[c].to_numpy() for c in table.label_columns}
    scores: dict[str, np.ndarray] = {}
    metrics = evaluate_embeddings(
        emb,
        labels=labels,
        encode_text=text_encoder_fn(model, device, autocast),
        prefix=f"{args.split}/",
        scores_out=scores,
    )
    out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scores:
        np.savez(out_dir / f"zeroshot_{args.split}.npz", **scores)  # ROC curves: python -m ct_siglip.plots
    MetricsLogger(out_dir, tensorboard=False).log(step, metrics)
    if args.save_embeddings:
        path = out_dir / f"embeddings_{args.split}.pt"
        torch.save(
            {
                "image": emb["image"],
                "text": emb["text"],
                "img_path": [table.frame["path"][i] for i in emb["index"].tolist()],
                "row": [int(table.frame["row"][i]) for i in emb["index"].tolist()],
            },
            path,
        )
        print(f"Embeddings written to {path}")
    print(format_table(metrics, title=f"{args.split} ({len(table)} samples)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
