"""Preprocessing: orientation and geometry on generated scans, resuming, failures that do not stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ct_siglip.errors import DataError
from ct_siglip.preprocess import main, preprocess_volume
from ct_siglip.validate import validate_csv

# (H, W, D); keeps every scan to ~1 s. The phantoms are a few cm wide, far below a chest CT's extent: the
# minimum-extent check (tested in test_scan_checks.py) is off for them.
SMALL = {"spacing": (2.0, 2.0, 4.0), "size": (32, 32, 16)}
SMALL_ARGS = ["--spacing", "2", "2", "4", "--size", "32", "32", "16", "--min_extent_mm", "0"]


def _affine(columns: dict[int, tuple[int, float]], origin=(10.0, 20.0, -30.0)) -> np.ndarray:
    """4 x 4 affine where voxel axis k moves along world axis `columns[k][0]` by `columns[k][1]` mm."""
    aff = np.eye(4)
    aff[:3, :3] = 0
    for k, (world_axis, step) in columns.items():
        aff[world_axis, k] = step
    aff[:3, 3] = origin
    return aff


def _phantom(shape, marker: tuple[slice, slice, slice]) -> np.ndarray:
    """Air around a soft-tissue box; a bone-bright marker block inside it."""
    vol = np.full(shape, -1000.0, np.float32)
    vol[tuple(slice(3, n - 3) for n in shape)] = 40.0
    vol[marker] = 1500.0
    return vol


def _marker_dhw(image: np.ndarray) -> np.ndarray:
    """Centre of the voxels whose wide (-1000, 2000) window is bone-bright: only the marker."""
    return np.argwhere(image[1].astype(np.float32) > 0.7).mean(axis=0)


def _body_centre_dhw(image: np.ndarray) -> np.ndarray:
    return np.argwhere(image[1].astype(np.float32) > 0.2).mean(axis=0)


# Case 1: NIfTI file, axes permuted and flipped: voxel axis 0 = slices toward Inferior (3 mm), axis 1
# toward the patient's Left (0.8 mm), axis 2 toward Posterior (0.9 mm), i.e. orientation "ILP".
# Marker at the patient's left-anterior-superior: small axis 0, large axis 1, small axis 2.
ILP = _affine({0: (2, -3.0), 1: (0, -0.8), 2: (1, -0.9)})
ILP_MARKER = (slice(4, 7), slice(26, 34), slice(6, 14))
# Case 2: an array in DICOM-like LPS order (axis 0 toward Left, 1 toward Posterior, 2 Superior), 0.7 / 0.7 / 2.5 mm.
# Marker at the patient's right-posterior-inferior: small axis 0, large axis 1, small axis 2.
LPS = _affine({0: (0, -0.7), 1: (1, -0.7), 2: (2, 2.5)})
LPS_MARKER = (slice(6, 14), slice(28, 36), slice(4, 8))


@pytest.mark.parametrize(
    ("shape", "affine", "marker", "codes", "sides"),
    [
        ((24, 40, 36), ILP, ILP_MARKER, ("I", "L", "P"), {"D": "superior", "H": "left", "W": "anterior"}),
        ((40, 40, 30), LPS, LPS_MARKER, ("L", "P", "S"), {"D": "inferior", "H": "right", "W": "posterior"}),
    ],
    ids=["nifti-ILP", "array-LPS"],
)
def test_marker_lands_on_documented_side(tmp_path: Path, shape, affine, marker, codes, sides):
    assert nib.aff2axcodes(affine) == codes  # the input really is not RAS
    vol = _phantom(shape, marker)
    if codes == ("I", "L", "P"):
        path = tmp_path / "scan.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), path)
        image, meta = preprocess_volume(path, min_extent_mm=0, **SMALL)
    else:
        image, meta = preprocess_volume(vol, affine, **SMALL)

    assert image.shape == (2, 16, 32, 32)  # (C, D, H, W) with --size H W D = 32 32 16
    assert image.dtype == np.float16
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert meta["original_orientation"] == "".join(codes) and meta["layout"] == "CDHW"
    assert meta["spacing_dhw_mm"] == [4.0, 2.0, 2.0]

    # The documented convention, independent of any affine arithmetic:
    # D grows toward Superior, H toward the patient's Right, W toward Anterior.
    found, body = _marker_dhw(image), _body_centre_dhw(image)
    expect_higher = {"D": sides["D"] == "superior", "H": sides["H"] == "right", "W": sides["W"] == "anterior"}
    for axis, k in (("D", 0), ("H", 1), ("W", 2)):
        assert (found[k] > body[k]) == expect_higher[axis], (axis, found, body)
        assert abs(found[k] - body[k]) >= 1.5, (axis, found, body)

    # And exactly: the marker's world position, mapped through the output grid's affine (H, W, D -> RAS mm).
    centre = np.array([(s.start + s.stop - 1) / 2 for s in marker] + [1.0])
    world = affine @ centre
    h, w, d, _ = np.linalg.solve(np.array(meta["affine_hwd_ras"]), world)
    np.testing.assert_allclose(found, [d, h, w], atol=0.5)


def test_array_without_affine_is_taken_as_1mm_ras():
    vol = _phantom((30, 30, 20), (slice(20, 26), slice(5, 10), slice(12, 16)))  # right, posterior, superior
    image, meta = preprocess_volume(vol, size=(32, 32, 16), spacing=(1.5, 1.5, 1.5))
    found, body = _marker_dhw(image), _body_centre_dhw(image)
    assert found[0] > body[0] and found[1] > body[1] and found[2] < body[2]
    assert meta["original_orientation"] == "RAS" and meta["cropped_axes"] == []


def _write_cases(root: Path) -> Path:
    scans = root / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(_phantom((24, 40, 36), ILP_MARKER), ILP), scans / f"{name}.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    (scans / "truncated.nii.gz").write_bytes((scans / "a.nii.gz").read_bytes()[:400])
    dicom = scans / "series1"
    dicom.mkdir()
    (dicom / "IM0001.dcm").write_bytes(b"not really DICOM")
    table = pd.DataFrame(
        {
            "image": [
                "scans/a.nii.gz",
                "scans/broken.nii.gz",
                "scans/b.nii.gz",
                "scans/series1",
                "scans/truncated.nii.gz",
            ],
            "report": ["Right lower lobe nodule.", "Broken scan.", "No acute findings.", "DICOM scan.", "Cut short."],
            "split": ["train", "train", "val", "test", "train"],
            "patient_id": ["P1", "P2", "P3", "P4", "P5"],
        }
    )
    table.to_csv(root / "scans.csv", index=False)
    return root / "scans.csv"


def test_cli_resumes_and_reports_failures(tmp_path: Path, capsys):
    csv = _write_cases(tmp_path)
    out = tmp_path / "npz"
    base = ["--input_csv", str(csv), "--out_dir", str(out), "--findings_column", "report", "--min_extent_mm", "0"]
    argv = [*base, *SMALL_ARGS]

    assert main([*argv, "--workers", "1"]) == 1  # three rows fail, the others finish

    failures = pd.read_csv(out / "failures.csv")
    assert failures["row"].tolist() == [2, 4, 5]  # data rows of scans.csv, counted from 1
    assert "not a readable NIfTI file" in failures["reason"][0]
    assert "cannot read scan" in failures["reason"][2] or "not a readable NIfTI" in failures["reason"][2]
    try:
        import pydicom  # noqa: F401
    except ImportError:
        assert "pydicom is not installed" in failures["reason"][1]

    dataset = pd.read_csv(out / "dataset.csv")
    assert dataset["img_path"].tolist() == ["a.npz", "b.npz"]  # relative to the CSV's folder
    assert dataset["findings"].tolist() == ["Right lower lobe nodule.", "No acute findings."]
    assert dataset["split"].tolist() == ["train", "val"]
    assert dataset["patient_id"].tolist() == ["P1", "P3"]
    assert dataset["source_path"].tolist() == ["scans/a.nii.gz", "scans/b.nii.gz"]
    with np.load(out / "a.npz") as z:
        assert z["image"].shape == (2, 16, 32, 32) and z["image"].dtype == np.float16
        np.testing.assert_allclose(z["spacing"], [4.0, 2.0, 2.0])
    meta = json.loads((out / "a.json").read_text())
    assert meta["source"].endswith("a.nii.gz") and meta["shape"] == [2, 16, 32, 32]
    assert meta["original_shape"] == [24, 40, 36] and len(meta["original_affine_ras"]) == 4
    assert not list(out.glob("*.tmp"))
    assert validate_csv(out / "dataset.csv", report=False)["ok"].all()  # ready for training

    mtime = (out / "a.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*argv, "--workers", "1"]) == 1
    assert "converted 0, already done 2, failed 3" in capsys.readouterr().out
    assert (out / "a.npz").stat().st_mtime_ns == mtime

    # Other settings make the finished files stale: they are redone, not reused.
    assert main([*base, "--spacing", "2", "2", "4", "--size", "32", "32", "8", "--workers", "1"]) == 1
    with np.load(out / "a.npz") as z:
        assert z["image"].shape == (2, 8, 32, 32)


@pytest.mark.slow
def test_process_pool_gives_the_same_files(tmp_path: Path):
    """Workers are spawned processes (each imports MONAI, hence slow): same bytes, failures still caught."""
    scans = tmp_path / "in"
    scans.mkdir()
    nib.save(nib.Nifti1Image(_phantom((24, 40, 36), ILP_MARKER), ILP), scans / "a.nii.gz")
    (scans / "bad.nii").write_bytes(b"garbage")
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["--input_dir", str(scans), "--out_dir", str(out), *SMALL_ARGS, "--workers", str(workers)]) == 1
        assert pd.read_csv(out / "failures.csv")["source"].str.endswith("bad.nii").tolist() == [True]
    with np.load(tmp_path / "w1" / "a.npz") as one, np.load(tmp_path / "w2" / "a.npz") as two:
        np.testing.assert_array_equal(one["image"], two["image"])


def test_input_dir_without_csv(tmp_path: Path):
    scans = tmp_path / "in" / "p1"
    scans.mkdir(parents=True)
    nib.save(nib.Nifti1Image(_phantom((24, 40, 36), ILP_MARKER), ILP), scans / "ct.nii")
    out = tmp_path / "out"
    assert main(["--input_dir", str(tmp_path / "in"), "--out_dir", str(out), *SMALL_ARGS, "--workers", "1"]) == 0
    dataset = pd.read_csv(out / "dataset.csv", keep_default_na=False)
    assert dataset.loc[0, "img_path"] == "ct.npz" and dataset.loc[0, "source_path"] == "p1/ct.nii"
    assert not (out / "failures.csv").exists()


def test_missing_image_column_is_one_clear_error(tmp_path: Path, capsys):
    pd.DataFrame({"path": ["x.nii.gz"]}).to_csv(tmp_path / "s.csv", index=False)
    assert main(["--input_csv", str(tmp_path / "s.csv"), "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "column 'image' missing" in err and "--image_column" in err


def test_implausible_values_are_flagged():
    _, meta = preprocess_volume(np.random.default_rng(0).random((20, 20, 10)), size=(16, 16, 8))
    assert "Hounsfield" in meta["warnings"][0]  # already-scaled data: kept, but the sidecar says why it looks wrong
    with pytest.raises(DataError, match="no voxel above -500 HU"):
        preprocess_volume(np.full((10, 10, 10), -1000.0), size=(16, 16, 8))
