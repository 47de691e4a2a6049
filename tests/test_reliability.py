"""Reliability with real processes: bad input, preflight, crash-safe checkpoints under SIGKILL, exact resume
after SIGKILL, signals, dead and hung loader workers, the watchdog, non-finite steps, safe loading and
config drift. Tiny towers and generated volumes; subprocesses run with one intra-op thread."""

import hashlib
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import children, tiny_args, write_npz

import siglip_trainer
from ct_siglip import checkpoint as ckpt
from ct_siglip.errors import DataError
from ct_siglip.loss import SigLIPLoss
from ct_siglip.preflight import CACHE_NAME, run_preflight
from ct_siglip.runlog import read_metrics
from ct_siglip.tables import read_csv_table, read_directory_table
from ct_siglip.trainer import SigLIPTrainer

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_csv(folder: Path, n_train: int, n_val: int = 4, shape=(2, 8, 16, 16)) -> Path:
    (folder / "vols").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_val):
        write_npz(folder / "vols" / f"case{i:02d}.npz", shape=shape, seed=i)
        rows.append(
            {
                "img_path": f"vols/case{i:02d}.npz",
                "findings": f"Report number {i}.",
                "split": "train" if i < n_train else "val",
            }
        )
    csv = folder / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def train_losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record, in file order (a resumed run must log each step once)."""
    return [(r["step"], r["train/loss"]) for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


def sample_ids(run: Path) -> list[tuple[int, list[int]]]:
    return [(r["step"], r["train/sample_ids"]) for r in read_metrics(run / "metrics.jsonl") if "train/sample_ids" in r]


def logged_steps(run: Path) -> int:
    try:
        return len(train_losses(run))
    except (OSError, ValueError):  # not there yet, or a line half written
        return 0


def trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "siglip_trainer.py", *args]


def popen(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)


def wait_until(cond, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def assert_same_weights_and_optimizer(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, sa in a["optimizer"]["state"].items():
        for n in sa:
            assert torch.equal(sa[n], b["optimizer"]["state"][i][n]), (i, n)


# ----------------------------------------------------------------------------------------- bad input
def _npz_case(name: str, path: Path) -> str:
    """Damage `path` one way; return the problem text the message must contain."""
    rng = np.random.default_rng(0)
    good = rng.random((2, 4, 8, 8)).astype(np.float16)
    if name == "missing file":
        path.unlink()
        return "file not found"
    if name == "truncated npz":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "cannot read NPZ"
    arrays = {
        "missing key": {"volume": good},
        "wrong ndim": {"image": good[0]},
        "wrong channels": {"image": good[:1]},
        "integer dtype": {"image": (good * 100).astype(np.int16)},
        "nan voxels": {"image": np.where(good > 0.5, np.nan, good).astype(np.float32)},
        "values outside [0, 1]": {"image": good.astype(np.float32) * 3},
    }[name]
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {
        "missing key": "key 'image' missing",
        "wrong ndim": "4-D",
        "wrong channels": "expected 2 channels, got 1",
        "integer dtype": "dtype int16",
        "nan voxels": "NaN or Inf",
        "values outside [0, 1]": "outside [0, 1]",
    }[name]


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "truncated npz",
        "missing key",
        "wrong ndim",
        "wrong channels",
        "integer dtype",
        "nan voxels",
        "values outside [0, 1]",
    ],
)
def test_every_bad_volume_gets_one_line_naming_file_row_problem_and_fix(case, tmp_path):
    csv = make_csv(tmp_path, 3, 0, shape=(2, 4, 8, 8))
    target = tmp_path / "vols" / "case01.npz"
    problem = _npz_case(case, target)
    errors = run_preflight([read_csv_table(csv, "train")], npz_key="image", channels=2)
    assert len(errors) == 1
    msg = str(errors[0])
    assert "\n" not in msg and str(target) in msg and "row 2" in msg and problem in msg
    assert re.search(r"\(.+\)$", msg), f"no fix in: {msg}"  # the hint, in parentheses, says what to do


def test_float16_value_check_agrees_with_exact_min_max_on_every_bit_pattern():
    """The loader's fast float16 range check (an integer max over the raw bits) accepts a volume exactly when
    numpy's min/max say every voxel is finite and in [0, 1]: all 65,536 float16 values, each in a volume."""
    from ct_siglip.volume_io import check_array

    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    base = np.full((2, 1, 2, 2), 0.5, dtype=np.float16)
    for v in values:
        arr = base.copy()
        arr[1, 0, 1, 1] = v
        exact = bool(np.isfinite(v) and 0.0 <= v <= 1.0)
        try:
            check_array(arr, 2)
            accepted = True
        except DataError:
            accepted = False
        assert accepted == exact, f"float16 bits {v.view(np.uint16):#06x} ({v}): accepted {accepted}"


