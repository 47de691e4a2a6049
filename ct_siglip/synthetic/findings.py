"""The finding catalogue: label names, where findings may sit (lobes, node stations), and the per-case draw.

A leaf module (numpy only): the case painter (`cases`), the reports (`reports`), the writer's CSV
columns and the preview all read the same names from here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Pleural effusion",
    "Lung nodule",
    "Cardiomegaly",
    "Pericardial effusion",
    "Emphysema",
    "Consolidation",
    "Atelectasis",
    "Lymphadenopathy",
)
"""Label columns, spelled as in CT-RATE's multi-abnormality labels (side-agnostic)."""

SIDE_FINDINGS: tuple[str, ...] = ("Left pleural effusion", "Right pleural effusion")
"""Extra 0/1 columns for the laterality check (both are 1 for a bilateral effusion)."""

LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
NODE_STATIONS = (
    "right paratracheal",
    "prevascular",
    "subcarinal",
    "aortopulmonary window",
    "right hilar",
    "left hilar",
)
MIN_NODULE_VOXELS = (3.0, 5.0, 5.0)  # (D, H, W) minimum rendered diameter of nodules and enlarged nodes


def _draw_findings(rng: np.random.Generator, prevalence, force: Mapping[str, object] | None) -> dict:
    """Which findings this case has (independent draws), honouring `force`."""
    prev = prevalence if isinstance(prevalence, Mapping) else dict.fromkeys(FINDINGS, float(prevalence))
    force = dict(force or {})
    unknown = set(force) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings in force: {sorted(unknown)} (known: {', '.join(FINDINGS)})")
    present: dict = {}
    for name in FINDINGS:
        draw = rng.random() < float(prev.get(name, 0.0))  # always draw: forcing one keeps the others' stream
        present[name] = bool(force[name]) if name in force else draw
    side = str(rng.choice(["left", "right", "both"], p=[0.4, 0.4, 0.2]))
    forced_side = force.get("Pleural effusion")
    if isinstance(forced_side, str):
        if forced_side not in ("left", "right", "both"):
            raise ValueError(f"effusion side must be left, right or both, got {forced_side!r}")
        side = forced_side
    present["effusion_side"] = side if present["Pleural effusion"] else None
    return present
