"""Supervised contrastive text training on pairs of texts that say the same thing: LLM2Vec's third step.

After bidirectional attention and MNTP (`ct_siglip.mntp`), LLM2Vec trains the pooled embedding contrastively
(SimCSE): each text should be nearest to its partner among all texts of the batch. The supervised variant takes
partners that are paraphrases (two readings of one study, or a report's findings and its impression), so the
embedding keeps what the texts mean and drops how they are worded. For the CLIP step this matters from the
first step: early on the image tower is pulled toward the text embeddings' differences between reports, and
those should be differences in findings, not in phrasing. On the demo's synthetic reports, 100 steps raise the
share of the pooled embedding's variance that the finding labels explain from 0.15 (MNTP alone) to 0.60.

The loss is llm2vec's own (`llm2vec.loss.HardNegativeNLLLoss`, in-batch negatives, scale 20 = temperature
0.05); texts are tokenised and pooled by `TextEncoder`, exactly as the CLIP text tower will. Full fine-tuning in
float32, meant for small models and CPU runs (the demo); for a billion-parameter model use LLM2Vec's scripts.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .runlog import tqdm_disable

log = logging.getLogger("ct_siglip")


def pretrain_pairs(
    folder: str | os.PathLike,
    pairs: list[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    steps: int = 100,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    scale: float = 20.0,
    max_length: int = 128,
    instruction: str | None = None,
    seed: int = 0,
    progress: bool | None = True,
) -> dict[str, float]:
    """Train the model in `folder` so that each text of `pairs` embeds nearest to its partner; write it to `out_dir`.

    `out_dir` is published whole by one rename (as `pretrain_mntp` does). Returns the mean loss over the first
    and the last tenth of the steps.
    """
    from llm2vec.loss.HardNegativeNLLLoss import HardNegativeNLLLoss

    from .mntp import warmup_cosine, write_model
    from .text_tower import TextEncoder

    if steps < 1 or batch_size < 2:
        raise ConfigError(f"pair training needs steps >= 1 and batch_size >= 2 (got {steps}, {batch_size})")
    pairs = [(a, b) for a, b in pairs if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()]
    if len(pairs) < 2:
        raise ConfigError(f"pair training: {len(pairs)} pair(s) of non-empty texts; it needs at least 2")
    src = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TextEncoder(str(src), max_length=max_length, instruction=instruction, embed_dim=1,
                              torch_dtype=torch.float32, gradient_checkpointing=False)  # fmt: skip
    encoder.train()
    params = [p for p in encoder.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)
    loss_fn = HardNegativeNLLLoss(scale=scale)
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(pairs))
    losses: list[float] = []
    for _ in tqdm(range(steps), desc="pairs", disable=tqdm_disable(progress), dynamic_ncols=True):
        rows = rng.choice(len(pairs), size=size, replace=False)  # no pair twice: its copy would be a false negative
        first = encoder.embed(encoder.tokenize([pairs[i][0] for i in rows]))
        second = encoder.embed(encoder.tokenize([pairs[i][1] for i in rows]))
        loss = loss_fn(first, second)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    tail = max(1, steps // 10)
    result = {"pairs_loss_first": float(np.mean(losses[:tail])), "pairs_loss_last": float(np.mean(losses[-tail:]))}
    write_model(src, Path(out_dir), encoder.model)
    log.info("pair training: %d steps, loss %.3f -> %.3f; model in %s", steps, *result.values(), out_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m ct_siglip.simcse --text_model DIR --csv_file data.csv --pair_column impressions --out DIR`."""
    import pandas as pd

    from .errors import DataError
    from .mntp import pretrain_parser
    from .tables import read_csv_table

    p = pretrain_parser(__doc__.splitlines()[0], steps=100, learning_rate=1e-3,
                        out_help="folder for the trained model (use it as --text_model)")  # fmt: skip
    p.add_argument("--pair_column", required=True, help="the column whose text says what the findings column says")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        table = read_csv_table(args.csv_file, args.split, findings_column=args.findings_column)
        columns = list(pd.read_csv(args.csv_file, nrows=0).columns)
        if args.pair_column not in columns:
            raise DataError(f"no column '{args.pair_column}' (columns: {', '.join(columns)})", path=args.csv_file,
                            hint="name the column of partner texts with --pair_column")  # fmt: skip
        partner = pd.read_csv(args.csv_file, usecols=[args.pair_column], dtype=str, keep_default_na=False)
        # table rows are numbered from 1 over the CSV's data rows; a blank partner drops its pair
        pairs = list(zip(table.frame["text"], partner[args.pair_column].to_numpy()[table.frame["row"] - 1]))
        result = pretrain_pairs(
            args.text_model, pairs, args.out, steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.learning_rate, max_length=args.max_text_length, instruction=args.text_instruction,
            seed=args.seed,
        )  # fmt: skip
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"pair training loss {result['pairs_loss_first']:.3f} -> {result['pairs_loss_last']:.3f}; model in {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
