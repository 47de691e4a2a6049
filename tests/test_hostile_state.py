"""Run state under hostile conditions: a disk that fills up while logging, checkpoints that are all damaged or
lost their manifest, settings changed on resume, files that are not checkpoints of this package, torn log
files. Each is one line and an exit status, nothing half-written, and nothing already trained is lost."""

from __future__ import annotations

import errno
import json
import re

import pandas as pd
import pytest
import torch
from conftest import tiny_args, write_npz
from test_hostile_inputs import damage, error_lines, make_csv

import siglip_trainer
from ct_siglip import checkpoint as ckpt
from ct_siglip import demo, runlog
from ct_siglip.runlog import read_metrics
from ct_siglip.step import lr_factor

ARGS = ("--val_split", "", "--save_interval", "2")


def train_steps(run) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


def run_main(csv, run, llama, *extra) -> int:
    return siglip_trainer.main(tiny_args(csv, run, llama, *ARGS, *extra))


def flip_a_byte(path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ a disk that fills up
class _FullDisk:
    """A file whose writes stop half-way with ENOSPC once `after` bytes went through: what a full disk does."""

    def __init__(self, f, budget: list[int]):
        self.f, self.budget = f, budget

    def write(self, data: bytes) -> int:
        if len(data) > self.budget[0]:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget[0] -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_logging_is_one_line_saves_the_step_and_leaves_no_torn_line(
    tmp_path, tiny_llama_dir, monkeypatch, capsys
):
    """Before: an OSError traceback from the logger, a torn last line in metrics.jsonl, the unsaved steps lost."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    real_open, budget = open, [0]

    def open_on_a_filling_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            return _FullDisk(f, budget)
        return f

    budget[0] = 1  # step 1's record does not fit
    monkeypatch.setattr(runlog, "open", open_on_a_filling_disk, raising=False)
    code = run_main(csv, run, tiny_llama_dir, "--max_steps", "6", "--save_interval", "100")
    (err,) = error_lines(capsys.readouterr().err)
    assert code == 1 and "could not write" in err and "metrics.jsonl at step 1 (No space left on device)" in err
    assert "--resume auto" in err
    assert (run / "metrics.jsonl").read_bytes() == b""  # the half-written record was cut back
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001.pt"]  # the step is kept
    monkeypatch.undo()
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "3", "--resume", "auto") == 0
    assert train_steps(run) == [2, 3]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_auto_refuses_when_every_checkpoint_is_damaged(tmp_path, tiny_llama_dir, capsys):
    """Before: started again from step 0, exit 0, steps 1-4 logged twice."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "4") == 0
    for p in ckpt.list_checkpoints(run):
        flip_a_byte(p)
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "4", "--resume", "auto") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "holds 2 checkpoints but none is intact" in err and "SHA-256 differs" in err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once_when_started_again(tmp_path, tiny_llama_dir):
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    run.mkdir()
    # what a run killed at step 3, before any checkpoint, leaves behind (its last line torn by the kill)
    records = [json.dumps({"step": s, "time": 0.0, "train/loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(records) + '{"step": 4, "tim')
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "3", "--save_interval", "100", "--resume", "auto") == 0
    assert train_steps(run) == [1, 2, 3]
    assert all(line.endswith("}") for line in (run / "metrics.jsonl").read_text().splitlines())


def test_a_checkpoint_without_its_manifest_is_checked_by_its_own_checksums(tmp_path, tiny_llama_dir, capsys):
    """Before: `--resume PATH` of a file whose manifest was deleted loaded it unchecked, flipped bit and all."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "2") == 0
    path = run / "step_00000002.pt"
    ckpt.manifest_path(path).unlink()
    assert ckpt.verify_checkpoint(path) is None  # intact: its records' CRC-32s all match
    flip_a_byte(path)
    capsys.readouterr()
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "4", "--resume", str(path)) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "checkpoint is damaged (no manifest, and record" in err and "fails its CRC-32 check" in err


def test_changed_training_settings_are_applied_on_resume_and_said_in_one_line(tmp_path, tiny_llama_dir):
    """Before: a new --learning_rate was ignored while config.json recorded it; --warmup_steps applied silently."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "2") == 0
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "4", "--learning_rate", "5e-4", "--resume", "auto") == 0
    log = (run / "train.log").read_text()
    assert "resuming with new training settings, applied from step 3: --learning_rate 0.001 -> 0.0005; " in log
    assert "--max_steps 2 -> 4" in log
    lr = {r["step"]: r["train/lr"] for r in read_metrics(run / "metrics.jsonl") if "train/lr" in r}
    # train/lr is the rate of the next step: base x warm-up (2 steps) + cosine to step 4
    assert lr[3] == pytest.approx(5e-4 * lr_factor(3, 2, 4, 0.0), rel=1e-12)
    assert json.loads((run / "config.json").read_text())["learning_rate"] == 5e-4


def test_allow_config_change_cannot_change_what_the_saved_tensors_are(tmp_path, tiny_llama_dir, capsys):
    """Before: a size-mismatch traceback from load_state_dict."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "2") == 0
    capsys.readouterr()
    args = ("--max_steps", "4", "--resume", "auto", "--allow_config_change")
    assert run_main(csv, run, tiny_llama_dir, *args, "--image_width", "8") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "--image_width 4 -> 8" in err and "not even --allow_config_change" in err and "--init_from" in err
    assert run_main(csv, run, tiny_llama_dir, *args, "--text_train", "frozen") == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "--text_train 'full' -> 'frozen'" in err


def test_files_that_are_not_checkpoints_of_this_package_are_one_line(tmp_path, tiny_llama_dir, capsys):
    """Before: KeyError / size-mismatch tracebacks for --resume and --init_from of other files."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "2") == 0
    weights = ckpt.load_checkpoint(run / "step_00000002.pt")["model"]
    torch.save(weights, tmp_path / "weights_only.pt")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other_model.pt")
    capsys.readouterr()
    assert (
        run_main(
            csv, tmp_path / "r2", tiny_llama_dir, "--max_steps", "2", "--resume", str(tmp_path / "weights_only.pt")
        )
        == 2
    )
    (err,) = error_lines(capsys.readouterr().err)
    assert "needs a checkpoint written by this package" in err and "--init_from" in err
    assert (
        run_main(
            csv, tmp_path / "r3", tiny_llama_dir, "--max_steps", "2", "--init_from", str(tmp_path / "other_model.pt")
        )
        == 2
    )
    (err,) = error_lines(capsys.readouterr().err)
    assert re.search(r"do not fit this model: \d+ missing \(.*\); 1 unexpected \(encoder\.weight\)", err)
    # a bare state dict of this model is a valid starting point
    assert (
        run_main(
            csv, tmp_path / "r4", tiny_llama_dir, "--max_steps", "2", "--init_from", str(tmp_path / "weights_only.pt")
        )
        == 0
    )


# ------------------------------------------------------------------------------------------------- bad data
def test_max_bad_fraction_1_never_stops_the_run(tmp_path, tiny_llama_dir):
    """Before: replacement draws that were bad too counted as bad samples, and 1.0 still aborted."""
    csv = make_csv(tmp_path, 8)
    for i in range(6):
        damage(tmp_path / "vols" / f"case{i:02d}.npz", "corrupt deflate data")
    args = ("--max_steps", "4", "--on_bad_sample", "skip", "--max_bad_fraction", "1.0", "--no-preflight")
    assert run_main(csv, tmp_path / "run", tiny_llama_dir, *args) == 0
    assert len(pd.read_csv(tmp_path / "run" / "bad_samples.csv")) > 4 * 4  # more bad draws than samples seen


def test_a_torn_byte_in_bad_samples_csv_does_not_stop_the_resume(tmp_path, tiny_llama_dir):
    """Before: UnicodeDecodeError while truncating the file on resume."""
    csv = make_csv(tmp_path, 8)
    damage(tmp_path / "vols" / "case01.npz", "zip member that is not an npy")
    run = tmp_path / "run"
    args = ("--on_bad_sample", "skip", "--max_bad_fraction", "0.5")
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "2", *args) == 0
    with open(run / "bad_samples.csv", "ab") as f:
        f.write(b"3,/data/vol\xff\xfe")  # a record torn mid-write
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "4", *args, "--resume", "auto") == 0
    assert train_steps(run) == [1, 2, 3, 4]
    assert b"\xff" not in (run / "bad_samples.csv").read_bytes()


