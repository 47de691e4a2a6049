"""Synthetic chest-CT phantoms with paired free-text reports: a benchmark where learning is measurable.

Real chest CT cannot be shipped, so the demo and the tests train on phantoms drawn here. Every volume
is built in Hounsfield units (HU) from simple shapes with partial-volume edges, then windowed exactly
like real data (`window`) and written as NPZ `(2, D, H, W)` float16.

Orientation (documented once, used everywhere): a volume is `(D, H, W)` as a RAS-oriented scan ends up
after MONAI's `Orientation("RAS")` gives `(H, W, D)` and depth is moved to the front, so
    D (axis 0) increases toward patient superior (head),
    H (axis 1) increases toward patient RIGHT (index 0 is the patient's left side),
    W (axis 2) increases toward patient ANTERIOR (index 0 is the back, where the table is).
The heart lies left of the midline (low H), the right hemidiaphragm is higher than the left, the
descending aorta runs left of the spine, and pleural fluid layers posteriorly (low W) as in a supine
patient, so laterality is recoverable from the image alone.

Findings use CT-RATE's label spellings (`FINDINGS`), each drawn independently with prevalence ~30 %.
Small lesions (nodules, nodes, plate atelectasis) are rendered no smaller than 3-5 voxels so that
they stay visible at the demo's coarse resolution; reports state the nominal size in mm.

Layout (each submodule imports only the ones before it; this file only re-exports):
    anatomy   the HU canvas, `window`, `default_spacing`, the noise and vessel banks, anatomy painters
    findings  the finding catalogue (`FINDINGS`, `SIDE_FINDINGS`, lobes, node stations) and the per-case draw
    reports   report sentences and `write_report`
    cases     `_Case` (paints one phantom and its lesions) and `make_case`
    preview   `save_preview_png`
    writer    `generate_dataset` (files, CSV, cache) and the CLI `main` (`python -m ct_siglip.synthetic`)
"""

from .anatomy import DEFAULT_SHAPE, DEFAULT_WINDOWS, FIELD_OF_VIEW_MM, default_spacing, window
from .cases import make_case
from .findings import FINDINGS, LOBES, MIN_NODULE_VOXELS, NODE_STATIONS, SIDE_FINDINGS
from .preview import save_preview_png
from .reports import _FILLER as _FILLER  # private, read by the tests
from .reports import _NEG as _NEG  # private, read by the tests
from .reports import PLAIN_FRACTION, write_report
from .writer import CSV_NAME, GENERATOR_VERSION, IMAGE_DIR, PARAMS_NAME, PARAPHRASE_COLUMN, generate_dataset, main

__all__ = [
    "CSV_NAME",
    "DEFAULT_SHAPE",
    "DEFAULT_WINDOWS",
    "FIELD_OF_VIEW_MM",
    "FINDINGS",
    "GENERATOR_VERSION",
    "IMAGE_DIR",
    "LOBES",
    "MIN_NODULE_VOXELS",
    "NODE_STATIONS",
    "PARAMS_NAME",
    "PARAPHRASE_COLUMN",
    "PLAIN_FRACTION",
    "SIDE_FINDINGS",
    "default_spacing",
    "generate_dataset",
    "main",
    "make_case",
    "save_preview_png",
    "window",
    "write_report",
]
