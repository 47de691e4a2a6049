"""Contrastive pair training (`ct_siglip.simcse`): paraphrases end up nearest each other, the written model is
what the text tower runs, runs are reproducible, and bad input is one line."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ct_siglip import simcse
from ct_siglip.errors import ConfigError
from ct_siglip.text_tower import TextEncoder

FINDINGS = ("pleural effusion", "lung nodule", "cardiomegaly", "emphysema", "atelectasis", "consolidation")
PAIRS = [pair for f in FINDINGS for pair in (
    (f"There is {f}.", f"{f.capitalize()} is present on this study."),
    (f"No {f}.", f"There is no evidence of {f}."),
)]  # fmt: skip
"""Two wordings of each of 12 statements; the wordings share templates across findings, so only the finding
and the negation tell a text's partner from the other texts."""


def _partner_accuracy(folder) -> float:
    """How often a text's nearest second wording (cosine of pooled embeddings) is its own partner."""
    encoder = TextEncoder(str(folder), max_length=32, embed_dim=8).eval()
    with torch.no_grad():
        a = F.normalize(encoder.embed(encoder.tokenize([p[0] for p in PAIRS])), dim=-1)
        b = F.normalize(encoder.embed(encoder.tokenize([p[1] for p in PAIRS])), dim=-1)
    return ((a @ b.T).argmax(dim=1) == torch.arange(len(PAIRS))).float().mean().item()


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_pair_training_brings_paraphrases_together_and_writes_a_model_the_text_tower_loads(tiny_llama_dir, tmp_path):
    out = tmp_path / "paired"
    before = _partner_accuracy(tiny_llama_dir)
    result = simcse.pretrain_pairs(tiny_llama_dir, PAIRS, out, steps=60, batch_size=12, learning_rate=3e-3,
                                   max_length=32, progress=False)  # fmt: skip
    assert result["pairs_loss_last"] < 0.5 * result["pairs_loss_first"]
    after = _partner_accuracy(out)
    assert after >= 0.9 and after > before + 0.3  # measured: 0.5 before (shared words), 1.0 after
    written, source = load_file(str(out / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors"))
    assert written.keys() == source.keys()
    llm = TextEncoder(str(out), max_length=32, embed_dim=8).model.state_dict()
    assert all(torch.equal(llm[k], written[k]) for k in written)  # what was written is what the tower runs


def test_pair_training_is_reproducible(tiny_llama_dir, tmp_path):
    runs = [simcse.pretrain_pairs(tiny_llama_dir, PAIRS, tmp_path / f"r{i}", steps=3, batch_size=4, max_length=32,
                                  progress=False) for i in range(2)]  # fmt: skip
    assert runs[0] == runs[1]
    assert _digest(tmp_path / "r0") == _digest(tmp_path / "r1")


def test_pair_training_refuses_bad_settings_in_one_line(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        simcse.pretrain_pairs(tiny_llama_dir, PAIRS, tmp_path / "x", steps=2, batch_size=1)
    with pytest.raises(ConfigError, match="1 pair"):
        simcse.pretrain_pairs(tiny_llama_dir, [("a", "b"), ("c", " ")], tmp_path / "x", steps=2)
    assert not (tmp_path / "x").exists()


def test_pair_command_trains_on_the_csv_pairs_and_names_a_missing_column(small_csv, tiny_llama_dir, tmp_path, capsys):
    """`python -m ct_siglip.simcse` on (findings, --pair_column) rows; a missing column is one line, exit 2."""
    table = pd.read_csv(small_csv)
    table["impression"] = [f"Impression {i}." for i in range(len(table))]
    table.to_csv(small_csv, index=False)
    out = tmp_path / "paired"
    argv = ["--text_model", str(tiny_llama_dir), "--csv_file", str(small_csv), "--out", str(out), "--steps", "2",
            "--batch_size", "4", "--max_text_length", "32"]  # fmt: skip
    assert simcse.main([*argv, "--pair_column", "impression"]) == 0
    assert "pair training loss" in capsys.readouterr().out
    TextEncoder(str(out), max_length=32, embed_dim=8)  # loads as a text tower
    assert simcse.main([*argv, "--pair_column", "impressions"]) == 2
    assert "no column 'impressions'" in capsys.readouterr().err
