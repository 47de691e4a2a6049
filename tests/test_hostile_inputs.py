"""Files a scanner, a script or a full disk really produces, fed to the user's commands: each becomes one line
naming the file and the row (or a recorded replacement with --on_bad_sample skip), found before step 1 where it
can be, and `--validate_csv`, the preflight and training agree on what is a usable volume."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_args, write_npz

import siglip_trainer
from ct_siglip import checkpoint as ckpt
from ct_siglip.errors import DataError
from ct_siglip.preflight import run_preflight
from ct_siglip.runlog import read_metrics
from ct_siglip.tables import read_csv_table
from ct_siglip.validate import validate_csv
from ct_siglip.volume_io import load_volume

SHAPE = (2, 8, 16, 16)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines of a run's stderr (the progress bar shares it, with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error: ")]


def make_csv(folder: Path, n_train: int, n_val: int = 0) -> Path:
    (folder / "vols").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_val):
        write_npz(folder / "vols" / f"case{i:02d}.npz", shape=SHAPE, seed=i)
        rows.append({"img_path": f"vols/case{i:02d}.npz", "findings": f"Report number {i}.",
                     "split": "train" if i < n_train else "val"})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "data.csv", index=False)
    return folder / "data.csv"


def damage(path: Path, how: str) -> None:
    """Turn a good NPZ into what a careless script or a failing disk leaves behind."""
    good = np.random.default_rng(0).random(SHAPE).astype(np.float16)
    if how == "npy under an npz name":
        path.unlink()
        np.save(path.with_suffix(".npy"), good)
        path.with_suffix(".npy").rename(path)
    elif how == "zip member that is not an npy":
        path.unlink()
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("image.npy", b"this is not an array, just the bytes of a text file")
    elif how == "corrupt deflate data":
        np.savez_compressed(path, image=np.random.default_rng(1).random(SHAPE).astype(np.float32))
        data = bytearray(path.read_bytes())
        for i in range(100, 400):  # inside the compressed stream of the only member
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    elif how == "pickled object array":
        with open(path, "wb") as f:
            np.savez(f, image=np.array([{"a": 1}, None], dtype=object))
    elif how == "another shape":
        write_npz(path, shape=(2, 8, 16, 12))
    elif how == "zero-size array":
        write_npz(path, shape=(2, 0, 16, 16))
    elif how == "big-endian float32":
        np.savez(path, image=good.astype(">f4"))
    else:
        raise ValueError(how)


UNREADABLE = ["npy under an npz name", "zip member that is not an npy", "corrupt deflate data", "pickled object array"]


@pytest.mark.parametrize("how", UNREADABLE)
def test_an_unreadable_volume_is_one_line_naming_file_and_row(tmp_path, how):
    path = tmp_path / "v.npz"
    write_npz(path, shape=SHAPE)
    damage(path, how)
    with pytest.raises(DataError) as info:
        load_volume(path, row=7)
    msg = str(info.value)
    assert msg.startswith(f"{path}, row 7: ") and "\n" not in msg
    assert "allow_pickle" not in msg and "weights_only" not in msg  # never advise unsafe loading


def test_a_folder_or_a_device_is_named_as_such_not_as_missing(tmp_path):
    (tmp_path / "scan.npz").mkdir()
    with pytest.raises(DataError, match="is a folder, not an NPZ file"):
        load_volume(tmp_path / "scan.npz")
    with pytest.raises(DataError, match="is not a regular file"):
        load_volume("/dev/zero")
    with pytest.raises(DataError, match="file not found"):
        load_volume(tmp_path / "nothing.npz")


def test_a_big_endian_volume_loads_as_the_same_values_in_native_order(tmp_path):
    path = tmp_path / "v.npz"
    damage(path, "big-endian float32")
    arr = load_volume(path)
    assert arr.dtype == np.float32 and arr.dtype.isnative
    np.testing.assert_array_equal(arr, np.random.default_rng(0).random(SHAPE).astype(np.float16).astype(np.float32))


def test_unreadable_volumes_are_replaced_in_skip_mode_even_without_the_preflight(tmp_path, tiny_llama_dir, capsys):
    """Before, only DataError was caught while loading: these files killed training with TypeError,
    AttributeError or zlib.error and lost the unsaved steps."""
    csv = make_csv(tmp_path, 12)
    for i, how in zip((3, 5, 7, 9), UNREADABLE):
        damage(tmp_path / "vols" / f"case{i:02d}.npz", how)
    run = tmp_path / "run"
    args = ["--max_steps", "3", "--save_interval", "3", "--val_split", "", "--on_bad_sample", "skip",
            "--max_bad_fraction", "0.9", "--no-preflight", "--num_workers", "1"]  # fmt: skip
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args)) == 0
    bad = pd.read_csv(run / "bad_samples.csv")
    assert set(bad["row"]) == {4, 6, 8, 10}  # data rows count from 1: case03 is row 4
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r] == [1, 2, 3]
    # With --on_bad_sample error the first one drawn stops the run: one line, exit 2.
    capsys.readouterr()
    code = siglip_trainer.main(tiny_args(csv, tmp_path / "r2", tiny_llama_dir, "--max_steps", "3", "--val_split", "",
                                         "--no-preflight"))  # fmt: skip
    (err,) = error_lines(capsys.readouterr().err)
    assert code == 2 and "vols/case0" in err


@pytest.fixture
def odd_volumes(tmp_path) -> Path:
    """8 training and 2 validation rows: row 3 has another shape, row 5 no voxels, row 7 is big-endian (fine)."""
    csv = make_csv(tmp_path, 8, 2)
    damage(tmp_path / "vols" / "case02.npz", "another shape")
    damage(tmp_path / "vols" / "case04.npz", "zero-size array")
    damage(tmp_path / "vols" / "case06.npz", "big-endian float32")
    return csv


def test_validate_csv_names_every_volume_that_training_could_not_stack(odd_volumes, capsys):
    """Before: "CSV OK", exit 0, then `RuntimeError: stack expects each tensor to be equal size` in training."""
    result = validate_csv(odd_volumes)
    bad = result[~result["ok"]]
    assert list(bad["row"]) == [3, 5]
    assert "shape 2 x 8 x 16 x 12 differs from the run's 2 x 8 x 16 x 16" in bad["reason"].iloc[0]
    assert "empty array" in bad["reason"].iloc[1]
    assert list(bad["checks"]) == ["shape", "size"]
    # The preflight agrees with it, file for file.
    tables = [read_csv_table(odd_volumes, s) for s in ("train", "val")]
    errors = run_preflight(tables, npz_key="image", channels=2)
    assert sorted(e.row for e in errors) == [3, 5]


def test_training_stops_before_step_1_listing_the_odd_volumes(odd_volumes, tmp_path, tiny_llama_dir, capsys):
    run = tmp_path / "run"
    code = siglip_trainer.main(tiny_args(odd_volumes, run, tiny_llama_dir, "--max_steps", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "case02.npz, row 3: shape 2 x 8 x 16 x 12 differs" in err and "1 more bad rows" in err
    listing = pd.read_csv(run / "preflight_errors.csv")
    assert list(listing["row"]) == [3, 5]
    assert not (run / "metrics.jsonl").exists()


def test_skip_mode_replaces_the_odd_volumes_and_trains_on_the_rest(odd_volumes, tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    args = ["--max_steps", "4", "--save_interval", "4", "--val_split", "", "--on_bad_sample", "skip",
            "--max_bad_fraction", "0.5"]  # fmt: skip
    assert siglip_trainer.main(tiny_args(odd_volumes, run, tiny_llama_dir, *args)) == 0
    bad = pd.read_csv(run / "bad_samples.csv")
    assert set(bad["row"]) == {3, 5} and bad["problem"].str.contains("shape|empty array").all()
    assert ckpt.load_checkpoint(ckpt.find_latest(run))["step"] == 4


def test_without_the_preflight_a_batch_of_mixed_shapes_is_one_line_naming_the_file(
    odd_volumes, tmp_path, tiny_llama_dir, capsys
):
    (odd_volumes.parent / "vols" / "case04.npz").unlink()
    shutil.copy(odd_volumes.parent / "vols" / "case01.npz", odd_volumes.parent / "vols" / "case04.npz")
    code = siglip_trainer.main(tiny_args(odd_volumes, tmp_path / "run", tiny_llama_dir, "--max_steps", "4",
                                         "--no-preflight", "--val_split", "", "--batch_size", "8"))  # fmt: skip
    (err,) = error_lines(capsys.readouterr().err)
    assert code == 2 and "case02.npz, row 3: shape (2, 8, 16, 12) differs from (2, 8, 16, 16)" in err


def _legacy_folder(tmp_path: Path, keys: str | None) -> list[str]:
    vols = tmp_path / "npz"
    vols.mkdir()
    for i in range(6):
        write_npz(vols / f"case{i:02d}.npz", shape=SHAPE, seed=i)
    args = ["--train_data_dir", str(vols)]
    if keys is not None:
        reports = {f"case{i:02d}{keys}": f"Report number {i}." for i in range(6)}
        (tmp_path / "reports.json").write_text(json.dumps(reports))
        args += ["--text_reports_path", str(tmp_path / "reports.json")]
    return args


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (".npz", "its keys must be the NPZ file stems, such as 'case00', 'case01'; it has keys such as 'case00.npz'"),
        (None, "no reports file was given: pass --text_reports_path REPORTS.json"),
    ],
)
def test_a_split_without_its_reports_stops_and_says_which_keys_were_expected(
    keys, says, tmp_path, tiny_llama_dir, capsys
):
    """Before: a warning, then a CLIP model trained on "No report available." alone, exit 0."""
    data = _legacy_folder(tmp_path, keys)
    argv = [*data, *tiny_args("x.csv", tmp_path / "run", tiny_llama_dir, "--max_steps", "1")[2:]]
    assert siglip_trainer.main(argv) == 2
    (err,) = error_lines(capsys.readouterr().err)
    assert "6 of 6 training rows have no report (above --max_missing_reports 0.1" in err
    assert says in err


# ------------------------------------------------------------------------------------------------- smaller
def test_a_repeated_report_column_is_refused_not_read_at_random(tmp_path):
    write_npz(tmp_path / "a.npz", shape=SHAPE)
    (tmp_path / "d.csv").write_text("img_path,findings,split,findings\na.npz,Left effusion.,train,No effusion.\n")
    with pytest.raises(DataError, match=r"d\.csv: column 'findings' appears 2 times \(columns 2, 4\)"):
        read_csv_table(tmp_path / "d.csv", "train")


def test_a_csv_that_is_not_utf8_names_the_row(tmp_path):
    write_npz(tmp_path / "a.npz", shape=SHAPE)
    text = "img_path,findings,split\na.npz,Normal.,train\na.npz,Kein Erguss.,train\na.npz,Épanchement.,train\n"
    (tmp_path / "d.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.csv, row 3: not UTF-8 text at line 4 \(byte 0xc9\)"):
        read_csv_table(tmp_path / "d.csv", "train")


def test_unused_rows_are_named_with_what_the_run_really_uses(tmp_path, caplog):
    write_npz(tmp_path / "a.npz", shape=SHAPE)
    write_npz(tmp_path / "b.npz", shape=SHAPE)
    write_npz(tmp_path / "c.npz", shape=SHAPE)
    pd.DataFrame({"img_path": ["a.npz", "b.npz", "c.npz"], "findings": ["x", "y", "z"],
                  "split": ["train", "val", "test"]}).to_csv(tmp_path / "d.csv", index=False)  # fmt: skip
    read_csv_table(tmp_path / "d.csv", "train", known_splits=("train", ""))  # --val_split ''
    assert "row 2: unknown split value 'val' (this run uses train); these rows are not used" in caplog.text
    assert "'test'" not in caplog.text  # a held-out test split is no mistake


def test_unsafe_loading_is_never_advised(tmp_path):
    """torch's refusal of a pickled object suggests weights_only=False, which would run the file's code."""
    import os

    import torch

    from ct_siglip.checkpoint import CheckpointError, load_checkpoint
    from ct_siglip.errors import ConfigError
    from ct_siglip.text_weights import read_text_weights

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    for load, error in ((load_checkpoint, CheckpointError), (read_text_weights, ConfigError)):
        with pytest.raises(error) as info:
            load(tmp_path / "evil.pt")
        assert "weights_only" not in str(info.value).replace("weights_only=True", "") and "\n" not in str(info.value)
        assert "system" in str(info.value)  # the reason: what it tried to import


def test_a_bad_validation_file_alone_says_nothing_about_training_rows(tmp_path, tiny_llama_dir):
    """Before: 'Preflight: 0 bad training rows will be replaced when drawn'."""
    csv = make_csv(tmp_path, 8, 2)
    damage(tmp_path / "vols" / "case09.npz", "corrupt deflate data")
    run = tmp_path / "run"
    args = ["--max_steps", "1", "--on_bad_sample", "skip", "--eval_interval", "0"]
    assert siglip_trainer.main(tiny_args(csv, run, tiny_llama_dir, *args)) == 0
    log = (run / "train.log").read_text()
    assert "bad training rows" not in log and "row 10 of the validation split left out" in log
