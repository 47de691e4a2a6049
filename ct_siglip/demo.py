"""`--demo`: the whole job on a generated synthetic chest-CT set with tiny towers, no download.

The demo's settings live here (one dict), applied under whatever flags the user gave explicitly, so
`--demo --max_steps 50 --save_dir /tmp/x` shrinks or moves the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from .config import Config, build_parser
from .runlog import bars
from .synthetic import PARAPHRASE_COLUMN

DEMO_CASES = 4000  # generated in ~12-17 s on 2 cores; 3200 training cases, so 850 steps of 32 see each about 8.5 times
DEMO_SHAPE = (16, 48, 48)  # (D, H, W): lesions are drawn at least 3 slices and 5 voxels wide, so they stay visible
DEMO_SPLITS = (("train", 0.8), ("test", 0.2))
"""No separate validation split: the one evaluation, at the end, is on `test` (held out, never used to choose)."""

TEXT_MODEL = {"hidden_size": 64, "num_layers": 2, "lowercase": True, "prefix_space": True}
"""The tiny Llama built for the demo (`build_tiny_llama` arguments): uncased, so "No" and "no" are one token."""

MNTP = {"steps": 150, "batch_size": 64, "learning_rate": 2e-3, "mask_probability": 0.2}
"""LLM2Vec's MNTP step on the training reports (`ct_siglip.mntp`), ~20 s: without it the random Llama learns the
report language (what "no" does) at CLIP speed; measured +0.10 mean zero-shot AUROC (0.70 -> 0.80)."""

PAIRS = {"steps": 100, "batch_size": 64, "learning_rate": 1e-3}
"""LLM2Vec's supervised contrastive step (`ct_siglip.simcse`) on pairs of reports of the same training case, ~20 s:
the pooled embedding comes to differ between reports by their findings, not their wording (see the guide)."""

DEMO_SETTINGS = {
    "image_depth": 14,
    "image_width": 8,
    "image_weights": "none",
    "in_channels": 2,
    "text_train": "full",
    "max_text_length": 128,
    "text_checkpointing": False,
    "embed_dim": 128,
    "temperature": 0.05,  # t = 20 at the start: leaves the collapsed phase sooner; emphysema 0.58 -> 0.95-0.99
    "batch_size": 32,
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "warmup_steps": 40,
    "max_steps": 850,
    "channels_last": True,  # about 1.5x faster 3D convolutions on CPU too
    "freeze_image_stem": True,  # conv1's weight gradient was a third of the step; a random 7x7x3 stem serves
    "sentence_sampling": 0.8,  # most reports as random sentence subsets: prompts are single sentences (0.5: 0.78, 1.0: 0.73)
    # the report-pair loss during CLIP: without it the text tower drops findings the image tower has not picked up
    # yet (emphysema, cardiomegaly, lymphadenopathy, by run), and the image tower then never gets their signal;
    # mean zero-shot AUROC 0.851 -> 0.92 (a step costs 1.3x, hence 850 steps instead of 1,150)
    "text_pair_column": PARAPHRASE_COLUMN,
    "text_pair_weight": 0.5,
    "num_workers": 1,
    "log_interval": 25,
    "eval_interval": 0,
    "save_interval": 850,
    "label_columns": ["auto"],
    "val_split": "test",
    "save_dir": "runs/demo",
    "precision": "fp32",
    "best_metric": "val/zeroshot_auroc_mean",
}


def cache_dir() -> Path:
    return Path(os.environ.get("CT_SIGLIP_CACHE", Path.home() / ".cache" / "ct_siglip")).expanduser()


def explicit_flags(argv: list[str] | None) -> set[str]:
    """Names of the flags the user typed (so the demo does not override them)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    ns, _ = parser.parse_known_args(argv)
    return set(vars(ns))


def demo_config(cfg: Config, argv: list[str] | None = None) -> Config:
    """Generate (or reuse) the synthetic set and the tiny text model; return the demo's config.

    A `--csv_file` or `--text_model` typed with `--demo` is used instead of the generated one (and not built).
    """
    from .synthetic import generate_dataset

    root = cache_dir() / "demo"
    explicit = explicit_flags(argv)
    values = demo_values(cfg, argv)
    values.update(train_data_dir=None, demo=True)
    if "csv_file" not in explicit:
        print(f"Demo: synthetic chest CT set and tiny models under {root}")
        values["csv_file"] = str(generate_dataset(
            root / "data", n=DEMO_CASES, shape=DEMO_SHAPE, seed=0, splits=DEMO_SPLITS,
            workers=max(1, os.cpu_count() or 1),
        ))  # fmt: skip
    elif "text_pair_column" not in explicit:  # the user's CSV has no generated paraphrase column
        values["text_pair_column"] = None
        if "text_pair_weight" not in explicit:
            values["text_pair_weight"] = 0.0
    if "text_model" not in explicit:
        corpus, pairs, train_reports = text_pretraining_data(values)
        # keyed on the texts, the model's size and both pretraining steps: a changed generator or setting never
        # reuses a stale model
        parts = [TEXT_MODEL, MNTP, PAIRS, corpus, pairs] + ([] if pairs else [train_reports])
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
        text_dir = root / f"tiny_llama_{key}"
        if not (text_dir / "config.json").is_file():  # the folder is published whole, by one rename
            build_text_model(text_dir, corpus, pairs, train_reports, progress=bars(values["progress"]))
        values["text_model"] = str(text_dir)
    return Config(**values)