def test_bad_tables_get_one_line_errors_and_unused_rows_are_named(tmp_path, caplog):
    for i in range(6):
        write_npz(tmp_path / f"a{i}.npz", shape=(2, 4, 8, 8))

    def write(rows):
        pd.DataFrame(rows, columns=["img_path", "findings", "split"]).to_csv(tmp_path / "d.csv", index=False)
        return tmp_path / "d.csv"

    base = [["a0.npz", "r0", "train"], ["a1.npz", "r1", "train"], ["a2.npz", "r2", "val"]]
    csv = write(base)
    with pytest.raises(DataError, match=r"d\.csv: column 'report' missing .*\(pass --findings_column"):
        read_csv_table(csv, "train", findings_column="report")
    with pytest.raises(
        DataError, match=r"split 'trian' has no rows \(splits present: train, val\); did you mean 'train'"
    ):
        read_csv_table(csv, "trian")
    with pytest.raises(DataError, match="CSV has no data rows"):
        read_csv_table(write([]), "train")
    csv = write([*base, ["./a0.npz", "r0", "train"]])  # row 4 repeats row 1 ("./" is the same file)
    with pytest.raises(DataError, match=r"row 4: duplicate of row 1 .*--on_bad_sample skip"):
        read_csv_table(csv, "train")
    assert len(read_csv_table(csv, "train", on_bad_rows="skip")) == 2  # dropped, with a warning
    csv = write([*base, ["a1.npz", "r9", "val"]])  # one scan in two splits
    with pytest.raises(DataError, match=r"row 4: same image as row 2 in split 'train': leaks between splits"):
        read_csv_table(csv, "val")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        csv = write([*base, ["a3.npz", "", "train"], ["a4.npz", "r4", "trian"], ["a5.npz", "r5", None]])
        table = read_csv_table(csv, "train", known_splits=("train", "val", "test"))
    assert table.missing_report_rows == [4]  # placeholder text, named by the trainer's warning
    text = caplog.text
    assert "row 5: unknown split value 'trian'" in text and "row 6: empty split value" in text
    (tmp_path / "r.json").write_text(json.dumps({"a0": "ok", "a1": 7}))
    with pytest.raises(DataError, match=r"r\.json: report for 'a1' is a int, not text"):
        read_directory_table(tmp_path, tmp_path / "r.json")


def _recording_check(job):
    """Preflight's per-file check, recording which process ran it (forked workers inherit this patch)."""
    from ct_siglip import preflight

    Path(job[0] + f".checked_by_{os.getpid()}").touch()
    return preflight._original_check_one(job)


