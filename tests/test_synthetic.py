"""Synthetic phantoms: windowing, anatomy orientation, visibility of every finding, reports, the data set."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from ct_siglip import synthetic as S
from ct_siglip.volume_io import load_volume

SHAPE = (32, 64, 64)  # the demo's resolution: findings must be visible here
NONE = dict.fromkeys(S.FINDINGS, False)


def case(seed: int, shape=SHAPE, **force):
    return S.make_case(np.random.default_rng(seed), shape, force={**NONE, **force})


def centroid(mask: np.ndarray) -> np.ndarray:
    """Mean (D, H, W) index of a boolean mask, as a fraction of each axis length."""
    idx = np.argwhere(mask)
    assert len(idx), "empty mask"
    return idx.mean(axis=0) / (np.array(mask.shape) - 1)


def test_window_maps_each_range_to_unit_interval():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 2000.0, 5000.0], dtype=np.float32)
    out = S.window(hu)
    assert out.shape == (2, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0, 0, 0.5, 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(out[1], [0, 0, 700 / 3000, 1400 / 3000, 1, 1], atol=1e-6)
    assert S.window(hu, dtype=np.float16).dtype == np.float16
    with pytest.raises(ValueError):
        S.window(hu, windows=((400, -1000),))


def test_case_shape_range_and_determinism():
    hu, labels, report = S.make_case(np.random.default_rng(3))
    assert hu.shape == SHAPE and hu.dtype == np.float32
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert np.median(hu[:, :, 0]) < -900  # posterior edge of the field: air below the table
    assert set(S.FINDINGS) <= set(labels) and all(labels[k] in (0, 1) for k in (*S.FINDINGS, *S.SIDE_FINDINGS))
    assert isinstance(report, str) and report.endswith(".")
    hu2, labels2, report2 = S.make_case(np.random.default_rng(3))
    np.testing.assert_array_equal(hu, hu2)
    assert report == report2 and labels["details"] == labels2["details"]


def test_forcing_a_finding_leaves_the_rest_of_the_case_unchanged():
    base, _, _ = case(5)
    with_nodule, labels, _ = case(5, **{"Lung nodule": True})
    changed = np.abs(with_nodule - base) > 1e-3
    assert labels["Lung nodule"] == 1 and 0 < changed.sum() < 200  # the nodule, nothing else


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_is_dependent_and_on_the_stated_side(side):
    base, _, _ = case(11)
    fluid, labels, report = case(11, **{"Pleural effusion": side})
    assert labels["effusion_side"] == side and labels[f"{side.capitalize()} pleural effusion"] == 1
    assert side in report.lower()
    changed = np.abs(fluid - base) > 200  # aerated lung (~ -850) became fluid (~ 10)
    assert changed.sum() > 100
    d, h, w = centroid(changed)
    assert (h < 0.5) if side == "left" else (h > 0.5)  # H increases toward the patient's right
    assert w < 0.4  # W increases anteriorly; fluid layers at the back
    assert d < 0.5  # and collects toward the base
    assert -60 < np.median(fluid[changed]) < 80


def test_heart_is_left_of_midline_and_anterior():
    base, _, _ = case(21)
    big, _, _ = case(21, Cardiomegaly=True)
    grown = (big - base) > 300  # lung replaced by heart muscle
    _, h, w = centroid(grown)
    assert h < 0.5 and w > 0.5


@pytest.mark.parametrize("finding", S.FINDINGS)
def test_every_finding_is_visible_at_demo_resolution(finding):
    """Each finding changes a clear number of voxels by a clear amount, in every one of a few cases."""
    for seed in range(3):
        base, _, _ = case(seed)
        img, labels, _ = case(seed, **{finding: True})
        assert labels[finding] == 1
        diff = np.abs(img - base)
        strong = (diff > 25).sum()
        assert strong >= 6, f"{finding}, seed {seed}: only {strong} voxels changed by > 25 HU"


def test_small_nodules_are_rendered_at_least_a_few_voxels_wide():
    sizes = []
    for seed in range(12):
        base, _, _ = case(seed)
        img, labels, _ = case(seed, **{"Lung nodule": True})
        grown = (img - base) > 300
        sizes.append((labels["nodule_mm"], grown.sum()))
    small = [n for mm, n in sizes if mm < 10]
    assert small, sizes
    assert min(small) >= 12, sizes  # ~3 x 3 x 2.5 voxels at least


def assert_report_agrees(labels, report):
    """Every present finding has a sentence that is not a negation; an absent one only negations or filler."""
    negations = {s for group in S._NEG.values() for s in group}
    negations |= {"No pleural or pericardial effusion.", "There is no pleural or pericardial effusion."}
    keywords = {
        "Pleural effusion": "pleural",
        "Lung nodule": "nodul",
        "Cardiomegaly": "cardiomegaly|heart|cardiac",
        "Pericardial effusion": "pericardi",
        "Emphysema": "emphysem",
        "Consolidation": "consolidation",
        "Atelectasis": "atelectasis",
        "Lymphadenopathy": "lymph",
    }
    sentences = re.findall(r"[^.]*\.", report)
    for name, pattern in keywords.items():
        hits = [s.strip() for s in sentences if re.search(pattern, s, re.IGNORECASE)]
        if int(labels[name]):
            assert any(h not in negations for h in hits), (name, report)
        else:
            assert all(h in negations or h in S._FILLER for h in hits), (name, report)
    if labels["effusion_side"] in ("left", "right"):
        assert labels["effusion_side"] in report.lower()


def test_reports_agree_with_labels():
    rng = np.random.default_rng(0)
    for _ in range(60):
        _, labels, report = S.make_case(rng, (16, 32, 32))
        assert_report_agrees(labels, report)


def test_paraphrase_column_is_another_report_of_the_same_case(tmp_path):
    """The text pairs for `ct_siglip.simcse`: worded independently, true to the same labels."""
    rows = read_csv(S.generate_dataset(tmp_path, 40, shape=(16, 32, 32), seed=3))
    for r in rows:
        assert_report_agrees(r, r[S.PARAPHRASE_COLUMN])
        assert_report_agrees(r, r["findings"])
    assert sum(r[S.PARAPHRASE_COLUMN] != r["findings"] for r in rows) == len(rows)


def test_reports_are_varied():
    rng = np.random.default_rng(1)
    reports = [S.make_case(rng, (16, 32, 32))[2] for _ in range(80)]
    assert len(set(reports)) == len(reports)
    firsts = {r.split(".")[0] for r in reports}
    assert len(firsts) > 20  # random sentence order
    negs = {s for r in reports for s in S._NEG["Pleural effusion"] if s in r}
    assert len(negs) >= 3


def test_prevalence_is_moderate():
    rng = np.random.default_rng(2)
    labels = [S.make_case(rng, (16, 32, 32))[1] for _ in range(150)]
    for name in S.FINDINGS:
        rate = np.mean([lab[name] for lab in labels])
        assert 0.15 < rate < 0.45, (name, rate)
    sides = {lab["effusion_side"] for lab in labels if lab["Pleural effusion"]}
    assert sides == {"left", "right", "both"}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_generate_dataset_writes_contract_files_and_caches(tmp_path):
    out = tmp_path / "syn"
    csv_path = S.generate_dataset(out, 10, shape=(16, 32, 32), seed=4)
    rows = read_csv(csv_path)
    assert len(rows) == 10
    assert list(rows[0])[:3] == ["img_path", "findings", "split"]
    assert set(S.FINDINGS) | set(S.SIDE_FINDINGS) | {"effusion_side"} <= set(rows[0])
    assert sorted(r["split"] for r in rows).count("train") == 8
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows[:3]:
        img = load_volume(csv_path.parent / r["img_path"], row=0)  # the data contract's own checker
        assert img.shape == (2, 16, 32, 32) and img.dtype == np.float16
        with np.load(csv_path.parent / r["img_path"]) as npz:
            np.testing.assert_allclose(npz["spacing"], S.default_spacing((16, 32, 32)))
    params = json.loads((out / S.PARAMS_NAME).read_text())
    assert params["n"] == 10 and params["shape"] == [16, 32, 32]

    stamp = csv_path.stat().st_mtime_ns
    assert S.generate_dataset(out, 10, shape=(16, 32, 32), seed=4) == csv_path
    assert csv_path.stat().st_mtime_ns == stamp  # cached: not rewritten
    S.generate_dataset(out, 6, shape=(16, 32, 32), seed=5)  # other parameters: rebuilt, leftovers removed
    assert len(read_csv(csv_path)) == 6
    assert len(list((out / S.IMAGE_DIR).glob("*.npz"))) == 6
    (out / rows[0]["img_path"]).unlink()
    S.generate_dataset(out, 6, shape=(16, 32, 32), seed=5)  # a missing volume invalidates the cache
    assert (out / rows[0]["img_path"]).is_file()


def test_workers_give_the_same_data_as_one_process(tmp_path):
    a = S.generate_dataset(tmp_path / "a", 6, shape=(16, 32, 32), seed=7, workers=1)
    b = S.generate_dataset(tmp_path / "b", 6, shape=(16, 32, 32), seed=7, workers=2)
    assert read_csv(a) == read_csv(b)
    with np.load(a.parent / "images/case_00003.npz") as x, np.load(b.parent / "images/case_00003.npz") as y:
        np.testing.assert_array_equal(x["image"], y["image"])


def test_cli_and_preview(tmp_path):
    pytest.importorskip("matplotlib")
    assert S.main(["--out", str(tmp_path), "--n", "4", "--shape", "16", "32", "32", "--preview", "2"]) == 0
    png = tmp_path / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_csv(tmp_path / S.CSV_NAME)) == 4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        S.make_case(np.random.default_rng(0), (4, 64, 64))
    with pytest.raises(ValueError, match="unknown findings"):
        S.make_case(np.random.default_rng(0), force={"Pneumothorax": True})
    with pytest.raises(ValueError, match="side"):
        S.make_case(np.random.default_rng(0), force={"Pleural effusion": "middle"})