def test_demo_with_the_users_csv_reads_it_like_the_trainer(tmp_path, capsys):
    """Before: `--demo --csv_file X` raised KeyError: 'findings_paraphrase'; an empty CSV, EmptyDataError."""
    (tmp_path / "empty.csv").write_text("")
    assert (
        siglip_trainer.main(["--demo", "--csv_file", str(tmp_path / "empty.csv"), "--save_dir", str(tmp_path / "r")])
        == 2
    )
    (err,) = error_lines(capsys.readouterr().err)
    assert "empty.csv: CSV file is empty" in err
    write_npz(tmp_path / "a.npz")
    write_npz(tmp_path / "b.npz")
    pd.DataFrame({"img_path": ["a.npz", "b.npz"], "findings": ["Left effusion.", "No effusion."],
                  "split": ["train", "test"]}).to_csv(tmp_path / "d.csv", index=False)  # fmt: skip
    values = demo.demo_values(siglip_trainer.parse_config(["--demo"]), ["--demo"])
    values["csv_file"] = str(tmp_path / "d.csv")
    corpus, pairs, train_reports = demo.text_pretraining_data(values)
    assert pairs == [] and train_reports == ["Left effusion."] and corpus[:2] == ["Left effusion.", "No effusion."]


def test_a_start_only_setting_changed_on_resume_is_kept_and_said_and_config_json_stays_true(tmp_path, tiny_llama_dir):
    """--temperature only sets t at the start: a resumed run's t comes from the checkpoint. Before, the new value
    was silently ignored while config.json recorded it."""
    csv = make_csv(tmp_path, 8)
    run = tmp_path / "run"
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "2") == 0
    assert run_main(csv, run, tiny_llama_dir, "--max_steps", "4", "--temperature", "0.5", "--resume", "auto") == 0
    log = (run / "train.log").read_text()
    assert "not applied on resume (the checkpoint's weights hold them): --temperature 0.5 (kept 0.1)" in log
    assert json.loads((run / "config.json").read_text())["temperature"] == 0.1