def test_preflight_checks_in_worker_processes_and_caches_by_size_and_mtime(tmp_path, monkeypatch):
    from ct_siglip import preflight

    csv = make_csv(tmp_path, 6, 0, shape=(2, 4, 8, 8))
    bad = tmp_path / "vols" / "case02.npz"
    _npz_case("nan voxels", bad)
    monkeypatch.setattr(preflight, "_original_check_one", preflight._check_one, raising=False)
    monkeypatch.setattr(preflight, "_check_one", _recording_check)
    cache = tmp_path / CACHE_NAME
    table = read_csv_table(csv, "train")
    errors = run_preflight([table], npz_key="image", channels=2, workers=2, cache_file=cache)
    assert [e.row for e in errors] == [3]
    pids = {int(p.name.rsplit("_", 1)[1]) for p in (tmp_path / "vols").glob("*.checked_by_*")}
    assert pids and os.getpid() not in pids  # checked in other processes

    # Same size and mtime: the cached verdict stands, without opening the file (it is now fine).
    st = bad.stat()
    _npz_case("values outside [0, 1]", bad)  # same shape, float32: same size as the NaN version
    assert bad.stat().st_size == st.st_size
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    for p in (tmp_path / "vols").glob("*.checked_by_*"):
        p.unlink()
    assert [e.problem for e in run_preflight([table], npz_key="image", channels=2, cache_file=cache)] == [
        errors[0].problem
    ]
    assert not list((tmp_path / "vols").glob("*.checked_by_*"))  # nothing re-read
    os.utime(bad)  # touched: checked again
    assert "outside [0, 1]" in str(run_preflight([table], npz_key="image", channels=2, cache_file=cache)[0])
    # Another channel count is another question: the cache does not answer it.
    assert len(run_preflight([table], npz_key="image", channels=3, cache_file=cache)) == 6


def test_preflight_stops_a_bad_validation_file_before_step_1(tmp_path, tiny_llama_dir, capsys):
    csv = make_csv(tmp_path, 8, 4)
    _npz_case("truncated npz", tmp_path / "vols" / "case10.npz")
    run = tmp_path / "run"
    code = siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, "--max_steps", "4"))
    err = capsys.readouterr().err
    assert code == 2 and "case10.npz" in err and "row 11" in err and "cannot read NPZ" in err
    assert not (run / "metrics.jsonl").exists() and not ckpt.list_checkpoints(run)
    assert "case10.npz" in (run / "preflight_errors.csv").read_text()


def test_skip_counts_bad_samples_in_metrics_checkpoint_and_csv_then_aborts_above_the_limit(
    tmp_path, tiny_llama_dir, capsys
):
    csv = make_csv(tmp_path, 12, 0)
    _npz_case("missing key", tmp_path / "vols" / "case05.npz")
    run = tmp_path / "run"
    args = ["--max_steps", "6", "--save_interval", "6", "--on_bad_sample", "skip", "--val_split", ""]
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args, "--max_bad_fraction", "0.5")) == 0
    # 6 steps x 4 = two epochs of 12: the bad sample is drawn (and replaced) once per epoch.
    assert read_metrics(run / "metrics.jsonl")[-1]["train/bad_samples"] == 2
    assert ckpt.load_checkpoint(ckpt.find_latest(run))["trainer"]["bad_samples"] == 2
    rows = pd.read_csv(run / "bad_samples.csv")
    assert list(rows.columns) == ["step", "path", "row", "problem"] and len(rows) == 2
    assert rows["path"].str.endswith("case05.npz").all() and (rows["row"] == 6).all()
    assert rows["step"].between(1, 3).sum() == 1 and rows["step"].between(4, 6).sum() == 1
    # 1 bad of 12 is above 5%: the preflight refuses before training...
    capsys.readouterr()
    assert (
        siglip_trainer.main(tiny_args(csv, tmp_path / "r2", tiny_llama_dir, *args, "--max_bad_fraction", "0.05")) == 2
    )
    assert "1 of 12 training rows are bad, above --max_bad_fraction 0.05" in capsys.readouterr().err
    # ... and without the preflight the run stops at the first bad draw, keeping what it trained.
    r3 = tmp_path / "r3"
    assert (
        siglip_trainer.main(tiny_args(csv, r3, tiny_llama_dir, *args, "--max_bad_fraction", "0.05", "--no-preflight"))
        == 2
    )
    assert "exceed --max_bad_fraction 0.05" in capsys.readouterr().err
    stopped = ckpt.find_latest(r3)
    assert stopped is None or ckpt.load_checkpoint(stopped)["step"] < 6


