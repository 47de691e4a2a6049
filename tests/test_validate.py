"""CSV checking and the example scripts: every bad row named with its reason, exit codes, forwarding."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_csv_example
import train_example
from ct_siglip.validate import validate_csv

SHAPE = (2, 4, 8, 8)  # (C, D, H, W)


def _npz(path: Path, arr: np.ndarray | None = None, key: str = "image") -> str:
    arr = np.random.default_rng(0).random(SHAPE).astype(np.float16) if arr is None else arr
    np.savez_compressed(path, **{key: arr})
    return path.name


def _good_rows(root: Path) -> list[dict]:
    _npz(root / "good4.npz")
    return [
        {"img_path": _npz(root / "good1.npz"), "findings": "No acute findings.", "split": "train"},
        {"img_path": _npz(root / "good2.npz"), "findings": "Small left effusion.", "split": "train"},
        {"img_path": _npz(root / "good3.npz"), "findings": "Right lower lobe nodule.", "split": "val"},
        {"img_path": str((root / "good4.npz").resolve()), "findings": "Emphysema.", "split": "test"},  # absolute
    ]


@pytest.fixture
def mixed_csv(tmp_path: Path) -> Path:
    rows = _good_rows(tmp_path)
    _npz(tmp_path / "full.npz")
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:60])
    bad = [  # rows 5-12 of EXPECTED_BAD, in order
        "missing.npz",
        "truncated.npz",
        _npz(tmp_path / "nokey.npz", key="volume"),
        _npz(tmp_path / "ndim.npz", np.zeros((4, 8, 8), np.float16)),
        _npz(tmp_path / "channels.npz", np.zeros((3, 4, 8, 8), np.float16)),
        _npz(tmp_path / "int.npz", np.zeros(SHAPE, np.int16)),
        _npz(tmp_path / "nan.npz", np.full(SHAPE, np.nan, np.float32)),
        _npz(tmp_path / "big.npz", np.full(SHAPE, 1.5, np.float32)),
    ]
    rows += [{"img_path": name, "findings": "Some report.", "split": "train"} for name in bad]
    rows += [
        {"img_path": _npz(tmp_path / "noreport.npz"), "findings": "", "split": "train"},
        dict(rows[0]),  # the same row again
        {"img_path": _npz(tmp_path / "oddsplit.npz"), "findings": "Report.", "split": "training"},
        {"img_path": "./good2.npz", "findings": "Small left effusion.", "split": "val"},  # leaks into val
        {"img_path": "good3.npz", "findings": "Second report, same scan.", "split": "val"},  # allowed
    ]
    csv = tmp_path / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


EXPECTED_BAD = {  # data row (header not counted) -> (check, reason fragment)
    5: ("exists", "file not found"),
    6: ("loads", "cannot read NPZ"),
    7: ("key", "key 'image' missing"),
    8: ("ndim", "4-D"),
    9: ("channels", "expected 2 channels, got 3"),
    10: ("dtype", "dtype int16"),
    11: ("finite", "NaN"),
    12: ("range", "outside [0, 1]"),
    13: ("report", "empty report"),
    14: ("duplicate", "duplicate of row 1"),
    15: ("split", "unknown split 'training'"),
    16: ("duplicate", "same image as row 2, in split 'train' there"),
}


def test_each_bad_row_is_named_with_its_reason(mixed_csv: Path, capsys):
    result = validate_csv(mixed_csv, workers=2)
    assert len(result) == 17 and result["row"].tolist() == list(range(1, 18))
    assert result.loc[result["ok"], "row"].tolist() == [1, 2, 3, 4, 17]
    assert result.attrs["rows_sharing_an_image"] == 1
    for row, (check, fragment) in EXPECTED_BAD.items():
        r = result.set_index("row").loc[row]
        assert not r["ok"] and r["checks"] == check and fragment in r["reason"], (row, r.to_dict())

    bad_file = mixed_csv.with_name("data_bad_rows.csv")
    bad = pd.read_csv(bad_file)
    assert bad["row"].tolist() == sorted(EXPECTED_BAD) and "img_path" in bad.columns
    out = capsys.readouterr().out
    assert "5 ok, 12 bad" in out and "row 5: missing.npz: file not found" in out and str(bad_file) in out


def test_cli_exits_non_zero_on_bad_rows(mixed_csv: Path, capsys):
    assert train_csv_example.main(["--csv_file", str(mixed_csv), "--validate_csv"]) == 1
    out = capsys.readouterr().out
    assert "CSV has problems" in out and "row 10: int.npz: dtype int16" in out


def test_clean_csv_passes(tmp_path: Path, capsys):
    csv = tmp_path / "clean.csv"
    pd.DataFrame(_good_rows(tmp_path)).to_csv(csv, index=False)
    (tmp_path / "clean_bad_rows.csv").write_text("stale\n")
    assert train_csv_example.main(["--csv_file", str(csv), "--validate_csv"]) == 0
    assert "CSV OK" in capsys.readouterr().out
    assert not (tmp_path / "clean_bad_rows.csv").exists()  # an old list would mislead


def test_table_problems(tmp_path: Path, capsys):
    csv = tmp_path / "renamed.csv"
    rows = pd.DataFrame(_good_rows(tmp_path)).rename(columns={"findings": "report"})
    rows.to_csv(csv, index=False)
    assert train_csv_example.main(["--csv_file", str(csv), "--validate_csv"]) == 2
    err = capsys.readouterr().err
    assert "'findings' (--findings_column)" in err and "img_path, report, split" in err
    assert train_csv_example.main(["--csv_file", str(csv), "--validate_csv", "--findings_column", "report"]) == 0

    rows[rows["split"] != "val"].to_csv(csv, index=False)  # the trainer needs a val split unless told otherwise
    assert train_csv_example.main(["--csv_file", str(csv), "--validate_csv", "--findings_column", "report"]) == 1
    assert "no rows in split 'val'" in capsys.readouterr().out
    args = ["--csv_file", str(csv), "--validate_csv", "--findings_column", "report", "--val_split", ""]
    assert train_csv_example.main(args) == 0


def test_create_example_csv_from_npz_directory(tmp_path: Path):
    npz = tmp_path / "npz"
    npz.mkdir()
    for i in range(10):
        _npz(npz / f"scan{i:02d}.npz")
    (tmp_path / "reports.json").write_text(json.dumps({"scan03": "Real report three."}))
    out = tmp_path / "csvs" / "example.csv"
    args = ["--create_example_csv", "--npz_directory", str(npz), "--output_csv", str(out), "--validate_csv"]
    assert train_csv_example.main([*args, "--text_reports_path", str(tmp_path / "reports.json")]) == 0
    df = pd.read_csv(out)
    assert df["img_path"].tolist()[0] == "../npz/scan00.npz"  # relative to the CSV
    assert df.loc[3, "findings"] == "Real report three." and df["findings"].str.startswith("Placeholder").sum() == 9
    assert sorted(df["split"].value_counts().items()) == [("test", 1), ("train", 8), ("val", 1)]
    first = df["split"].tolist()
    assert train_csv_example.main(args) == 0
    assert pd.read_csv(out)["split"].tolist() == first  # seeded


@pytest.fixture
def fake_trainer(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    module = types.ModuleType("siglip_trainer")
    module.main = lambda argv: calls.append(list(argv))
    monkeypatch.setitem(sys.modules, "siglip_trainer", module)
    return calls


def test_training_args_are_forwarded(tmp_path: Path, fake_trainer):
    csv = tmp_path / "d.csv"
    pd.DataFrame(_good_rows(tmp_path)).to_csv(csv, index=False)
    argv = ["--csv_file", str(csv), "--split_column", "split", "--max_steps", "3", "--demo", "--save_dir=runs/x"]
    assert train_csv_example.main(argv) == 0
    (got,) = fake_trainer
    assert got[:2] == ["--csv_file", str(csv)] and got[got.index("--split_column") + 1] == "split"
    assert got.count("--max_steps") == 1 and got[got.index("--max_steps") + 1] == "3"
    assert "--demo" in got and "--save_dir=runs/x" in got and "--save_dir" not in got
    assert got[got.index("--batch_size") + 1] == "2" and "--freeze_image_backbone" in got


def test_synthetic_example_csv(tmp_path: Path, fake_trainer):
    example_dir = tmp_path / "ex"
    argv = ["--create_example_csv", "--example_dir", str(example_dir), "--num_samples", "6"]
    assert train_csv_example.main([*argv, "--validate_csv"]) == 0  # generated, checked, no training
    assert train_csv_example.main([*argv, "--no_freeze_image_backbone"]) == 0  # reused, then trained
    (got,) = fake_trainer
    assert got[:2] == ["--csv_file", str(example_dir / "synthetic.csv")] and "--freeze_image_backbone" not in got


def test_train_example_directory_mode(tmp_path: Path, fake_trainer, capsys):
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir(), val.mkdir()
    _npz(train / "a.npz"), _npz(train / "b.npz"), _npz(val / "c.npz")
    argv = ["--train_data_dir", str(train), "--val_data_dir", str(val), "--create_example_reports", "--max_steps", "1"]
    assert train_example.main(argv) == 0
    reports = json.loads((train / "example_reports.json").read_text())
    assert sorted(reports) == ["a", "b", "c"]
    (got,) = fake_trainer
    assert got[got.index("--text_reports_path") + 1] == str(train / "example_reports.json")
    assert got[got.index("--val_data_dir") + 1] == str(val) and got[got.index("--max_steps") + 1] == "1"

    assert train_example.main(["--train_data_dir", str(tmp_path / "nope")]) == 2
    assert "folder not found" in capsys.readouterr().err
