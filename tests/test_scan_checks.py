"""The preprocessor converts chest CTs only: real DICOM and NIfTI files shipped with pydicom and nibabel (a
localizer pair, a head CT with a 200 mm gap, MR series, an 8 mm field of view, an MR NIfTI) are refused with one
line each in failures.csv; DICOM series are found without a .dcm extension; a stray file is no series."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ct_siglip.errors import DataError
from ct_siglip.preprocess import main, preprocess_volume
from ct_siglip.scan_checks import check_dicom_series, find_series

pydicom = pytest.importorskip("pydicom")
DICOMDIR_TESTS = Path(os.path.dirname(pydicom.data.__file__)) / "test_files" / "dicomdirtests"
NIBABEL_DATA = Path(os.path.dirname(nib.__file__)) / "tests" / "data"


def series(tmp_path: Path, name: str, *sources: str) -> Path:
    """A copy of pydicom's test series (their files have no extension, as in many PACS exports)."""
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for src in sources:
        for f in (DICOMDIR_TESTS / src).iterdir():
            shutil.copy(f, folder / f"{Path(src).name}_{f.name}")
    return folder


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("98892001/CT2N", "a localizer (scout) series of 2 images (ImageType LOCALIZER), not a CT volume"),
        ("77654033/CT2", "slice spacing not uniform: 202.5 mm between slices 1 and 2 (of 4), 1.25 mm elsewhere"),
        ("98892003/MR1", "Modality MR x 3, not CT"),
        ("98892001/CT5N", "covers only 12 x 8 x 8 mm (slices x rows x columns), below --min_extent_mm 100"),
    ],
    ids=["localizer", "head-ct-with-a-gap", "mr", "8mm-field-of-view"],
)
def test_what_is_not_a_chest_ct_series_is_refused_from_its_headers(tmp_path, source, says):
    folder = series(tmp_path, "s", source)
    with pytest.raises(DataError) as info:
        check_dicom_series(folder)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_two_series_in_one_folder_are_named(tmp_path):
    folder = series(tmp_path, "s", "98892001/CT5N", "77654033/CT2")
    with pytest.raises(DataError, match=r"2 series mixed in one folder \(.* x 5, .* x 4 files\)"):
        check_dicom_series(folder)


def test_an_mr_nifti_is_not_converted_as_ct(tmp_path):
    """nibabel's anatomical.nii is an MR brain: before, it converted to a 'valid' volume without a word."""
    with pytest.raises(DataError, match=r"not Hounsfield units of a chest CT \(minimum -610;"):
        preprocess_volume(NIBABEL_DATA / "anatomical.nii", min_extent_mm=0, size=(32, 32, 16))


def test_a_2d_image_gets_its_own_hint(tmp_path):
    nib.save(nib.Nifti1Image(np.full((64, 64), -1000.0, np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(DataError) as info:
        preprocess_volume(tmp_path / "slice.nii.gz", min_extent_mm=0)
    assert "a single image (a localizer or one slice) is no volume" in str(info.value)
    assert "4-D" not in str(info.value)


def test_series_are_found_by_content_and_a_stray_file_is_no_series(tmp_path):
    root = tmp_path / "export"
    good = series(root, "patient/ct", "98892001/CT5N")
    shutil.copy(next((DICOMDIR_TESTS / "77654033/CT2").iterdir()), root / "patient" / "IM0001")  # a stray file
    (good / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), root / "other.nii.gz")
    scans, single = find_series(root)
    assert scans == sorted([good, root / "other.nii.gz"]) and single == [root / "patient"]


def test_the_cli_lists_every_refused_scan_with_one_line_and_keeps_monai_quiet(tmp_path, capsys):
    root = tmp_path / "in"
    for name, src in (("scout", "98892001/CT2N"), ("gap", "77654033/CT2"), ("mr", "98892003/MR1")):
        series(root, name, src)
    shutil.copy(NIBABEL_DATA / "anatomical.nii", root / "brain.nii")
    code = main(["--input_dir", str(root), "--out_dir", str(tmp_path / "out"), "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    failures = pd.read_csv(tmp_path / "out" / "failures.csv")
    reasons = dict(zip(failures["source"].map(lambda p: Path(p).name), failures["reason"]))
    assert set(reasons) == {"scout", "gap", "mr", "brain.nii"}
    assert "localizer" in reasons["scout"] and "not uniform" in reasons["gap"] and "Modality MR" in reasons["mr"]
    assert "not Hounsfield units" in reasons["brain.nii"]
    assert "nvImageCodec" not in out + err