# ----------------------------------------------------------------------------------------- checkpoints
def _state(step: int, mb: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(int(mb * 2**18), generator=g)}, "note": f"step {step}"}


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _save_round(folder: Path, step: int, kill_at: int | None = None) -> int:
    """One periodic save + prune + best.pt replacement; with `kill_at`, SIGKILL self at that event (a write,
    fsync, rename or delete), counting from 1. Returns the number of events (when not killed)."""
    events = [0]

    def tick():
        events[0] += 1
        if kill_at is not None and events[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn):
        def inner(*a, **k):
            tick()
            return fn(*a, **k)

        return inner

    os.fsync, os.replace, os.unlink = wrap(os.fsync), wrap(os.replace), wrap(os.unlink)
    ckpt._HashingWriter.write = wrap(ckpt._HashingWriter.write)
    ckpt.save_checkpoint(_state(step), folder / f"step_{step:08d}.pt")
    ckpt.prune(folder, 2)
    ckpt.save_checkpoint(_state(step), folder / "best.pt")
    return events[0]


def _check_invariants(folder: Path, intact: dict[str, str]) -> int:
    """The newest complete checkpoint loads; every checkpoint once complete and still there is unchanged;
    best.pt is always a complete old or new version."""
    latest = ckpt.find_latest(folder)
    assert latest is not None
    assert ckpt.load_checkpoint(latest)["step"] == ckpt.checkpoint_step(latest)
    for name, digest in intact.items():
        if (folder / name).exists() and name != "best.pt":
            assert ckpt.sha256_file(folder / name) == digest, name
            assert ckpt.verify_checkpoint(folder / name) is None, name
    assert ckpt.verify_checkpoint(folder / "best.pt") is None
    assert ckpt.load_checkpoint(folder / "best.pt")["step"] <= ckpt.checkpoint_step(latest) + 1
    return ckpt.checkpoint_step(latest)


