"""MNTP pretraining (`ct_siglip.mntp`): it learns, writes a model the text tower loads, is reproducible, and
never publishes a half-written folder."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from ct_siglip import mntp
from ct_siglip.text_tower import TextEncoder

REPORTS = [
    f"There is {'no' if i % 2 else 'a'} {f}. {'Small' if i % 3 else 'Large'} {side} finding."
    for i in range(24)
    for f, side in (("pleural effusion", "left"), ("lung nodule", "right"))
]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_mntp_learns_the_reports_and_writes_a_model_the_text_tower_loads(tiny_llama_dir, tmp_path):
    before = _digest(tiny_llama_dir)
    out = tmp_path / "adapted"
    result = mntp.pretrain_mntp(tiny_llama_dir, REPORTS, out, steps=40, batch_size=16, learning_rate=3e-3,
                                progress=False)  # fmt: skip
    assert result["mntp_loss_last"] < 0.7 * result["mntp_loss_first"]  # masked tokens become predictable
    assert _digest(tiny_llama_dir) == before  # the source model is left as it was
    adapted, source = load_file(str(out / "model.safetensors")), load_file(str(tiny_llama_dir / "model.safetensors"))
    assert adapted.keys() == source.keys()  # the base model's layout: no LM head, no "model." prefix
    assert any(not torch.equal(adapted[k], source[k]) for k in source)
    encoder = TextEncoder(str(out), max_length=32, embed_dim=8)
    llm = encoder.model.state_dict()
    assert all(torch.equal(llm[k], adapted[k]) for k in adapted)  # what was written is what the tower runs
    for name in ("tokenizer.json", "config.json"):
        assert _digest(out)[name] == before[name]


def test_mntp_is_reproducible(tiny_llama_dir, tmp_path):
    runs = [mntp.pretrain_mntp(tiny_llama_dir, REPORTS, tmp_path / f"r{i}", steps=3, batch_size=8, progress=False)
            for i in range(2)]  # fmt: skip
    assert runs[0] == runs[1]
    assert _digest(tmp_path / "r0") == _digest(tmp_path / "r1")


def test_an_interrupted_mntp_leaves_no_folder_that_looks_finished(tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "adapted"
    with pytest.raises(OSError, match="No space left"):
        mntp.pretrain_mntp(tiny_llama_dir, REPORTS, out, steps=2, batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary build remains


def test_mntp_refuses_bad_settings_in_one_line(tiny_llama_dir, tmp_path):
    from ct_siglip.errors import ConfigError

    with pytest.raises(ConfigError, match="mask_probability"):
        mntp.pretrain_mntp(tiny_llama_dir, REPORTS, tmp_path / "x", steps=2, mask_probability=1.5)
    with pytest.raises(ConfigError, match="no non-empty text"):
        mntp.pretrain_mntp(tiny_llama_dir, ["", "  "], tmp_path / "x", steps=2)


def test_mntp_command_reads_one_split_of_the_csv(small_csv, tiny_llama_dir, tmp_path, capsys):
    """`python -m ct_siglip.mntp`: the training split's reports only; bad input is one line, exit status 2."""
    out = tmp_path / "adapted"
    argv = ["--text_model", str(tiny_llama_dir), "--csv_file", str(small_csv), "--out", str(out), "--steps", "2",
            "--batch_size", "4", "--max_text_length", "32"]  # fmt: skip
    assert mntp.main(argv) == 0
    assert "MNTP loss" in capsys.readouterr().out
    TextEncoder(str(out), max_length=32, embed_dim=8)  # loads as a text tower
    assert mntp.main([*argv[:-6], "--split", "nosuchsplit", *argv[-6:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nosuchsplit" in err
