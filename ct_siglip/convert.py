"""One scan -> the stored training array: the settings, reading a NIfTI file or DICOM series, and the MONAI
transforms (orient to RAS, resample, crop to the body, pad or crop to size, window), with the checks that the
scan is a chest CT (`scan_checks`). The command that converts a whole table is `ct_siglip.preprocess`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .scan_checks import (
    MIN_EXTENT_MM,
    NIFTI_SUFFIXES,
    check_dicom_series,
    check_extent,
    check_hounsfield,
    quiet_monai_dicom_logs,
)

FORMAT_VERSION = 1  # bump when the output of the same settings changes, so reruns redo old files
# nibabel's convention, which MONAI's readers follow: the second label of each pair is the direction
# in which the world coordinate grows, so axis code "R" means "index grows toward the patient's Right".
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
STORED_AXES = {
    "C": "HU windows, in --windows order",
    "D": "inferior -> superior (index 0 = feet side)",
    "H": "patient left -> patient right (index 0 = patient's left)",
    "W": "posterior -> anterior (index 0 = patient's back)",
}


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the output array; a finished file is reused only when these match."""

    spacing: tuple[float, float, float] = (1.25, 1.25, 2.0)
    """Target voxel size in mm along (H, W, D) = (R, A, S)."""
    size: tuple[int, int, int] = (256, 256, 192)
    """Target grid (H, W, D) in voxels; the stored array is (C, D, H, W)."""
    windows: tuple[tuple[float, float], ...] = ((-1000.0, 400.0), (-1000.0, 2000.0))
    """HU windows (low, high), one output channel each, clipped and scaled to [0, 1]."""
    body_threshold: float = -500.0
    """Voxels above this HU count as body (and table) when cropping away the air around the patient."""
    margin_mm: float = 10.0
    """Kept around the body box, so the skin is not cut."""
    pad_value: float = -1000.0
    """HU used for padding (air), applied before windowing."""

    def __post_init__(self) -> None:
        # Normalise types once (CLI ints vs floats), so settings compare equal to a loaded sidecar.
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "windows", tuple((float(lo), float(hi)) for lo, hi in self.windows))
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"--spacing needs 3 positive numbers (mm along H, W, D), got {self.spacing}")
        if len(self.size) != 3 or min(self.size) <= 0:
            raise ValueError(f"--size needs 3 positive integers (H, W, D), got {self.size}")
        if not self.windows or any(len(w) != 2 or w[1] <= w[0] for w in self.windows):
            raise ValueError(f"--windows needs pairs LOW HIGH with LOW < HIGH, got {self.windows}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal to a loaded sidecar


# ----------------------------------------------------------------------------------------------
# One volume
# ----------------------------------------------------------------------------------------------


def _above(threshold: float, x):
    """Module-level (picklable) foreground selector for CropForeground."""
    return x > threshold


def load_scan(path: str | Path):
    """Read a NIfTI file or a DICOM series folder as a MONAI MetaTensor (H, W, D) with a RAS affine."""
    from monai.transforms import LoadImage

    path = Path(path)
    if path.is_dir():
        try:
            import pydicom  # noqa: F401
        except ImportError:
            raise DataError(
                "is a DICOM series folder, but pydicom is not installed",
                path=str(path),
                hint="pip install pydicom, or convert the series to NIfTI with dcm2niix",
            ) from None
        reader = "PydicomReader"
    elif path.is_file():
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            raise DataError("not a NIfTI file (.nii / .nii.gz) or a DICOM series folder", path=str(path))
        import nibabel as nib

        try:  # header only; MONAI's own message for an unreadable file lists readers, not the cause
            nib.load(str(path))
        except Exception as e:
            raise DataError(
                f"not a readable NIfTI file ({type(e).__name__}: {one_line(e)})",
                path=str(path),
                hint="the file is corrupt or not NIfTI",
            ) from None
        reader = "NibabelReader"
    else:
        raise DataError("scan not found", path=str(path), hint="check the image column and --input_dir")
    quiet_monai_dicom_logs()  # LoadImage builds every reader, the DICOM ones too, whatever the file
    try:
        img = LoadImage(image_only=True, reader=reader, dtype=np.float32)(str(path))
    except Exception as e:  # readers raise many types; the user needs the file name and the gist
        raise DataError(
            f"cannot read scan ({type(e).__name__}: {one_line(e)})",
            path=str(path),
            hint="the file may be truncated or not an image",
        ) from None
    return img


def preprocess_volume(
    path_or_array: str | Path | np.ndarray,
    affine: np.ndarray | None = None,
    settings: PreprocessSettings | None = None,
    *,
    min_extent_mm: float = MIN_EXTENT_MM,
    **overrides: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Turn one CT scan into the stored `(C, D, H, W)` float16 array in [0, 1], plus its metadata.

    `path_or_array`: a NIfTI path, a DICOM folder, or an array (X, Y, Z) of HU values whose voxel
    indices map to world millimetres through `affine` (4 x 4, nibabel's RAS+ convention: +x = patient
    Right, +y = Anterior, +z = Superior; identity when omitted). `overrides` set fields of
    `PreprocessSettings` (e.g. `size=(32, 32, 16)`). A scan read from a path must be a chest CT
    (`scan_checks`: a CT series, `min_extent_mm` along every axis, Hounsfield values); an array is trusted.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        CropForeground,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
        Spacing,
    )

    s = settings or PreprocessSettings()
    if overrides:
        s = PreprocessSettings(**{**asdict(s), **overrides})
    if isinstance(path_or_array, (str, Path)):
        source = str(path_or_array)
        if Path(path_or_array).is_dir():
            check_dicom_series(Path(path_or_array), min_extent_mm)
        loaded = load_scan(path_or_array)
        arr, aff = loaded.as_tensor(), torch.as_tensor(loaded.affine, dtype=torch.float64)
    else:
        source = "<array>"
        arr = torch.from_numpy(np.ascontiguousarray(path_or_array, dtype=np.float32))
        aff = torch.eye(4, dtype=torch.float64) if affine is None else torch.as_tensor(affine, dtype=torch.float64)
        if aff.shape != (4, 4):
            raise DataError(f"affine must be 4 x 4, got {tuple(aff.shape)}", path=source)
    if arr.ndim == 4 and arr.shape[-1] == 1:  # (X, Y, Z, 1) NIfTI files with a singleton 4th axis
        arr = arr[..., 0]
    if arr.ndim != 3:
        hint = "split 4-D series first" if arr.ndim == 4 else "a single image (a localizer or one slice) is no volume"
        raise DataError(f"expected a 3-D scan, got shape {tuple(arr.shape)}", path=source, hint=hint)
    arr = arr.float()
    # Some converters write NaN outside the reconstructed field of view: treat it as air.
    nonfinite = 0
    if not bool(torch.isfinite(arr).all()):
        nonfinite = int((~torch.isfinite(arr)).sum())
        arr = torch.nan_to_num(arr, nan=s.pad_value, posinf=s.pad_value, neginf=s.pad_value)
    warnings = []
    if source != "<array>":  # a scan file must be a chest CT; an array given in Python is the caller's business
        check_hounsfield(arr, source)
        mm = np.asarray(arr.shape) * np.linalg.norm(aff[:3, :3].numpy(), axis=0)
        check_extent(mm, ["axis 0", "axis 1", "axis 2"], source, min_extent_mm)
    elif float(arr.min()) > s.body_threshold:  # a chest CT always holds air (lungs, outside the body)
        warnings.append(f"no voxel below {s.body_threshold:g} HU: values may not be Hounsfield units")

    # Built channel-first on purpose: a MetaTensor made from a channel-less 3-D tensor records 2 spatial
    # dims, and MONAI's crops then leave the third axis out of the affine update (off by the crop).
    img = MetaTensor(arr[None], affine=aff)
    original_shape = [int(n) for n in arr.shape]
    original_affine = aff.numpy().copy()

    img = Orientation(axcodes="RAS", labels=RAS_LABELS)(img)
    img = Spacing(pixdim=s.spacing, mode="bilinear", padding_mode="border", dtype=np.float32)(img)
    resampled_shape = [int(n) for n in img.shape[1:]]

    body = img[0] > s.body_threshold
    if not bool(body.any()):
        hi = float(img.max())
        raise DataError(
            f"no voxel above {s.body_threshold:g} HU (max {hi:.4g})",
            path=source,
            hint="is this a CT in Hounsfield units? already-scaled volumes cannot be preprocessed",
        )
    margin = [int(np.ceil(s.margin_mm / sp)) for sp in s.spacing]
    img = CropForeground(select_fn=partial(_above, s.body_threshold), margin=margin, allow_smaller=True)(img)
    body_shape = [int(n) for n in img.shape[1:]]
    img = ResizeWithPadOrCrop(spatial_size=s.size, mode="constant", value=s.pad_value)(img)
    out_affine = np.asarray(img.affine, dtype=np.float64)  # voxel (H, W, D) -> RAS mm, after crop and pad

    hu = img.as_tensor()[0]
    hwd = torch.stack(
        [ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(hu) for lo, hi in s.windows]
    ).numpy()  # (C, H, W, D)
    image = np.ascontiguousarray(hwd.transpose(0, 3, 1, 2)).astype(np.float16)  # (C, D, H, W)

    import nibabel as nib

    meta = {
        "source": source,
        "layout": "CDHW",
        "orientation": "RAS",
        "axes": STORED_AXES,
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "spacing_dhw_mm": [s.spacing[2], s.spacing[0], s.spacing[1]],
        "windows_hu": [list(w) for w in s.windows],
        "affine_hwd_ras": out_affine.tolist(),
        "original_shape": original_shape,
        "original_affine_ras": original_affine.tolist(),
        "original_orientation": "".join(nib.aff2axcodes(original_affine, labels=RAS_LABELS)),
        "nonfinite_voxels_replaced": nonfinite,
        "original_spacing_mm": [float(v) for v in np.linalg.norm(original_affine[:3, :3], axis=0)],
        "resampled_shape_hwd": resampled_shape,
        "body_shape_hwd": body_shape,
        # The body box was larger than --size along these axes, so part of it was cut off (centre crop).
        "cropped_axes": [ax for ax, n, t in zip("HWD", body_shape, s.size) if n > t],
        "warnings": warnings,
        "settings": s.to_json(),
    }
    return image, meta


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