def test_a_save_killed_at_every_point_and_at_random_times_never_loses_the_last_complete_checkpoint(tmp_path):
    base = tmp_path / "base"
    for step in (1, 2):
        ckpt.save_checkpoint(_state(step), base / f"step_{step:08d}.pt")
    ckpt.save_checkpoint(_state(2), base / "best.pt")
    intact = {p.name: ckpt.sha256_file(p) for p in base.glob("step_*.pt")}

    # Count the events of one round in a child, then kill a child at each of them in turn.
    counter = tmp_path / "count"
    _, status = os.waitpid(
        _fork(lambda: counter.write_text(str(_save_round(shutil.copytree(base, tmp_path / "c"), 3)))), 0
    )
    n_events = int(counter.read_text())
    assert n_events > 10
    for k in range(1, n_events + 1):
        folder = shutil.copytree(base, tmp_path / f"k{k}")
        _, status = os.waitpid(_fork(lambda f=folder, k=k: _save_round(f, 3, kill_at=k)), 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert _check_invariants(folder, intact) in (2, 3)
        ckpt.remove_stale_temps(folder)
        assert not [p for p in folder.iterdir() if ".tmp" in p.name]

    # Random kills of a process that saves continuously (bigger states: kills land mid-write too).
    folder = shutil.copytree(base, tmp_path / "random")
    rng = random.Random(0)
    step = 3
    for _ in range(8):

        def loop(start=step):
            s = start
            while True:
                ckpt.save_checkpoint(_state(s, mb=2), folder / f"step_{s:08d}.pt")
                ckpt.prune(folder, 2)
                if s % 3 == 0:
                    ckpt.save_checkpoint(_state(s, mb=2), folder / "best.pt")
                s += 1

        pid = _fork(loop)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        newest = _check_invariants(folder, intact)
        intact.update(
            {p.name: ckpt.sha256_file(p) for p in ckpt.list_checkpoints(folder) if ckpt.verify_checkpoint(p) is None}
        )
        step = newest + 1
    assert step > 5  # the saver made progress between kills


def test_truncated_and_byte_flipped_checkpoints_are_named_and_skipped_by_resume_auto(tmp_path, tiny_llama_dir):
    csv = make_csv(tmp_path, 8, 0)
    full, run = tmp_path / "full", tmp_path / "run"
    args = ["--save_interval", "1", "--keep_last_n", "0", "--val_split", ""]
    assert siglip_trainer.main(tiny_args(csv, full, tiny_llama_dir, "--max_steps", "4", *args)) == 0
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, "--max_steps", "3", *args)) == 0
    p3, p2 = run / "step_00000003.pt", run / "step_00000002.pt"
    p3.write_bytes(p3.read_bytes()[:-1000])  # truncated
    data = bytearray(p2.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped, same size
    p2.write_bytes(bytes(data))
    assert "truncated" in ckpt.verify_checkpoint(p3) and "corrupted" in ckpt.verify_checkpoint(p2)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000002\.pt: checkpoint is damaged"):
        ckpt.load_checkpoint(p2)
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, "--max_steps", "4", *args, "--resume", "auto")) == 0
    log = (run / "train.log").read_text()
    assert re.search(r"skipping checkpoint .*step_00000003\.pt: size \d+ bytes, manifest says \d+", log)
    assert re.search(r"skipping checkpoint .*step_00000002\.pt: SHA-256 differs", log)
    assert re.search(r"Resumed from .*step_00000001\.pt at step 1", log)
    assert train_losses(run) == train_losses(full)  # steps 2-4 retrained identically, each logged once
    assert_same_weights_and_optimizer(
        ckpt.load_checkpoint(full / "step_00000004.pt"), ckpt.load_checkpoint(run / "step_00000004.pt")
    )


def test_prune_keeps_the_newest_complete_checkpoints_and_ignores_torn_ones(tmp_path):
    for s in range(1, 6):
        ckpt.save_checkpoint(_state(s, mb=0.01), tmp_path / f"step_{s:08d}.pt")
    (tmp_path / "step_00000003.json").unlink()  # torn (no manifest), older than the newest complete
    (tmp_path / "step_00000006.pt").write_bytes(b"half a save")  # torn, newer: a later save overwrites it
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step_00000004.pt",
        "step_00000005.pt",
        "step_00000006.pt",
    ]
    assert ckpt.find_latest(tmp_path).name == "step_00000005.pt"


