"""End-to-end CPU runs of the trainer through `main(argv)` on tiny towers and generated data."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_args

import siglip_trainer
from ct_siglip.checkpoint import find_latest, load_checkpoint
from ct_siglip.runlog import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def test_help_lists_every_flag_of_the_cli_contract():
    out = subprocess.run(
        [sys.executable, "siglip_trainer.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    contract = [
        "csv_file",
        "train_split",
        "val_split",
        "findings_column",
        "img_path_column",
        "split_column",
        "train_data_dir",
        "val_data_dir",
        "text_reports_path",
        "text_model_path",
        "temperature",
        "freeze_image_backbone",
        "batch_size",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "max_steps",
        "num_workers",
        "save_dir",
        "log_interval",
        "save_interval",
        "precision",
        "grad_accum_steps",
        "grad_clip",
        "resume",
        "init_from",
        "demo",
        "eval_interval",
        "seed",
        "label_columns",
    ]
    flags = set(re.findall(r"--(\w+)", out))
    assert not [f for f in contract if f not in flags]
    for group in ("CSV data (recommended)", "Legacy data (directory mode)", "Model", "Training", "Logging and saving"):
        assert group + ":" in out


def test_training_lowers_the_loss_and_writes_outputs(small_csv, tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    assert (
        siglip_trainer.main(
            tiny_args(
                small_csv, run, tiny_llama_dir, "--max_steps", "30", "--save_interval", "15", "--label_columns", "auto"
            )
        )
        == 0
    )
    losses = _losses(run)
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.5 * first
    records = read_metrics(run / "metrics.jsonl")
    val = [r for r in records if "val/loss" in r][-1]
    for name in ("val/i2t_R@1", "val/t2i_R@10", "val/zeroshot_auroc/Lung nodule", "val/zeroshot_auroc_mean"):
        assert name in val
    assert {"train/lr", "train/t", "train/b"} <= set(records[0])
    assert (run / "config.json").is_file() and any((run / "tensorboard").iterdir())
    assert find_latest(run).name == "step_00000030.pt"
    assert (run / "best.pt").is_file()


def test_resume_after_sigterm_continues_exactly(small_csv, tmp_path, tiny_llama_dir):
    """A real process gets SIGTERM mid-run: it finishes the step, saves, exits 143; `--resume auto`
    then reproduces the uninterrupted run's per-step losses, weights and optimizer state exactly."""
    args = ["--max_steps", "24", "--save_interval", "1000", "--num_workers", "2", "--augment", "light"]
    full = tmp_path / "full"
    assert siglip_trainer.main(tiny_args(small_csv, full, tiny_llama_dir, *args)) == 0

    part = tmp_path / "part"
    cmd = [sys.executable, "siglip_trainer.py", *tiny_args(small_csv, part, tiny_llama_dir, *args)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (part / "metrics.jsonl").is_file() and len(_losses(part)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = load_checkpoint(find_latest(part))["step"]
    assert 3 <= stopped < 24
    assert siglip_trainer.main(tiny_args(small_csv, part, tiny_llama_dir, *args, "--resume", "auto")) == 0

    assert _losses(part) == _losses(full)  # every step's loss identical
    a, b = load_checkpoint(find_latest(full)), load_checkpoint(find_latest(part))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for ka, kb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(ka[n], kb[n]) for n in ka)


def test_accumulated_micro_batches_give_the_global_batch_loss(small_csv, tmp_path, tiny_llama_dir):
    common = ["--max_steps", "3", "--freeze_image_backbone", "--save_interval", "100", "--grad_clip", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert siglip_trainer.main(tiny_args(small_csv, whole, tiny_llama_dir, *common, "--batch_size", "8")) == 0
    assert (
        siglip_trainer.main(
            tiny_args(small_csv, split, tiny_llama_dir, *common, "--batch_size", "4", "--grad_accum_steps", "2")
        )
        == 0
    )
    lw, ls = _losses(whole), _losses(split)
    # float32 with a different summation order of the same terms: 1e-5 relative.
    assert all(ls[s] == pytest.approx(lw[s], rel=1e-5) for s in lw)
    a, b = load_checkpoint(find_latest(whole)), load_checkpoint(find_latest(split))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)


def test_bad_npz_stops_before_training_loses_nothing_and_names_the_row(small_csv, tmp_path, tiny_llama_dir, capsys):
    (small_csv.parent / "vols" / "case05.npz").write_bytes(b"PK\x03\x04truncated")
    code = siglip_trainer.main(tiny_args(small_csv, tmp_path / "bad", tiny_llama_dir, "--max_steps", "4"))
    err = capsys.readouterr().err
    assert code == 2 and "case05.npz" in err and "row 6" in err


def test_text_learning_rate_gives_the_pretrained_llm_its_own_rate_and_every_weight_one_group(
    small_csv, tmp_path, tiny_llama_dir
):
    from ct_siglip.config import parse_config
    from ct_siglip.model import build_model
    from ct_siglip.step import build_optimizer, lr_factor

    def groups(*extra):
        cfg = parse_config(tiny_args(small_csv, tmp_path / "run", tiny_llama_dir, "--learning_rate", "1e-3", *extra))
        model = build_model(cfg, device=torch.device("cpu"))
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        names = {id(p): n for n, p in model.named_parameters()}
        seen = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
        return opt, [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups]

    _, plain = groups()
    assert [lr for lr, _, _ in plain] == [1e-3, 1e-3]
    opt, split = groups("--text_learning_rate", "2e-5")
    for lr, _, names in split:
        assert names and all(n.startswith("text_encoder.model.") == (lr == 2e-5) for n in names)
    assert {(lr, decay > 0) for lr, decay, _ in split} == {(1e-3, True), (1e-3, False), (2e-5, True), (2e-5, False)}
    assert any(n.startswith("text_encoder.projection") for lr, _, names in split if lr == 1e-3 for n in names)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, 10, 0.0))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 2e-5, 2e-5])  # the schedule scales each
