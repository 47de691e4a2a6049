"""Where a run's metrics go (`--report_to`): TensorBoard with the settings as hyperparameters, metrics.jsonl,
Weights & Biases (offline here: it writes local files), a resumed run continuing the same wandb run."""

from __future__ import annotations

import sys

import pytest
from conftest import tiny_args

import siglip_trainer
from ct_siglip.config import Config


def test_use_wandb_adds_wandb_and_none_means_nothing(small_csv):
    assert Config(csv_file=str(small_csv)).reporters() == {"tensorboard", "jsonl"}
    assert Config(csv_file=str(small_csv), use_wandb=True).reporters() == {"tensorboard", "jsonl", "wandb"}
    assert Config(csv_file=str(small_csv), report_to="none").reporters() == set()
    with pytest.raises(Exception, match=r"--report_to: unknown tensorbord \(choose from tensorboard, jsonl, wandb"):
        Config(csv_file=str(small_csv), report_to="tensorbord,jsonl")


def test_tensorboard_gets_the_hyperparameters_and_none_writes_no_metrics(small_csv, tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    assert siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "2")) == 0
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").glob("events.*"))
    assert b"hparams" in events and b"learning_rate" in events and b"train/loss" in events
    quiet = tmp_path / "quiet"
    assert (
        siglip_trainer.main(tiny_args(small_csv, quiet, tiny_llama_dir, "--max_steps", "2", "--report_to", "none")) == 0
    )
    assert not (quiet / "metrics.jsonl").exists() and not (quiet / "tensorboard").exists()
    assert (quiet / "step_00000002.pt").is_file()


def test_wandb_offline_logs_the_metrics_and_a_resumed_run_continues_the_same_run(
    small_csv, tiny_llama_dir, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = ("--use_wandb", "--wandb_project", "chest-ct", "--run_name", "phase1", "--save_interval", "2")
    assert siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "2", *args)) == 0
    run_id = (run / "wandb_run_id").read_text().strip()
    first = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1
    data = (first[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in data and b"train/lr" in data and b"learning_rate" in data and b"phase1" in data
    assert (
        siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "4", "--resume", "auto", *args))
        == 0
    )
    assert (run / "wandb_run_id").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same run id, continued


def test_wandb_missing_is_one_line(small_csv, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert siglip_trainer.main(tiny_args(small_csv, tmp_path / "r", tiny_llama_dir, "--report_to", "wandb")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --report_to wandb: the wandb package is not installed; pip install wandb"