def test_a_failed_save_is_loud_exits_nonzero_and_keeps_the_previous_checkpoint(tmp_path, tiny_llama_dir, monkeypatch):
    csv = make_csv(tmp_path, 8, 0)
    run = tmp_path / "run"
    args = ["--max_steps", "4", "--save_interval", "2", "--val_split", ""]
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("step_00000004.pt"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(SystemExit) as exit_info:
        siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args))
    msg = str(exit_info.value.code)
    assert "could not save checkpoint" in msg and "Permission denied" in msg and "step_00000002.pt" in msg
    monkeypatch.undo()
    assert ckpt.find_latest(run).name == "step_00000002.pt" and not list(run.glob(".*tmp*"))
    digest = ckpt.sha256_file(run / "step_00000002.pt")

    # A real write failure: a file-size limit (as root, permissions cannot be taken away) in a resumed run.
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    out = subprocess.run(
        trainer_cmd(*tiny_args(csv, run, tiny_llama_dir, *args, "--resume", "auto")),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "could not save checkpoint" in out.stderr and "File too large" in out.stderr
    assert (
        ckpt.sha256_file(run / "step_00000002.pt") == digest
        and ckpt.verify_checkpoint(run / "step_00000002.pt") is None
    )
    assert ckpt.find_latest(run).name == "step_00000002.pt" and not list(run.glob(".*tmp*"))


def test_an_unwritable_save_dir_is_refused_at_start_up(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "file").write_text("not a folder")
    csv = make_csv(tmp_path, 4, 0)
    assert siglip_trainer.main(tiny_args(csv, tmp_path / "file" / "run", tiny_llama_dir)) == 2
    assert "is not writable" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- exact resume
def test_sigkill_at_any_step_then_resume_auto_is_exact_within_an_epoch_and_at_its_boundary(tmp_path, tiny_llama_dir):
    """Three real SIGKILLs: two inside epoch 0 and one right after its last step (the boundary); shuffled data,
    2 loader workers, random augmentation. Every step's loss and batch, and the final weights and optimizer
    state, equal an uninterrupted run's; epoch 0 sees every sample exactly once."""
    csv = make_csv(tmp_path, 24, 0)  # batch 4: 6 steps per epoch
    args = [
        "--max_steps",
        "8",
        "--save_interval",
        "1",
        "--num_workers",
        "2",
        "--augment",
        "light",
        "--log_sample_ids",
        "--val_split",
        "",
    ]
    full, run = tmp_path / "full", tmp_path / "run"
    assert siglip_trainer.main(tiny_args(csv, full, tiny_llama_dir, *args)) == 0
    cmd = trainer_cmd(*tiny_args(csv, run, tiny_llama_dir, *args, "--resume", "auto"))
    for kill_after in (2, 4, 6):
        proc = popen(cmd, tmp_path / f"kill{kill_after}.log")
        # A kill lands wherever the process is (often mid-step, sometimes mid-save); the checkpoints it
        # wrote after step `kill_after` are then removed, as if the kill had come a little earlier.
        wait_until(lambda k=kill_after: (run / f"step_{k:08d}.json").exists(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for p in ckpt.list_checkpoints(run):
            if ckpt.checkpoint_step(p) > kill_after:
                p.unlink()
                ckpt.manifest_path(p).unlink(missing_ok=True)
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args, "--resume", "auto")) == 0

    resumed = [int(m) for m in re.findall(r"Resumed from .* at step (\d+)", (run / "train.log").read_text())]
    assert len(resumed) == 3 and all(0 < s < 6 for s in resumed[:2]) and resumed[2] == 6
    assert train_losses(run) == train_losses(full)  # identical floats, each step once
    ids = sample_ids(run)
    assert ids == sample_ids(full)
    epoch0 = [i for _, batch in ids[:6] for i in batch]
    assert sorted(epoch0) == list(range(24))  # no sample twice, none skipped
    assert_same_weights_and_optimizer(
        ckpt.load_checkpoint(full / "step_00000008.pt"), ckpt.load_checkpoint(run / "step_00000008.pt")
    )


# ----------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_a_signal_finishes_the_step_saves_and_exits_with_128_plus_its_number(
    signum, tmp_path, tiny_llama_dir, monkeypatch
):
    csv = make_csv(tmp_path, 8, 0)
    run = tmp_path / "run"
    original, before = SigLIPTrainer.train_step, signal.getsignal(signum)

    def step(self, micro):
        if self.step == 2:  # a real signal to this process, in the middle of step 3
            os.kill(os.getpid(), signum)
        return original(self, micro)

    monkeypatch.setattr(SigLIPTrainer, "train_step", step)
    with pytest.raises(SystemExit) as exit_info:
        siglip_trainer.main(
            tiny_args(csv, run, tiny_llama_dir, "--max_steps", "10", "--save_interval", "100", "--val_split", "")
        )
    assert exit_info.value.code == 128 + signum
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000003.pt"]
    assert [s for s, _ in train_losses(run)] == [1, 2, 3]
    assert signal.getsignal(signum) is before  # the handlers are the caller's again