def text_pretraining_data(values: dict) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """The tokenizer's corpus (every report, and the prompts), the report pairs of the training split (the
    paraphrase column; none in a CSV without one) and the training reports. A CSV the trainer could not read
    stops here, in one line."""
    import pandas as pd

    from .synthetic import FINDINGS
    from .tables import read_csv_table

    csv, findings, split = values["csv_file"], values["findings_column"], values["split_column"]
    read_csv_table(csv, values["train_split"], img_path_column=values["img_path_column"], findings_column=findings,
                   split_column=split, missing_report_text=values["missing_report_text"])  # fmt: skip
    table = pd.read_csv(csv)
    reports = table[findings].astype(str).tolist()
    train = table[table[split].astype(str) == values["train_split"]]  # the text pretraining never reads the test split
    pairs = []
    if PARAPHRASE_COLUMN in table.columns:
        pairs = list(zip(train[findings].astype(str), train[PARAPHRASE_COLUMN].astype(str)))
    corpus = reports + [f"There is {f.lower()}." for f in FINDINGS] + [f"There is no {f.lower()}." for f in FINDINGS]
    return corpus, pairs, train[findings].astype(str).tolist()


def demo_values(cfg: Config, argv: list[str] | None) -> dict:
    """`cfg`'s values with the demo's settings laid under the flags the user typed (`--no-X` turns one off)."""
    values = cfg.to_dict()
    explicit = explicit_flags(argv)
    values.update({k: v for k, v in DEMO_SETTINGS.items() if k not in explicit})
    return values


def build_text_model(
    text_dir: Path,
    corpus: list[str],
    pairs: list[tuple[str, str]],
    train_reports: list[str] | None = None,
    *,
    progress: bool | None = None,
) -> Path:
    """The demo's text tower the LLM2Vec way: a random tiny Llama (tokenizer trained on `corpus`), MNTP on the
    training reports, then contrastive training on `pairs` (two reports of one training case)."""
    import tempfile

    from .mntp import pretrain_mntp
    from .simcse import pretrain_pairs
    from .tiny_models import build_tiny_llama

    # the fast tokenizer's thread pool, used here, would be forked into the loader workers (a warning, no gain)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    text_dir.parent.mkdir(parents=True, exist_ok=True)
    length = DEMO_SETTINGS["max_text_length"]
    with tempfile.TemporaryDirectory(dir=text_dir.parent, prefix=".random_llama-") as tmp:
        random_dir = build_tiny_llama(Path(tmp) / "model", corpus, seed=0, **TEXT_MODEL)
        print(f"Demo: MNTP pretraining of the tiny text model ({MNTP['steps']} steps)")
        reports = [a for a, _ in pairs] or train_reports  # a CSV without pairs: MNTP on its training reports
        pretrain_mntp(random_dir, reports, Path(tmp) / "mntp", max_length=length, progress=progress, **MNTP)
        if pairs:
            print(f"Demo: contrastive pretraining on report pairs ({PAIRS['steps']} steps)")
            pretrain_pairs(Path(tmp) / "mntp", pairs, text_dir, max_length=length, progress=progress, **PAIRS)
        else:
            os.replace(Path(tmp) / "mntp", text_dir)
    return text_dir


def print_demo_summary(cfg: Config, metrics: dict[str, float], target: float = 0.90) -> None:
    from .runlog import format_table

    rows = {k.removeprefix("val/"): v for k, v in metrics.items() if "zeroshot_auroc" in k or "R@" in k}
    print(format_table(rows, title=f"Demo results (held-out split '{cfg.val_split}')"))
    mean = metrics.get("val/zeroshot_auroc_mean")
    if mean is not None:
        verdict = "reached" if mean >= target else "below"
        print(f"Mean zero-shot AUROC {mean:.3f} ({verdict} the {target:.2f} target). Run folder: {cfg.save_dir}")
    on_reports = metrics.get("val/zeroshot_text_auroc_mean")
    if on_reports is not None:  # the prompts scoring the reports: how well the text tower reads them
        print(f"The same prompts on the held-out reports' own embeddings: mean AUROC {on_reports:.3f}")
