"""The command line as a user meets it: settings from a file, a batch job's log without progress bars, and the
mistakes users make, each one line, never a traceback or a page of usage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

import siglip_trainer
from ct_siglip.evaluate import main as evaluate_main
from ct_siglip.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_file_gives_the_settings_and_flags_given_too_win(small_csv, tiny_llama_dir, tmp_path):
    (tmp_path / "run.yaml").write_text("batch_size: 2\nmax_steps: 5\nlearning_rate: 0.002\nlabel_columns: [auto]\n")
    run = tmp_path / "run"
    args = tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "2", "--eval_interval", "0")
    for flag in ("--batch_size", "--learning_rate"):  # left to the file
        i = args.index(flag)
        del args[i : i + 2]
    assert siglip_trainer.main(["--config", str(tmp_path / "run.yaml"), *args]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert (saved["batch_size"], saved["max_steps"], saved["learning_rate"]) == (2, 2, 0.002)
    assert saved["label_columns"] == ["auto"]
    # an earlier run's config.json replays it
    again = tmp_path / "again"
    assert siglip_trainer.main(["--config", str(run / "config.json"), "--save_dir", str(again)]) == 0
    replayed = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in replayed.items() if k != "save_dir"} == {k: v for k, v in saved.items() if k != "save_dir"}
    assert [r["train/loss"] for r in read_metrics(again / "metrics.jsonl") if "train/loss" in r] == [
        r["train/loss"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r
    ]


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    """The trainer as a batch job runs it: stdout and stderr to files, not a terminal."""
    proc = subprocess.run([sys.executable, "siglip_trainer.py", *argv], cwd=ROOT, capture_output=True)
    # decoded by hand: text mode would turn the progress bars' carriage returns into newlines
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--batch_size", "0"], "error: --batch_size must be >= 1, got 0"),
        (
            ["--lerning_rate", "1e-4"],
            "error: unrecognized arguments: --lerning_rate 1e-4 (did you mean --learning_rate?)",
        ),
        (["--max_steps", "-1"], "error: --max_steps must be >= 1, got -1"),
        (["--config", "nowhere.yaml"], "error: --config nowhere.yaml: cannot read it (FileNotFoundError"),
    ],
)
def test_a_mistake_is_one_line_and_a_hint_not_the_usage(argv, says, tmp_path):
    proc = _run_cli("--csv_file", "data.csv", *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(says) and lines[0].endswith(" (see siglip_trainer.py --help)")
    assert "usage:" not in proc.stderr


def test_an_unknown_setting_in_a_config_file_names_the_nearest_one(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"csv_file": "data.csv", "lerning_rate": 0.1}))
    proc = _run_cli("--config", str(tmp_path / "c.json"))
    assert proc.returncode == 2
    assert (
        f"--config {tmp_path / 'c.json'}: unknown setting 'lerning_rate'; did you mean 'learning_rate'?" in proc.stderr
    )


def test_a_device_that_is_not_there_and_a_warmup_longer_than_the_run(small_csv, tiny_llama_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        proc = _run_cli(*tiny_args(small_csv, tmp_path / "r", tiny_llama_dir, "--device", "cuda"))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
            "error: --device cuda: this machine has no CUDA GPU that torch can use; pass --device cpu"
        )
    args = tiny_args(small_csv, tmp_path / "w", tiny_llama_dir, "--max_steps", "2", "--warmup_steps", "1000")
    assert siglip_trainer.main(args) == 0
    assert "--warmup_steps 1000 >= --max_steps 2" in (tmp_path / "w" / "train.log").read_text()


def test_evaluate_on_a_missing_checkpoint_or_split_is_one_line(small_csv, tiny_llama_dir, tmp_path, capsys):
    assert evaluate_main(["--checkpoint", str(tmp_path / "none.pt"), "--csv_file", str(small_csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "checkpoint not found" in err
    run = tmp_path / "run"
    assert siglip_trainer.main(tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "1")) == 0
    capsys.readouterr()
    code = evaluate_main(
        ["--checkpoint", str(run / "step_00000001.pt"), "--csv_file", str(small_csv), "--split", "tset"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "split 'tset' has no rows" in err


def test_a_batch_job_log_has_plain_progress_lines_and_train_log_holds_the_console(small_csv, tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(small_csv, run, tiny_llama_dir, "--max_steps", "6", "--log_interval", "2", "--eval_interval", "6",
                     "--label_columns", "auto")  # fmt: skip
    proc = _run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "\r" not in console  # no carriage-return progress bars in a file
    assert "Step 2: Loss = " in proc.stdout and "(2/6, " in proc.stdout and "samples/s, ETA " in proc.stdout
    log = (run / "train.log").read_text()
    for line in ("Step 6: Loss = ", "Validation at step 6", "val/i2t_R@1", "Found 12 training samples"):
        assert line in log, line
    bars = _run_cli(*tiny_args(small_csv, tmp_path / "bars", tiny_llama_dir, "--max_steps", "2", "--progress", "bar"))
    assert "\r" in bars.stderr  # asked for: the bar, even in a file