SLOW_STEP_RUN = """
import sys, time
import siglip_trainer
from ct_siglip.trainer import SigLIPTrainer
original = SigLIPTrainer.train_step
def slow(self, micro):
    time.sleep(1.0)
    return original(self, micro)
SigLIPTrainer.train_step = slow
sys.exit(siglip_trainer.main(sys.argv[1:]))
"""


def test_a_second_signal_exits_at_once_without_saving(tmp_path, tiny_llama_dir):
    csv = make_csv(tmp_path, 8, 0)
    run = tmp_path / "run"
    proc = popen(
        [
            sys.executable,
            "-c",
            SLOW_STEP_RUN,
            *tiny_args(csv, run, tiny_llama_dir, "--max_steps", "50", "--save_interval", "100", "--val_split", ""),
        ],
        tmp_path / "log",
    )
    wait_until(lambda: logged_steps(run) >= 1, proc)
    time.sleep(0.3)  # inside step 2, which sleeps for 1 s: both signals arrive before it ends
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the first handler has run
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "exiting now without saving" in (tmp_path / "log").read_text()
    assert not ckpt.list_checkpoints(run)


# ----------------------------------------------------------------------------------------- hangs and deaths
def test_a_dead_loader_worker_stops_the_run_with_a_message_and_a_checkpoint(tmp_path, tiny_llama_dir):
    csv = make_csv(tmp_path, 8, 0)
    run = tmp_path / "run"
    flags = ["--max_steps", "100000", "--save_interval", "100000", "--num_workers", "2"]
    proc = popen(trainer_cmd(*tiny_args(csv, run, tiny_llama_dir, *flags, "--val_split", "")), tmp_path / "log")
    wait_until(lambda: logged_steps(run) >= 2, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    out = (tmp_path / "log").read_text()
    assert re.search(r"error: DataLoader worker \(pid.*\) (is killed by signal|exited unexpectedly)", out)
    assert "--resume auto" in out
    assert ckpt.load_checkpoint(ckpt.find_latest(run))["step"] >= 2  # what was trained is kept


WATCHDOG_SCRIPT = """
import time
from ct_siglip.distributed import Watchdog
with Watchdog(0.5, describe=lambda: "test, step 7") as w:
    with w.paused():
        time.sleep(1.5)  # paused: no exit
    print("survived the pause", flush=True)
    time.sleep(30)  # hung: the watchdog ends the process
"""


def test_the_watchdog_ends_a_hung_process_with_124_and_its_stacks(tmp_path):
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", WATCHDOG_SCRIPT], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 124 and time.time() - t0 < 25
    assert "survived the pause" in out.stdout
    assert "no progress for" in out.stderr and "test, step 7" in out.stderr
    assert 'File "<string>", line 8' in out.stderr  # the stack shows where it hung: time.sleep(30)


# ----------------------------------------------------------------------------------------- numerical faults
def _nan_on(calls: set[int]):
    """SigLIPLoss.forward returning NaN on the given training calls (1-based)."""
    original = SigLIPLoss.forward
    count = [0]

    def forward(self, image_emb, text_emb):
        loss = original(self, image_emb, text_emb)
        if self.training:
            count[0] += 1
            if count[0] in calls:
                return loss * float("nan")
        return loss

    return forward


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_with_a_checkpoint(
    tmp_path, tiny_llama_dir, monkeypatch
):
    csv = make_csv(tmp_path, 8, 0)
    run = tmp_path / "run"
    args = ["--max_steps", "6", "--save_interval", "1", "--keep_last_n", "0", "--val_split", "", "--max_bad_steps", "3"]
    monkeypatch.setattr(SigLIPLoss, "forward", _nan_on({3, 4}))
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args)) == 0
    assert "step 3: non-finite loss or gradient" in (run / "train.log").read_text()
    assert read_metrics(run / "metrics.jsonl")[-1]["train/skipped_steps"] == 2
    s2, s4, s5 = (ckpt.load_checkpoint(run / f"step_{s:08d}.pt") for s in (2, 4, 5))
    assert_same_weights_and_optimizer(s2, s4)  # the two skipped steps changed nothing
    assert not torch.equal(s4["model"]["loss_fn.bias"], s5["model"]["loss_fn.bias"])  # training went on

    run2 = tmp_path / "run2"
    monkeypatch.setattr(SigLIPLoss, "forward", _nan_on(set(range(2, 100))))
    with pytest.raises(SystemExit, match=r"3 non-finite steps in a row \(--max_bad_steps\); saved step 4"):
        siglip_trainer.main(tiny_args(csv, run2, tiny_llama_dir, *args))
    assert_same_weights_and_optimizer(
        ckpt.load_checkpoint(run2 / "step_00000001.pt"), ckpt.load_checkpoint(run2 / "step_00000004.pt")
    )


