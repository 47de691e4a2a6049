"""Shared test set-up: offline, few threads, deterministic."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# One intra-op thread: the tiny models gain nothing from more, and loader workers need the other core.
torch.set_num_threads(1)


import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402


def write_npz(path, shape=(2, 8, 16, 16), seed=0, dtype=np.float16, key="image"):
    """A random volume in [0, 1] saved as NPZ (the data contract)."""
    rng = np.random.default_rng(seed)
    np.savez(path, **{key: rng.random(shape).astype(dtype)})
    return path


@pytest.fixture
def small_csv(tmp_path):
    """12 train / 4 val rows, relative image paths, reports that name the sample."""
    vol_dir = tmp_path / "vols"
    vol_dir.mkdir()
    rows = []
    for i in range(16):
        write_npz(vol_dir / f"case{i:02d}.npz", seed=i)
        rows.append(
            {
                "img_path": f"vols/case{i:02d}.npz",
                "findings": f"Report number {i}.",
                "split": "train" if i < 12 else "val",
                "Lung nodule": i % 2,
            }
        )
    csv = tmp_path / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama with a tokenizer trained on the spot, loadable by llm2vec."""
    from ct_siglip.tiny_models import build_tiny_llama

    corpus = [
        f"Report number {i}. There is a {w} finding in the {s} lung."
        for i in range(40)
        for w, s in (("small", "left"), ("large", "right"))
    ]
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"), corpus, hidden_size=32, num_layers=2, num_heads=4, vocab_size=300, seed=0
    )


def tiny_args(csv, save_dir, text_dir, *extra):
    """CLI arguments of a tiny, fast CPU run."""
    return [
        "--csv_file",
        str(csv),
        "--save_dir",
        str(save_dir),
        "--text_model",
        str(text_dir),
        "--image_depth",
        "14",
        "--image_width",
        "4",
        "--image_weights",
        "none",
        "--embed_dim",
        "16",
        "--max_text_length",
        "32",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "2",
        "--log_interval",
        "1",
        "--eval_interval",
        "0",
        "--precision",
        "fp32",
        "--no-text_checkpointing",
        *extra,
    ]


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc), to reach loader workers and torchrun's ranks."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return sorted(out)
