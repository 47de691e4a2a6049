"""Masked next-token prediction (MNTP): LLM2Vec's second step, adapting a decoder LLM to a report corpus.

LLM2Vec turns a decoder into an encoder in three steps: enable bidirectional attention, train it with MNTP
(mask some tokens, predict each masked token from the position before it, as a causal LM head would), then
(optionally) contrastive sentence training. The released LLM2Vec models have done this already. A model that has
not (the demo's random Llama, or a base LLM adapted to a new report style) learns the report language here
before the CLIP training asks its pooled states to carry meaning: for the demo's text tower this is the
difference between reading "no" and not (see README_SIGLIP_TRAINING.md, "The demo run").

Model and masking come from the libraries LLM2Vec itself uses: `llm2vec.models.LlamaBiForMNTP` (the
bidirectional Llama with a causal-LM head, whose shifted loss is exactly MNTP) and transformers'
`DataCollatorForLanguageModeling` (80 % mask token, 10 % random, 10 % kept), with LLM2Vec's Llama mask token "_".
The texts are formatted as the text tower formats them (separator, instruction), so MNTP sees what CLIP
training will. Full fine-tuning, in float32: meant for small models and CPU runs; adapt a billion-parameter
model with LLM2Vec's own LoRA scripts on a GPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .runlog import tqdm_disable

log = logging.getLogger("ct_siglip")

MASK_TOKEN = "_"
"""LLM2Vec's mask token for Llama models (`mask_token_type="blank"` in its MNTP script): Llama has none."""


def pretrain_mntp(
    folder: str | os.PathLike,
    texts: list[str],
    out_dir: str | os.PathLike,
    *,
    steps: int = 200,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    mask_probability: float = 0.2,
    max_length: int = 128,
    instruction: str | None = None,
    seed: int = 0,
    progress: bool | None = True,
) -> dict[str, float]:
    """MNTP-train the Llama in `folder` on `texts`; write the adapted model (config, tokenizer, weights) to `out_dir`.

    `out_dir` is written whole or not at all (built beside it, then renamed), so an interrupted run never leaves
    a half-trained model that a later run would take for finished. Returns the first and last losses (the mean
    over the first and last tenth of the steps).
    """
    from llm2vec.models import LlamaBiForMNTP
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling
    from transformers.utils import logging as hf_logging

    from .text_tower import TextTokenizer

    if steps < 1 or batch_size < 1 or not 0.0 < mask_probability < 1.0:
        raise ConfigError(f"MNTP needs steps >= 1, batch_size >= 1 and 0 < mask_probability < 1 (got {steps}, "
                          f"{batch_size}, {mask_probability})")  # fmt: skip
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ConfigError("MNTP: no non-empty text to train on")
    src, out = Path(folder), Path(out_dir)
    hf_tok = AutoTokenizer.from_pretrained(src)
    if MASK_TOKEN not in hf_tok.get_vocab():
        raise ConfigError(f"MNTP: the tokenizer in {src} has no '{MASK_TOKEN}' token to mask with")
    hf_tok.mask_token = MASK_TOKEN
    formatter = TextTokenizer(hf_tok, max_length=max_length, instruction=instruction)
    collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=mask_probability)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new LM head is "newly initialized": expected, not worth a warning
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaBiForMNTP.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(verbosity)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the collator masks with the global generator
        for _ in tqdm(range(steps), desc="MNTP", disable=tqdm_disable(progress), dynamic_ncols=True):
            batch = [texts[i] for i in rng.integers(0, len(texts), batch_size)]
            enc = hf_tok([formatter.format(t) for t in batch], truncation=True, max_length=max_length)
            # left-padded like the text tower's batches; special tokens and padding are never masked or predicted
            inputs = collator(
                [{"input_ids": i, "attention_mask": a} for i, a in zip(enc["input_ids"], enc["attention_mask"])]
            )
            loss = model(**inputs).loss  # LlamaForCausalLM's shifted loss: masked token i from position i - 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    tail = max(1, steps // 10)
    result = {"mntp_loss_first": float(np.mean(losses[:tail])), "mntp_loss_last": float(np.mean(losses[-tail:]))}
    write_model(src, out, model.model)
    log.info("MNTP: %d steps, loss %.3f -> %.3f; model in %s", steps, *result.values(), out)
    return result


def write_model(src: Path, out: Path, base: torch.nn.Module) -> None:
    """`src`'s files with the adapted base-model weights, published by one rename."""
    from safetensors import torch as st

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
        state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
        st.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a failure; after the rename there is nothing left


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The text pretraining schedule (MNTP and pairs): linear warm-up over a tenth of `steps`, cosine to 0."""
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )


def pretrain_parser(description: str, *, steps: int, learning_rate: float, out_help: str):
    """The arguments the text pretraining commands share (model, CSV split, output, optimisation, text format)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--text_model", required=True, help="folder of a Llama-family model and its tokenizer")
    p.add_argument("--csv_file", required=True, help="CSV with img_path, findings, split (only texts are read)")
    p.add_argument("--split", default="train", help="the split whose rows are read (never the test split)")
    p.add_argument("--findings_column", default="findings")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--max_text_length", type=int, default=512)
    p.add_argument("--text_instruction", default=None, help="the --text_instruction the CLIP run will use")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m ct_siglip.mntp --text_model DIR --csv_file data.csv --out DIR`: MNTP on a split's reports."""
    from .errors import DataError
    from .tables import read_csv_table

    p = pretrain_parser(__doc__.splitlines()[0], steps=200, learning_rate=2e-3,
                        out_help="folder for the adapted model (use it as --text_model)")  # fmt: skip
    p.add_argument("--mask_probability", type=float, default=0.2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        table = read_csv_table(args.csv_file, args.split, findings_column=args.findings_column)
        result = pretrain_mntp(
            args.text_model, list(table.frame["text"]), args.out, steps=args.steps, batch_size=args.batch_size,
            learning_rate=args.learning_rate, mask_probability=args.mask_probability,
            max_length=args.max_text_length, instruction=args.text_instruction, seed=args.seed,
        )  # fmt: skip
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MNTP loss {result['mntp_loss_first']:.3f} -> {result['mntp_loss_last']:.3f}; model in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