# ----------------------------------------------------------------------------------------- safe loading, drift
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_everywhere_a_checkpoint_is_loaded(tmp_path, tiny_llama_dir, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "step": 1, "payload": _Evil(marker)}, evil)
    with pytest.raises(ckpt.CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        ckpt.load_checkpoint(evil)
    csv = make_csv(tmp_path, 4, 0)
    assert (
        siglip_trainer.main(
            tiny_args(csv, tmp_path / "r1", tiny_llama_dir, "--val_split", "", "--init_from", str(evil))
        )
        == 2
    )
    assert "refused by torch.load(weights_only=True)" in capsys.readouterr().err
    run = tmp_path / "r2"
    run.mkdir()
    shutil.copy(evil, run / "step_00000009.pt")  # with a valid manifest: only weights_only stands in the way
    (run / "step_00000009.json").write_text(
        json.dumps(
            {
                "file": "step_00000009.pt",
                "bytes": evil.stat().st_size,
                "sha256": hashlib.sha256(evil.read_bytes()).hexdigest(),
            }
        )
    )
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, "--val_split", "", "--resume", "auto")) == 2
    assert "refused by torch.load(weights_only=True)" in capsys.readouterr().err
    assert not marker.exists()


def test_every_torch_load_uses_weights_only_and_no_remote_code_is_trusted():
    sources = [*(ROOT / "ct_siglip").glob("*.py"), *ROOT.glob("*.py")]
    calls = [(p.name, m.group(0)) for p in sources for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls and all("weights_only=True" in c for _, c in calls), calls
    assert not [p.name for p in sources if re.search(r"trust_remote_code\s*=\s*True", p.read_text())]


def test_resuming_with_another_model_global_batch_or_csv_is_refused_unless_allowed(tmp_path, tiny_llama_dir, capsys):
    csv = make_csv(tmp_path, 8, 0)
    run = tmp_path / "run"
    args = ["--max_steps", "2", "--save_interval", "2", "--val_split", ""]
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args)) == 0
    state = ckpt.load_checkpoint(ckpt.find_latest(run))
    rng = state["rng"]
    assert len(rng) == 1 and all(v.dtype == torch.uint8 for v in rng[0].values())  # RNG states as tensors

    def resume(*extra):
        capsys.readouterr()
        code = siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args, "--resume", "auto", *extra))
        return code, capsys.readouterr().err

    code, err = resume("--image_width", "8")
    assert code == 2 and "--image_width 4 -> 8" in err and "--allow_config_change" in err
    code, err = resume("--batch_size", "2")
    assert code == 2 and "global batch (batch_size x processes x grad_accum_steps) 4 -> 2" in err
    assert resume("--batch_size", "2", "--grad_accum_steps", "2")[0] == 0  # the same global batch
    df = pd.read_csv(csv)
    df.loc[3, "findings"] = "An edited report."
    df.to_csv(csv, index=False)
    code, err = resume()
    assert code == 2 and "the training rows" in err
    assert resume("--allow_config_change")[0] == 0
    assert (
        "resuming with changed settings (--allow_config_change): the training rows" in (run / "train.log").read_text()
    )
