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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

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

DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((-1000.0, 400.0), (-1000.0, 2000.0))
"""The two HU windows of the data contract (SPEC.md): lung/soft tissue and a wide bone window."""

DEFAULT_SHAPE: tuple[int, int, int] = (32, 64, 64)
FIELD_OF_VIEW_MM: tuple[float, float, float] = (320.0, 380.0, 380.0)
"""Default scanned extent (D, H, W) in mm; the spacing is this divided by the shape."""

GENERATOR_VERSION = 7  # bump when the pictures or reports change, so cached data sets are rebuilt
CSV_NAME, PARAMS_NAME, IMAGE_DIR = "synthetic.csv", "synthetic.json", "images"
PARAPHRASE_COLUMN = "findings_paraphrase"
"""A second report of the same case, worded independently: text pairs for `ct_siglip.simcse` (never a label)."""
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
_F32 = np.float32


# --------------------------------------------------------------------------------------------- windowing
def window(hu: np.ndarray, windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS, dtype=np.float32) -> np.ndarray:
    """Map a HU volume `(D, H, W)` to `(C, D, H, W)` in [0, 1], one channel per (low, high) window.

    The same normalisation real scans get (numpy only, so `ct_siglip.preprocess` can share it): phantoms
    and patients reach the network on the same scale.
    """
    hu = np.asarray(hu, dtype=np.float32)
    out = np.empty((len(windows), *hu.shape), dtype=np.float32)
    for c, (lo, hi) in enumerate(windows):
        if not hi > lo:
            raise ValueError(f"window {c} = ({lo}, {hi}): high must exceed low")
        np.clip(hu, lo, hi, out=out[c])
        out[c] -= lo
        out[c] *= 1.0 / (hi - lo)
    return out if dtype in (np.float32, "float32") else out.astype(dtype)


# --------------------------------------------------------------------------------------------- geometry
def default_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Spacing (mm) that makes `shape` cover `FIELD_OF_VIEW_MM`: a chest from apex to upper abdomen."""
    return tuple(float(f / n) for f, n in zip(FIELD_OF_VIEW_MM, shape))  # type: ignore[return-value]


class _Canvas:
    """A HU volume plus patient coordinates in mm (z superior, x patient right, y anterior).

    Structures are painted in bounding boxes where they are small, so one case costs milliseconds.
    `lung` tracks how much of each voxel is still aerated lung, so that lesions land in lung only
    and later structures (heart, fluid) displace it.
    """

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], offset: Sequence[float]):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.offset = tuple(float(o) for o in offset)
        self.axes = [
            ((np.arange(n, dtype=np.float64) - (n - 1) / 2) * s - o).astype(_F32)
            for n, s, o in zip(self.shape, self.spacing, self.offset)
        ]
        self.hu = np.full(self.shape, -1000.0, dtype=_F32)
        self.lung = np.zeros(self.shape, dtype=_F32)
        self.ramp = (self.spacing[1] + self.spacing[2]) / 2  # edge width: one in-plane voxel
        self.full = (slice(None),) * 3

    def coords(self, sl=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, x, y) coordinate arrays of a box."""
        sl = sl or self.full
        z, x, y = (a[s] for a, s in zip(self.axes, sl))
        return z[:, None, None], x[None, :, None], y[None, None, :]

    def box(self, lo: Sequence[float], hi: Sequence[float]):
        """Index slices covering the mm box [lo, hi] (z, x, y), or None if it misses the volume."""
        sl = []
        for n, s, o, a, b in zip(self.shape, self.spacing, self.offset, lo, hi):
            i0 = max(0, math.floor((a + o) / s + (n - 1) / 2))
            i1 = min(n, math.ceil((b + o) / s + (n - 1) / 2) + 1)
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def soft(self, sd: np.ndarray, ramp: float | None = None) -> np.ndarray:
        """Partial-volume fraction from a signed distance in mm (negative inside): a one-voxel ramp."""
        r = ramp or self.ramp
        m = np.multiply(sd, -1.0 / r, dtype=_F32)
        m += 0.5
        return np.clip(m, 0.0, 1.0, out=m)

    def paint(self, m: np.ndarray, value, sl=None, occlude: bool = True) -> None:
        """Blend `value` (HU, scalar or broadcastable) into the box with weight `m`."""
        sl = sl or self.full
        region = self.hu[sl]
        region += m * (value - region)
        if occlude:
            self.lung[sl] *= 1.0 - m

    def ellipsoid(self, center, radii, angle: float = 0.0, pad: float = 0.0):
        """(box, signed distance) of an ellipsoid; `angle` rotates it in the axial plane (radians)."""
        rz, rx, ry = (r + pad for r in radii)
        ext = max(rx, ry) + self.ramp
        sl = self.box(
            (center[0] - rz - self.spacing[0], center[1] - ext, center[2] - ext),
            (center[0] + rz + self.spacing[0], center[1] + ext, center[2] + ext),
        )
        if sl is None:
            return None, None
        z, x, y = self.coords(sl)
        dz, dx, dy = z - center[0], x - center[1], y - center[2]
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        q = (dz / rz) ** 2 + (dx / rx) ** 2 + (dy / ry) ** 2
        return sl, (np.sqrt(q) - 1.0) * min(rx, ry)

    def tube(self, a, b, r0: float, r1: float | None = None):
        """(box, signed distance) of a capsule from point a to b (z, x, y) with radius r0 -> r1."""
        r1 = r0 if r1 is None else r1
        r = max(r0, r1) + self.ramp
        sl = self.box([min(p, q) - r for p, q in zip(a, b)], [max(p, q) + r for p, q in zip(a, b)])
        if sl is None:
            return None, None
        z, x, y = self.coords(sl)
        v = [q - p for p, q in zip(a, b)]
        vv = max(sum(c * c for c in v), 1e-6)
        pz, px, py = z - a[0], x - a[1], y - a[2]
        t = np.clip((pz * v[0] + px * v[1] + py * v[2]) / vv, 0.0, 1.0)
        d = np.sqrt((pz - t * v[0]) ** 2 + (px - t * v[1]) ** 2 + (py - t * v[2]) ** 2)
        return sl, d - (r0 + (r1 - r0) * t)


@lru_cache(maxsize=4)
def _vessel_bank(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """A few fixed pulmonary vessel trees (partial-volume fraction, float16), built once per grid.

    Drawing branching trees per case would dominate the cost; a bank of K trees, picked and shifted
    per case and masked by that case's lungs, looks as varied at a fraction of the time.
    """
    n_vox = int(np.prod(shape))
    k_maps = int(np.clip(2e7 // n_vox, 2, 12))
    rng = np.random.default_rng(20240607)
    bank = np.zeros((k_maps, *shape), dtype=np.float16)
    for k in range(k_maps):
        cv = _Canvas(shape, spacing, (0.0, 0.0, 0.0))
        acc = np.zeros(shape, dtype=_F32)
        for side in (1.0, -1.0):
            hilum = np.array([25.0, 22.0 * side, -12.0])  # inside the mediastinum: the roots converge out of sight
            centre, radii = np.array([10.0, 80.0 * side, -5.0]), np.array([105.0, 50.0, 70.0])
            for _ in range(5):
                u = rng.normal(size=3)
                target = centre + radii * u / np.linalg.norm(u) * rng.uniform(0.5, 1.0) ** (1 / 3)
                stack = [(hilum, target - hilum, 3.5, 0)]
                while stack:
                    start, direction, radius, depth = stack.pop()
                    length = np.linalg.norm(direction)
                    end = start + direction
                    sl, sd = cv.tube(tuple(start), tuple(end), radius, radius * 0.75)
                    if sl is not None:
                        # partial volume: cross-section over the in-plane voxel, vessel calibre over the slice
                        frac = min(1.0, math.pi * radius**2 / cv.ramp**2) * min(1.0, 2 * radius / spacing[0])
                        np.maximum(acc[sl], cv.soft(sd) * frac, out=acc[sl])
                    if depth < 3:
                        for _ in range(2):
                            turn = rng.normal(scale=0.45, size=3)
                            new = direction / length + turn
                            new = new / np.linalg.norm(new) * length * rng.uniform(0.45, 0.7)
                            stack.append((end, new, radius * 0.7, depth + 1))
        bank[k] = acc
    return bank


@lru_cache(maxsize=4)
def _noise_bank(shape: tuple[int, int, int]) -> np.ndarray:
    """Unit Gaussian noise fields, built once per grid; cases use random circular shifts of them.

    Drawing fresh Gaussian noise is the single most expensive step of a case (1.5 ms of ~10 ms at
    32 x 64 x 64); a shifted, sign-flipped field is as good for a benchmark and carries no label.
    """
    k = 2 if int(np.prod(shape)) <= 4_000_000 else 1
    return np.random.default_rng(777).standard_normal((k, *shape), dtype=_F32)


# --------------------------------------------------------------------------------------------- phantom
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


class _Case:
    """One phantom being drawn: the canvas, the patient's geometry and one random stream per concern.

    Anatomy, each finding and the report draw from separate generators, so forcing one finding on or
    off leaves the rest of the case unchanged: the difference of two such volumes is that finding alone
    (the tests use this to check side, position and visibility).
    """

    def __init__(self, rng: np.random.Generator, shape, spacing, want: dict):
        seeds = rng.integers(0, 2**63, size=len(FINDINGS) + 2)
        self.anat = np.random.default_rng(seeds[0])
        self.text_rng = np.random.default_rng(seeds[1])
        self.frng = {name: np.random.default_rng(sd) for name, sd in zip(FINDINGS, seeds[2:])}
        self.want, self.details = want, {}
        u = self.anat.uniform
        self.offset = (u(-12, 12), u(-10, 10), u(-8, 8))  # patient position on the table
        self.cv = cv = _Canvas(shape, spacing, self.offset)
        self.z, x, y = cv.coords()
        self.x2, self.y2 = x[0], y[0]  # (H, 1) and (1, W): in-plane maps are computed once, broadcast over z
        self.A, self.B = u(150, 178), u(100, 122)  # body half-width (left-right) and half-depth (AP)
        self.fat, self.muscle = u(6, 24), u(9, 15)
        self.Ai = self.A - self.fat - self.muscle - 4.0  # pleural cavity
        self.Bi = self.B - self.fat - self.muscle - 4.0
        zr = u(-95, -75)
        self.z_dia = {"right": zr, "left": zr - u(10, 22)}  # the liver pushes the right dome up
        self.z_apex = zr + u(190, 215)
        self.z_mid = zr + 95.0  # level of the fissures
        self.med = u(16, 24)  # mediastinal half-width between the lungs

    def ellipse2(self, a: float, b: float) -> np.ndarray:
        """Soft in-plane ellipse (H, W) centred on the patient."""
        return self.cv.soft((np.sqrt((self.x2 / a) ** 2 + (self.y2 / b) ** 2) - 1.0) * min(a, b))

    # ---- anatomy ---------------------------------------------------------------------------------
    def body(self) -> None:
        """Table, fat, muscle and mediastinal fat as one in-plane picture broadcast along z; then ribs."""
        cv, u, x2, y2 = self.cv, self.anat.uniform, self.x2, self.y2
        base = np.full(cv.shape[1:], -1000.0, dtype=_F32)

        def blend(m: np.ndarray, value: float) -> None:
            base[:] += m * (value - base)

        y_table = -self.B - u(4, 18) - 6.0
        blend(cv.soft(np.abs(y2 - (y_table + 0.0004 * x2**2)) - 3.5), u(80, 250))  # curved table top
        blend(self.ellipse2(self.A, self.B), u(-110, -90))  # subcutaneous fat
        blend(self.ellipse2(self.A - self.fat, self.B - self.fat), u(40, 55))  # chest wall muscle
        self.cavity2 = self.ellipse2(self.Ai, self.Bi)
        blend(self.cavity2, u(-100, -80))  # mediastinal fat; lungs and organs are painted over it
        cv.hu[:] = base
        # ribs: a ring just outside the pleura, striped along z, sloping down anteriorly
        rib_ring = self.ellipse2(self.Ai + 12.0, self.Bi + 12.0) * (1.0 - self.ellipse2(self.Ai + 2.0, self.Bi + 2.0))
        ii, jj = np.nonzero(rib_ring > 0)
        stripes = np.cos(2 * np.pi * (self.z[:, :, 0] + 0.45 * y2[0, jj][None]) / 26.0)  # (D, ring pixels)
        m = rib_ring[ii, jj][None] * np.clip(stripes * 2.0 - 0.2, 0.0, 1.0)
        region = cv.hu[:, ii, jj]
        cv.hu[:, ii, jj] = region + m * (u(450, 750) - region)

    def abdomen(self) -> None:
        """Domed hemidiaphragms (right higher), liver below the right, stomach below the left."""
        cv, u, x2, y2, Ai, Bi = self.cv, self.anat.uniform, self.x2, self.y2, self.Ai, self.Bi
        side_r = (x2 > 0).astype(_F32)
        dome = 1.0 - np.clip(((np.abs(x2) - 0.45 * Ai) / (0.6 * Ai)) ** 2 + ((y2 - 0.1 * Bi) / Bi) ** 2, 0, 1.5)
        self.zdia2 = side_r * self.z_dia["right"] + (1 - side_r) * self.z_dia["left"] + 55.0 * dome - 35.0
        below = cv.soft(self.z - self.zdia2[None], cv.spacing[0]) * self.cavity2[None]
        cv.paint(below, (side_r * u(50, 65) + (1 - side_r) * u(35, 48))[None], occlude=False)
        if self.anat.random() < 0.5:  # gastric air under the left dome
            sl, sd = cv.ellipsoid((self.z_dia["left"] - 15, -0.45 * Ai, 0.35 * Bi), (18, u(20, 35), u(15, 25)))
            if sl is not None:
                cv.paint(cv.soft(sd) * below[sl], -1000.0, sl, occlude=False)

    def lungs(self) -> None:
        """Two lungs between cavity wall, mediastinum, apex and diaphragm; emphysema lowers their density."""
        cv, u, x2, y2 = self.cv, self.anat.uniform, self.x2, self.y2
        lung_w = (self.Ai - self.med) / 2
        ul = (np.abs(x2) - self.med - lung_w) / lung_w
        ztop2 = self.z_apex - 70.0 * (ul**2 + 0.6 * (y2 / self.Bi) ** 2)
        sd_cav = (np.sqrt((x2 / self.Ai) ** 2 + (y2 / self.Bi) ** 2) - 1.0) * self.Bi
        sd2 = np.maximum(sd_cav, self.med - np.abs(x2))  # in-plane part of the lung's signed distance
        self.sd_lung = np.maximum(np.maximum(self.z - ztop2[None], self.zdia2[None] - self.z), sd2[None])
        lung_m = cv.soft(self.sd_lung)
        lung_hu = u(-875, -830) + u(20, 60) * np.clip(0.5 - 0.5 * y2 / self.Bi, 0, 1)[None]  # dependent: denser
        if self.want["Emphysema"]:
            f = self.frng["Emphysema"]
            drop = f.uniform(110, 170)  # emphysematous lung reads about -950 HU or lower
            upper = f.random() < 0.7  # centrilobular emphysema is upper-lobe predominant
            if upper:
                zw = np.clip((self.z - self.z_dia["right"]) / (self.z_apex - self.z_dia["right"]), 0, 1)
                lung_hu = lung_hu - drop * (0.55 + 0.45 * zw)
            else:
                lung_hu = lung_hu - drop
            self.details["emphysema"] = ("mild" if drop < 130 else "moderate" if drop < 150 else "severe", upper)
        cv.paint(lung_m, lung_hu, occlude=False)
        cv.lung[:] = lung_m
        if self.want["Emphysema"]:  # bullae: large air spaces, mostly in the upper zones
            for _ in range(int(f.integers(2, 6))):
                c = _sample_point(cv, f, self.sd_lung, margin=15.0, zmin=self.z_dia["right"] + 60)
                if c is not None:
                    r = f.uniform(8, 18)
                    sl, sd = cv.ellipsoid(c, (max(r, cv.spacing[0] * 0.8), r, r))
                    cv.paint(cv.soft(sd) * cv.lung[sl], -990.0, sl, occlude=False)

    def vessels(self) -> None:
        """Pulmonary vessels from the bank, shifted with the patient and masked by aerated lung."""
        cv = self.cv
        bank = _vessel_bank(cv.shape, cv.spacing)
        self.shift = tuple(round(o / s) for o, s in zip(self.offset, cv.spacing))
        vmap = np.roll(bank[int(self.anat.integers(len(bank)))], shift=self.shift, axis=(0, 1, 2)).astype(_F32)
        vmap *= cv.lung
        cv.paint(vmap, self.anat.uniform(30, 50), occlude=False)

    def mediastinum(self) -> None:
        """Spine, aorta, SVC, pulmonary arteries, oesophagus, airways, heart and sternum."""
        cv, u, Bi = self.cv, self.anat.uniform, self.Bi
        y_v = -Bi + u(14, 20)  # vertebral body centre
        self.y_tr, y_es = y_v + 44.0, y_v + 26.0
        self.z_car = z_car = self.z_dia["right"] + u(95, 110)
        self.z_arch = z_arch = z_car + u(18, 28)
        ztop, zbot = float(cv.axes[0].max()) + 20, float(cv.axes[0].min()) - 20
        _paint_spine(cv, self.anat, y_v, ztop, zbot)
        if self.want["Cardiomegaly"]:  # enlarged mostly to the left and backwards, as the left ventricle grows
            f = self.frng["Cardiomegaly"].uniform
            scale = (f(1.1, 1.2), f(1.28, 1.45), f(1.15, 1.3))
        else:
            scale = (u(0.93, 1.05),) * 3
        hr = (52.0 * scale[0], 56.0 * scale[1], 45.0 * scale[2])  # (z, x, y) radii in mm
        hc = (self.z_dia["left"] + 0.8 * hr[0], -u(22, 32) - 0.5 * (hr[1] - 56.0), 0.22 * Bi + u(-5, 5))
        self.y_asc = y_asc = hc[2] + 5.0
        y_tr = self.y_tr
        self.hila = [(z_car - 18, -self.med - 25, y_tr - 6), (z_car - 18, self.med + 25, y_tr - 6)]
        desc = (-u(20, 26), y_v + 10.0)
        aorta_r = u(11, 14)
        for sl, sd in (
            cv.tube((zbot, desc[0], desc[1]), (z_arch, desc[0], desc[1]), aorta_r),  # descending aorta
            cv.tube((hc[0] + 0.5 * hr[0], 12.0, y_asc), (z_arch, 12.0, y_asc), aorta_r * 1.2),  # ascending
            _arch(cv, (z_arch, 12.0, y_asc), (z_arch, desc[0], desc[1]), aorta_r * 1.1),
            cv.tube((z_arch + 40, 32.0, y_asc - 6), (hc[0] + 0.4 * hr[0], 30.0, y_asc - 6), 9.0),  # SVC
            cv.tube((hc[0] + 0.6 * hr[0], -16.0, hc[2] + 20), (z_car - 12, -16.0, y_tr + 8), 12.0),  # PA trunk
            # pulmonary arteries taper into the lungs' vessel trees instead of ending as blunt, nodule-like stumps
            cv.tube((z_car - 12, -16.0, y_tr + 8), (z_car - 18, -self.med - 28, y_tr - 4), 9.0, 2.5),  # left PA
            cv.tube((z_car - 12, -16.0, y_tr + 8), (z_car - 20, self.med + 26, y_tr - 4), 9.0, 2.5),  # right PA
            cv.tube((ztop, -6.0, y_es), (zbot + 40, -14.0, y_es + 4), 7.5),  # oesophagus
        ):
            if sl is not None:
                cv.paint(cv.soft(sd), u(35, 50), sl)
        airway = [((ztop, 3.0, y_tr), (z_car, 3.0, y_tr), 9.0, 9.0)]
        # main bronchi end at the lung root: the lungs' own airways are not drawn (too fine for this resolution)
        root = self.med + 14.0
        airway += [((z_car, 3.0, y_tr), (z_car - 22, root * s, y_tr - 6), 6.5, 5.5) for s in (1.0, -1.0)]
        for wall in (2.5, 0.0):  # soft-tissue wall, then the air lumen
            for a, b, r0, r1 in airway:
                sl, sd = cv.tube(a, b, r0 + wall, r1 + wall)
                if sl is not None:
                    cv.paint(cv.soft(sd), 40.0 if wall else -1000.0, sl)
        # heart: epicardial fat, pericardial fluid if any, then myocardium and blood (non-contrast: one density)
        angle = -u(0.35, 0.7)  # long axis points anterior and to the patient's left
        fat_hu, heart_hu = u(-110, -85), u(40, 55)
        layers = [(5.0, fat_hu), (0.0, heart_hu)]
        if self.want["Pericardial effusion"]:
            f = self.frng["Pericardial effusion"].uniform
            pe = f(9, 22)
            layers = [(pe + 5.0, fat_hu), (pe, f(0, 12)), (0.0, heart_hu)]
            self.details["pericardial_mm"] = pe
        for pad, hu in layers:
            r = (hr[0] + 0.7 * pad, hr[1] + pad, hr[2] + pad)
            sl, sd = cv.ellipsoid(hc, r, angle)
            if sl is not None:
                cv.paint(cv.soft(sd) * self.cavity2[None, sl[1], sl[2]], hu, sl)
        half_width = math.hypot(hr[1] * math.cos(angle), hr[2] * math.sin(angle))
        self.details["cardiothoracic_ratio"] = round(half_width / self.Ai, 2)
        sl = cv.box((self.z_dia["right"] - 40, -9, Bi + 1), (self.z_apex - 40, 9, Bi + 9))  # sternum
        if sl is not None:
            cv.paint(np.ones([s.stop - s.start for s in sl], _F32), u(300, 500), sl, occlude=False)

    # ---- findings --------------------------------------------------------------------------------
    def effusion(self) -> None:
        """Pleural fluid layering in the dependent (posterior, low W) pleural space, deepest at the base."""
        if not self.want["Pleural effusion"]:
            return
        cv, f, side = self.cv, self.frng["Pleural effusion"].uniform, self.want["effusion_side"]
        depths = {}
        for s in ["left", "right"] if side == "both" else [side]:
            depths[s] = depth = f(22, 75)
            sign = 1.0 if s == "right" else -1.0  # patient right = high H
            hemi = np.clip((sign * self.x2 - self.med) / cv.ramp + 0.5, 0, 1)[None]
            taper = np.clip((self.z_dia[s] + 170.0 - self.z) / 150.0, 0, 1) ** 0.6
            level = -self.Bi + depth * taper
            cv.paint(cv.soft(np.maximum(self.sd_lung, self.y2[None] - level)) * hemi, f(4, 20))
        self.details["effusion_depth_mm"] = depths

    def lymph_nodes(self) -> None:
        """Nodes at mediastinal and hilar stations: enlarged ones (>= 12 mm short axis) or normal small ones."""
        cv, f = self.cv, self.frng["Lymphadenopathy"]
        z_car, z_arch, y_tr, y_asc = self.z_car, self.z_arch, self.y_tr, self.y_asc
        stations = {
            "right paratracheal": (z_car + 22, 22.0, y_tr + 2),
            "prevascular": (z_arch - 8, -4.0, y_asc + 22),
            "subcarinal": (z_car - 28, -2.0, y_tr - 6),
            "aortopulmonary window": (z_arch - 16, -30.0, y_tr + 10),
            # at the lung root, straddling the mediastinal border: they bulge the hilar contour, never float in lung
            "right hilar": (z_car - 12, self.med + 12.0, y_tr - 8),
            "left hilar": (z_car - 8, -self.med - 12.0, y_tr - 8),
        }
        enlarged = self.want["Lymphadenopathy"]
        count = int(f.integers(3, 6)) if enlarged else int(f.integers(0, 3))
        names = [str(n) for n in f.choice(NODE_STATIONS, size=count, replace=False)]
        sizes = [f.uniform(18, 35) if enlarged else f.uniform(4, 8) for _ in names]  # short axis, mm
        for name, size in zip(names, sizes):
            r = (0.65 * size, 0.5 * size, 0.5 * size)
            if enlarged:  # normal nodes stay at true size, partial-volumed away at coarse spacing
                r = tuple(max(v, 0.5 * m * s) for v, m, s in zip(r, MIN_NODULE_VOXELS, cv.spacing))
            sl, sd = cv.ellipsoid(stations[name], r)
            if sl is not None:
                cv.paint(cv.soft(sd), f.uniform(28, 42), sl)
        if enlarged:
            self.details["nodes"] = list(zip(names, sizes))

    def parenchyma(self) -> None:
        """Consolidation, atelectasis and nodules, each in aerated lung of a different lobe."""
        lobes = list(LOBES)
        self.anat.shuffle(lobes)
        if self.want["Consolidation"]:
            self.want["Consolidation"] = self._consolidation(lobes.pop())
        if self.want["Atelectasis"]:
            basal = [lb for lb in lobes if lb in ("right lower lobe", "left lower lobe", "right middle lobe")]
            lobe = basal[0] if basal else lobes[0]
            lobes.remove(lobe)
            self.want["Atelectasis"] = self._atelectasis(lobe)
        if self.want["Lung nodule"]:
            self.want["Lung nodule"] = self._nodules(lobes)

    def _consolidation(self, lobe: str) -> bool:
        cv, f = self.cv, self.frng["Consolidation"]
        c = _sample_point(cv, f, self.sd_lung, 12.0, lobe=lobe, z_mid=self.z_mid)
        if c is None:
            return False
        r = (f.uniform(45, 75), f.uniform(42, 68), f.uniform(42, 68))
        sl, sd = cv.ellipsoid(c, (max(r[0], 2 * cv.spacing[0]), r[1], r[2]))
        m = cv.soft(sd) * _lobe_mask(cv, sl, lobe, self.z_mid) * cv.lung[sl]  # stops at the fissures
        cv.paint(m, f.uniform(-30, 40), sl)
        bronchograms = bool(f.random() < 0.4)
        if bronchograms:  # aerated bronchi inside the dense lung: a shifted vessel tree serves as airways
            bank = _vessel_bank(cv.shape, cv.spacing)
            bm = np.roll(bank[int(f.integers(len(bank)))], shift=self.shift, axis=(0, 1, 2))[sl].astype(_F32)
            cv.paint(m * np.clip(bm * 3.0 - 0.6, 0, 1), -900.0, sl, occlude=False)
        self.details["consolidation"] = (lobe, 2 * max(r[1], r[2]), bronchograms)
        return True

    def _atelectasis(self, lobe: str) -> bool:
        """Plate-like atelectasis: a dense band at least 5 voxels thick, mostly upright so axial slices cut it."""
        cv, f = self.cv, self.frng["Atelectasis"]
        c = _sample_point(cv, f, self.sd_lung, 15.0, lobe=lobe, z_mid=self.z_mid)
        if c is None:
            return False
        nz, phi = f.uniform(-0.45, 0.45), f.uniform(0, 2 * np.pi)
        n = (nz, math.sqrt(1 - nz**2) * math.cos(phi), math.sqrt(1 - nz**2) * math.sin(phi))
        half_t = 0.5 * max(f.uniform(5, 10), 5.0 * cv.ramp)
        extent = f.uniform(55, 80)
        sl = cv.box([p - extent for p in c], [p + extent for p in c])
        bz, bx, by = cv.coords(sl)
        dz, dx, dy = bz - c[0], bx - c[1], by - c[2]
        along = dz * n[0] + dx * n[1] + dy * n[2]
        perp = np.sqrt(np.maximum(dz**2 + dx**2 + dy**2 - along**2, 0))
        m = cv.soft(np.abs(along) - half_t) * cv.soft(perp - extent) * cv.lung[sl]
        cv.paint(m * _lobe_mask(cv, sl, lobe, self.z_mid), f.uniform(-40, 35), sl)
        self.details["atelectasis"] = lobe
        return True

    def _nodules(self, lobes: list[str]) -> bool:
        """One to four solid nodules, 5-30 mm, log-uniform so small ones are common."""
        cv, f = self.cv, self.frng["Lung nodule"]
        placed = []
        for i in range(int(f.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))):
            lobe = lobes[i % len(lobes)] if lobes else LOBES[int(f.integers(5))]
            size = float(np.exp(f.uniform(np.log(5.0), np.log(30.0))))
            r = tuple(max(0.5 * size, 0.5 * m * s) for m, s in zip(MIN_NODULE_VOXELS, cv.spacing))
            avoid = [(h, 35.0 + max(r)) for h in self.hila]  # keep nodules apart from hilar vessels and nodes
            c = _sample_point(cv, f, self.sd_lung, max(r[1:]) + 4.0, lobe=lobe, z_mid=self.z_mid, avoid=avoid)
            if c is None:  # that lobe is full (fluid, consolidation): any aerated lung will do
                c = _sample_point(cv, f, self.sd_lung, max(r[1:]) * 0.5)
                if c is None:
                    continue
                lobe = _lobe_of(c, self.z_mid)
            sl, sd = cv.ellipsoid(c, r)
            cv.paint(cv.soft(sd), f.uniform(15, 60), sl)
            placed.append((lobe, round(size)))
        if placed:
            self.details["nodules"] = placed
        return bool(placed)

    def noise(self, sigma: float | None) -> None:
        """Quantum noise (a shifted field from `_noise_bank`), then the scanner's HU range."""
        cv = self.cv
        sigma = self.anat.uniform(8, 18) if sigma is None else sigma
        shifts = tuple(int(self.anat.integers(n)) for n in cv.shape)
        bank = _noise_bank(cv.shape)
        field = bank[int(self.anat.integers(len(bank)))]
        if sigma > 0:
            cv.hu += np.roll(field, shifts, axis=(0, 1, 2)) * _F32(sigma * self.anat.choice([-1.0, 1.0]))
        np.clip(cv.hu, -1024.0, 3071.0, out=cv.hu)


def make_case(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing_mm: Sequence[float] | None = None,
    *,
    prevalence: float | Mapping[str, float] = 0.3,
    force: Mapping[str, object] | None = None,
    noise_hu: float | None = None,
) -> tuple[np.ndarray, dict, str]:
    """Draw one phantom: (HU volume float32 `(D, H, W)`, labels, report).

    `labels` holds 0/1 for every `FINDINGS` and `SIDE_FINDINGS` name, `effusion_side`
    ("left"/"right"/"both"/None), `nodule_mm` (largest nodule, 0 if none) and `details` (sizes, lobes,
    stations). `force` fixes findings, e.g. `{"Pleural effusion": "left", "Cardiomegaly": False}`; the
    rest of the case does not change when a finding is forced (see `_Case`).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (D, H, W) with every side >= 8, got {shape}")
    spacing = tuple(float(s) for s in (spacing_mm or default_spacing(shape)))
    want = _draw_findings(rng, prevalence, force)
    case = _Case(rng, shape, spacing, want)
    case.body()
    case.abdomen()
    case.lungs()
    case.effusion()
    case.vessels()
    case.mediastinum()
    case.lymph_nodes()
    case.parenchyma()
    case.noise(noise_hu)

    labels: dict = {name: int(bool(want[name])) for name in FINDINGS}
    side = want["effusion_side"] if want["Pleural effusion"] else None
    labels["effusion_side"] = side
    labels["Left pleural effusion"] = int(side in ("left", "both"))
    labels["Right pleural effusion"] = int(side in ("right", "both"))
    labels["nodule_mm"] = max((s for _, s in case.details.get("nodules", [])), default=0)
    labels["details"] = case.details
    return case.cv.hu, labels, write_report(case.text_rng, labels, case.details)


def _arch(cv: _Canvas, a, b, radius: float):
    """(box, signed distance) of the aortic arch: the upper half-torus joining a and b at height z."""
    mid = np.array([(a[1] + b[1]) / 2, (a[2] + b[2]) / 2])
    along = np.array([b[1] - a[1], b[2] - a[2]])
    R = float(np.linalg.norm(along)) / 2
    along /= 2 * R
    normal = np.array([-along[1], along[0]])
    ext = R + radius + cv.ramp
    sl = cv.box((a[0] - cv.spacing[0], mid[0] - ext, mid[1] - ext), (a[0] + ext, mid[0] + ext, mid[1] + ext))
    if sl is None:
        return None, None
    z, x, y = cv.coords(sl)
    s = (x - mid[0]) * along[0] + (y - mid[1]) * along[1]
    w = (x - mid[0]) * normal[0] + (y - mid[1]) * normal[1]
    h = np.maximum(z - a[0], 0.0)
    return sl, np.sqrt((np.sqrt(s**2 + h**2) - R) ** 2 + w**2) - radius


def _paint_spine(cv: _Canvas, rng: np.random.Generator, y_v: float, ztop: float, zbot: float) -> None:
    """Vertebral bodies with discs, the spinal canal and the spinous processes, along the whole scan."""
    r_body = rng.uniform(16, 21)
    z = cv.axes[0]
    disc = (np.mod(z - rng.uniform(0, 27), 27.0) < 6.0).astype(_F32)[:, None, None]
    sl, sd = cv.tube((zbot, 0.0, y_v), (ztop, 0.0, y_v), r_body)
    if sl is not None:
        cortex = cv.soft(np.abs(sd + 1.5) - 1.5)
        body_hu = (1 - disc[sl[0]]) * rng.uniform(180, 300) + disc[sl[0]] * 90.0
        cv.paint(cv.soft(sd), body_hu, sl)
        cv.paint(cortex * (1 - disc[sl[0]]), rng.uniform(550, 800), sl)
    sl, sd = cv.tube((zbot, 0.0, y_v - r_body - 18), (ztop, 0.0, y_v - r_body - 18), 16.0)
    if sl is not None:
        cv.paint(cv.soft(sd), rng.uniform(350, 600), sl)  # neural arch
    sl, sd = cv.tube((zbot, 0.0, y_v - r_body - 12), (ztop, 0.0, y_v - r_body - 12), 8.0)
    if sl is not None:
        cv.paint(cv.soft(sd), 15.0, sl)  # canal (CSF)


def _lobe_of(c, z_mid: float) -> str:
    """Lobe name of a point (z, x, y): oblique fissure sloping down anteriorly, right horizontal fissure."""
    z, x, y = c
    side = "right" if x > 0 else "left"
    if z < z_mid - 0.9 * y + 10.0:
        return f"{side} lower lobe"
    if side == "right" and z < z_mid + 5.0:
        return "right middle lobe"
    return f"{side} upper lobe"


def _lobe_mask(cv: _Canvas, sl, lobe: str, z_mid: float) -> np.ndarray:
    """Soft mask of `lobe` within a box (same fissure model as `_lobe_of`)."""
    z, x, y = cv.coords(sl)
    right = lobe.startswith("right")
    m = cv.soft(-x if right else x)
    lower = cv.soft(z - (z_mid - 0.9 * y + 10.0), cv.spacing[0])
    if lobe.endswith("lower lobe"):
        return m * lower
    m = m * (1 - lower)
    if lobe == "right middle lobe":
        return m * cv.soft(z - z_mid - 5.0, cv.spacing[0])
    if lobe == "right upper lobe":
        return m * (1 - cv.soft(z - z_mid - 5.0, cv.spacing[0]))
    return m


def _sample_point(
    cv: _Canvas,
    rng,
    sd_lung: np.ndarray,
    margin: float,
    *,
    lobe: str | None = None,
    z_mid: float = 0.0,
    zmin: float | None = None,
    avoid: Sequence = (),
):
    """A random point (z, x, y) in mm of fully aerated lung, `margin` mm inside it, outside the `avoid` spheres."""
    ok = (sd_lung < -margin) & (cv.lung > 0.99)
    z, x, y = cv.coords()
    for (cz, cx, cy), radius in avoid:
        ok &= (z - cz) ** 2 + (x - cx) ** 2 + (y - cy) ** 2 > radius**2
    if lobe is not None:
        ok &= _lobe_mask(cv, cv.full, lobe, z_mid) > 0.99
    if zmin is not None:
        ok &= z > zmin
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    ijk = np.unravel_index(int(idx[rng.integers(idx.size)]), cv.shape)
    jitter = rng.uniform(-0.5, 0.5, size=3)  # anywhere within the voxel, not only at its centre
    return tuple(float(a[i] + j * s) for a, i, j, s in zip(cv.axes, ijk, jitter, cv.spacing))


# --------------------------------------------------------------------------------------------- reports
_SIZE_WORD = ((35.0, "small"), (55.0, "moderate"), (1e9, "large"))
_FILLER = (
    "Trachea and both main bronchi are patent.",
    "The trachea and main bronchi are open.",
    "No pneumothorax.",
    "There is no pneumothorax.",
    "The thoracic aorta is of normal calibre.",
    "Mediastinal vascular structures are of normal calibre.",
    "Visualised upper abdominal organs are unremarkable.",
    "Limited sections of the upper abdomen are unremarkable.",
    "Mild degenerative changes of the thoracic spine.",
    "No destructive bone lesion is seen.",
    "The thyroid gland is unremarkable.",
    "The oesophagus is normal in calibre.",
)
_NEG = {
    "Pleural effusion": (
        "No pleural effusion.",
        "There is no pleural effusion.",
        "No pleural effusion is seen.",
        "Pleural spaces are clear, without effusion.",
        "No pleural effusion or thickening.",
    ),
    "Lung nodule": (
        "No lung nodule.",
        "No pulmonary nodule is identified.",
        "There is no lung nodule.",
        "No suspicious pulmonary nodule or mass.",
        "No nodules are seen in either lung.",
    ),
    "Cardiomegaly": (
        "Heart size is normal.",
        "No cardiomegaly.",
        "The heart is not enlarged.",
        "Heart size is within normal limits.",
        "There is no cardiomegaly.",
    ),
    "Pericardial effusion": (
        "No pericardial effusion.",
        "There is no pericardial effusion.",
        "The pericardium is unremarkable, without effusion.",
        "No pericardial fluid.",
    ),
    "Emphysema": (
        "No emphysema.",
        "There is no emphysema.",
        "No emphysematous change.",
        "Lung parenchyma is of normal attenuation, without emphysema.",
    ),
    "Consolidation": (
        "No consolidation.",
        "No focal consolidation.",
        "There is no consolidation.",
        "No airspace consolidation or infiltrate.",
    ),
    "Atelectasis": ("No atelectasis.", "There is no atelectasis.", "No atelectasis is seen."),
    "Lymphadenopathy": (
        "No lymphadenopathy.",
        "No mediastinal lymphadenopathy.",
        "No pathologically enlarged mediastinal or hilar lymph nodes.",
        "There is no lymphadenopathy.",
        "Lymph nodes are not enlarged.",
    ),
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _effusion_sentences(rng, side: str, depths: Mapping[str, float]) -> str:
    if side == "both":
        left, right = depths.get("left", 40.0), depths.get("right", 40.0)
        bigger = "right" if right > left + 10 else "left" if left > right + 10 else None
        size = next(w for t, w in _SIZE_WORD if max(left, right) < t)
        options = [
            f"Bilateral pleural effusions, {size}.",
            "Pleural effusion on both sides.",
            f"There is pleural effusion on both sides, {size}.",
            f"{_cap(size)} right and left pleural effusions.",
            f"There are bilateral pleural effusions measuring up to {max(left, right):.0f} mm.",
        ]
        if bigger:
            options.append(f"Bilateral pleural effusions, larger on the {bigger}.")
        return str(rng.choice(options))
    depth = depths.get(side, 40.0)
    size = next(w for t, w in _SIZE_WORD if depth < t)
    return str(
        rng.choice(
            [
                f"{_cap(size)} {side} pleural effusion.",
                f"There is pleural effusion on the {side}, {size}.",
                f"Pleural effusion on the {side} side, {depth:.0f} mm thick.",
                f"There is a {size} {side} pleural effusion.",
                f"{_cap(side)} pleural effusion measuring {depth:.0f} mm in thickness.",
                f"Fluid is present in the {side} pleural space, consistent with a {size} pleural effusion.",
                f"{_cap(side)}-sided pleural effusion, {size}.",
            ]
        )
    )


def _a(size_mm: float) -> str:
    """Indefinite article for a spoken number: "an 8 mm", "an 11 mm", "a 12 mm"."""
    n = f"{size_mm:.0f}"
    return "an" if n.startswith("8") or n in ("11", "18") else "a"


def _positive_sentence(rng, name: str, d: Mapping) -> str:
    """One sentence describing a present finding (not pleural effusion), with its size and place."""
    if name == "Lung nodule":
        nods = d.get("nodules", [("right upper lobe", 10)])
        if len(nods) >= 2:
            count = {2: "two", 3: "three"}.get(len(nods), "multiple")
            big_lobe, big = max(nods, key=lambda t: t[1])
            listed = ", ".join(f"{mm} mm in the {lobe}" for lobe, mm in nods)
            options = [
                f"{_cap(count)} lung nodules: {listed}.",
                f"Multiple lung nodules, the largest measuring {big} mm in the {big_lobe}.",
                f"There is a lung nodule in the {big_lobe}, one of {count} lung nodules up to {big} mm.",
                f"{_cap(count)} lung nodules, up to {big} mm ({', '.join(lobe for lobe, _ in nods)}).",
                f"Multiple pulmonary nodules, the largest measuring {big} mm in the {big_lobe}.",
            ]
        else:
            lobe, mm = nods[0]
            options = [
                f"{_cap(_a(mm))} {mm} mm lung nodule in the {lobe}.",
                f"There is {_a(mm)} {mm} mm lung nodule in the {lobe}.",
                f"Lung nodule in the {lobe}, {mm} mm.",
                f"There is a lung nodule in the {lobe} measuring {mm} mm.",
                f"Solid lung nodule of {mm} mm in the {lobe}.",
                f"Noncalcified pulmonary nodule of {mm} mm in the {lobe}.",
            ]
    elif name == "Cardiomegaly":
        ratio = d.get("cardiothoracic_ratio", 0.6)
        options = [
            "There is cardiomegaly.",
            "Cardiomegaly.",
            "Cardiomegaly is present.",
            f"Heart size is increased (cardiothoracic ratio {ratio:.2f}).",
            "Enlarged cardiac silhouette, consistent with cardiomegaly.",
        ]
    elif name == "Pericardial effusion":
        mm = d.get("pericardial_mm", 12.0)
        size = "small" if mm < 13 else "moderate"
        options = [
            f"{_cap(size)} pericardial effusion.",
            f"Pericardial effusion up to {mm:.0f} mm thick.",
            f"There is a {size} pericardial effusion.",
            f"Fluid is seen in the pericardial space, measuring {mm:.0f} mm.",
        ]
    elif name == "Emphysema":
        sev, upper = d.get("emphysema", ("moderate", True))
        where = "upper-lobe predominant" if upper else "diffuse"
        options = [
            f"Emphysema, {sev}, {where}.",
            f"There is emphysema, {sev} and {where}.",
            f"There is {sev} emphysema.",
            f"Emphysema is present, {where}.",
            f"Low-attenuation areas consistent with emphysema, {where}.",
            "Emphysematous changes in both lungs.",
        ]
    elif name == "Consolidation":
        lobe, size, air = d.get("consolidation", ("right lower lobe", 60.0, False))
        tail = " with air bronchograms" if air else ""
        options = [
            f"Consolidation in the {lobe}{tail}.",
            f"There is consolidation in the {lobe}, measuring {size:.0f} mm.",
            f"Consolidation is present in the {lobe}{tail}, suggestive of pneumonia.",
            f"There is consolidation in the {lobe}{tail}.",
            f"{_cap(lobe)} airspace consolidation{tail}.",
        ]
    elif name == "Atelectasis":
        lobe = d.get("atelectasis", "right lower lobe")
        options = [
            f"Atelectasis in the {lobe}.",
            f"There is atelectasis in the {lobe}.",
            f"Atelectasis is present in the {lobe}, plate-like.",
            f"There is atelectasis, band-like, in the {lobe}.",
            f"Plate-like atelectasis in the {lobe}.",
        ]
    elif name == "Lymphadenopathy":
        nodes = d.get("nodes", [("subcarinal", 15.0)])
        station, mm = max(nodes, key=lambda t: t[1])
        if len(nodes) > 1:
            where = ", ".join(n for n, _ in nodes[:-1]) + f" and {nodes[-1][0]}"
            options = [
                f"Lymphadenopathy in the {where} stations, up to {mm:.0f} mm in short axis.",
                f"Lymphadenopathy, the largest node {mm:.0f} mm ({station}).",
                f"There is lymphadenopathy ({where}), the largest node measuring {mm:.0f} mm.",
                f"Mediastinal lymphadenopathy, up to {mm:.0f} mm ({where}).",
                f"Multiple enlarged lymph nodes ({where}), the largest measuring {mm:.0f} mm.",
            ]
        else:
            options = [
                f"Lymphadenopathy in the {station} station, {mm:.0f} mm in short axis.",
                f"There is lymphadenopathy in the {station} region ({mm:.0f} mm).",
                f"Mediastinal lymphadenopathy: {station} node of {mm:.0f} mm.",
                f"Enlarged {station} lymph node measuring {mm:.0f} mm in short axis.",
            ]
    else:
        raise ValueError(f"no sentence for finding {name!r}")
    return str(rng.choice(options))


_PLAIN = ("There is {x}.", "{X} is present.", "{X} is noted.", "{X}.")
_PLAIN_NAME = {"Lung nodule": "a lung nodule"}
PLAIN_FRACTION = 0.4
"""Share of present findings stated bare ("There is consolidation."), without size or place (effusions keep the side). Real reports
do this, and it matters for learning: when every positive sentence carried descriptors and every negative one a
"no", a text tower could tell them apart by the descriptors alone, never learn what "no" does, and then read the
zero-shot pair "There is X." / "There is no X." (no descriptors in either) as the same text."""


def _plain_sentence(rng, name: str, side: str | None = None) -> str:
    """A bare statement of a present finding; an effusion keeps its side, as every real report gives it."""
    x = _PLAIN_NAME.get(name, name.lower())
    if side is not None:
        x = "bilateral pleural effusion" if side == "both" else f"{side} pleural effusion"
    return str(rng.choice(_PLAIN)).format(x=x, X=_cap(x))


def write_report(rng: np.random.Generator, labels: Mapping, details: Mapping | None = None) -> str:
    """Free-text findings as a radiologist might dictate them: varied phrasing, sizes, sides, negations.

    Every present finding gets a sentence; an absent one is negated explicitly most of the time (so that
    "There is no X." prompts have something to match) and otherwise left unsaid, as in real reports.
    """
    d = dict(details or labels.get("details", {}))
    sentences = []
    absent = [n for n in FINDINGS if not labels[n]]
    if "Pleural effusion" in absent and "Pericardial effusion" in absent and rng.random() < 0.3:
        sentences.append(
            str(rng.choice(["No pleural or pericardial effusion.", "There is no pleural or pericardial effusion."]))
        )
        absent = [n for n in absent if n not in ("Pleural effusion", "Pericardial effusion")]
    for name in FINDINGS:
        if labels[name]:
            if rng.random() < PLAIN_FRACTION:
                sentences.append(_plain_sentence(rng, name, labels["effusion_side"] if name == "Pleural effusion" else None))
            elif name == "Pleural effusion":
                sentences.append(_effusion_sentences(rng, labels["effusion_side"], d.get("effusion_depth_mm", {})))
            else:
                sentences.append(_positive_sentence(rng, name, d))
        elif name in absent and rng.random() < 0.85:
            sentences.append(str(rng.choice(_NEG[name])))
    k = int(rng.integers(1, 4))
    sentences += [str(s) for s in rng.choice(_FILLER, size=k, replace=False)]
    if not any(labels[n] for n in FINDINGS) and rng.random() < 0.5:
        sentences.append(str(rng.choice(["No acute cardiopulmonary abnormality.", "Otherwise normal chest CT."])))
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)


# --------------------------------------------------------------------------------------------- data set
def _save_npz(path: Path, image: np.ndarray, spacing: Sequence[float], compress: bool) -> None:
    """Write atomically: a reader never sees half a file, and a crash leaves no truncated volume."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, image=image, spacing=np.asarray(spacing, np.float32))
    os.replace(tmp, path)


def _generate_chunk(job: tuple) -> list[dict]:
    """Worker: draw, window and save cases `indices`; each case seeds its own generator from (seed, i)."""
    out_dir, indices, shape, spacing, seed, prevalence, compress = job
    rows = []
    for i in indices:
        rng = np.random.default_rng([seed, i])
        hu, labels, report = make_case(rng, shape, spacing, prevalence=prevalence)
        rel = f"{IMAGE_DIR}/case_{i:05d}.npz"
        _save_npz(Path(out_dir) / rel, window(hu, DEFAULT_WINDOWS, np.float16), spacing, compress)
        # a second dictation of the same study (its own stream): the pairs that teach the text tower paraphrase
        paraphrase = write_report(np.random.default_rng([seed, i, 1]), labels)
        row = {"img_path": rel, "findings": report, PARAPHRASE_COLUMN: paraphrase}
        row.update({k: labels[k] for k in (*FINDINGS, *SIDE_FINDINGS)})
        row["effusion_side"] = labels["effusion_side"] or ""
        row["nodule_mm"] = labels["nodule_mm"]
        rows.append(row)
    return rows


def _split_counts(n: int, splits: Sequence[tuple[str, float]]) -> list[int]:
    """Largest-remainder split sizes, with at least one case per split whenever n allows it."""
    fr = np.array([float(f) for _, f in splits])
    if (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {splits}")
    raw = fr / fr.sum() * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and fr[i] > 0 and counts.max() > 1:
            counts[i] += 1
            counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def generate_dataset(
    out_dir: str | Path,
    n: int = 600,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing_mm: Sequence[float] | None = None,
    seed: int = 0,
    splits: Sequence[tuple[str, float]] = (("train", 0.8), ("val", 0.1), ("test", 0.1)),
    prevalence: float = 0.3,
    workers: int = 1,
    overwrite: bool = False,
    compress: bool = False,
    verbose: bool = False,
) -> Path:
    """Write `n` phantoms and `synthetic.csv` under `out_dir`; return the CSV path.

    Cached: when the CSV, its parameter file (`synthetic.json`) and every volume already exist for the
    same parameters, nothing is regenerated. Volumes are uncompressed by default: generation and loading
    are then fastest, at 0.5 MB per 32 x 64 x 64 case.
    """
    out = Path(out_dir)
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in (spacing_mm or default_spacing(shape)))
    params = {
        "version": GENERATOR_VERSION,
        "n": int(n),
        "shape": list(shape),
        "spacing_mm": list(spacing),
        "seed": int(seed),
        "splits": [[str(a), float(b)] for a, b in splits],
        "prevalence": float(prevalence),
        "compress": bool(compress),
        "windows": [list(w) for w in DEFAULT_WINDOWS],
    }
    csv_path, params_path = out / CSV_NAME, out / PARAMS_NAME
    if not overwrite and _cache_valid(csv_path, params_path, params):
        if verbose:
            print(f"synthetic data: reusing {n} cases in {out}")
        return csv_path
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for p in (out / IMAGE_DIR).glob(".case_*.tmp"):  # left by an interrupted run
        p.unlink(missing_ok=True)
    params_path.unlink(missing_ok=True)  # invalidate the cache until the new set is complete
    counts = _split_counts(n, splits)
    split_of = np.empty(n, dtype=object)
    perm = np.random.default_rng([seed, 2**31]).permutation(n)
    start = 0
    for (name, _), cnt in zip(splits, counts):
        split_of[perm[start : start + cnt]] = name
        start += cnt

    t0 = time.perf_counter()
    chunk = max(1, min(64, math.ceil(n / max(1, workers) / 4)))
    jobs = [
        (str(out), list(range(i, min(n, i + chunk))), shape, spacing, seed, prevalence, compress)
        for i in range(0, n, chunk)
    ]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            rows = [r for part in ex.map(_generate_chunk, jobs) for r in part]
    else:
        rows = [r for job in jobs for r in _generate_chunk(job)]
    elapsed = time.perf_counter() - t0
    keep = {f"case_{i:05d}.npz" for i in range(n)}
    for p in (out / IMAGE_DIR).glob("case_*.npz"):  # leftovers of an earlier, larger set
        if p.name not in keep:
            p.unlink()

    fields = ["img_path", "findings", "split", *FINDINGS, *SIDE_FINDINGS, "effusion_side", "nodule_mm", PARAPHRASE_COLUMN]
    tmp = csv_path.with_name(f".{CSV_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({**row, "split": split_of[i]})
    os.replace(tmp, csv_path)
    tmp = params_path.with_name(f".{PARAMS_NAME}.tmp")
    tmp.write_text(json.dumps({**params, "seconds": round(elapsed, 2)}, indent=1))
    os.replace(tmp, params_path)  # written last: its presence marks a complete set
    if verbose:
        print(
            f"synthetic data: {n} cases {shape} at {' x '.join(f'{s:.2f}' for s in spacing)} mm in {out} "
            f"({elapsed:.1f} s with {workers} worker(s), {n / elapsed:.0f} cases/s)"
        )
    return csv_path


def _cache_valid(csv_path: Path, params_path: Path, params: dict) -> bool:
    if not (csv_path.is_file() and params_path.is_file()):
        return False
    try:
        stored = json.loads(params_path.read_text())
    except (OSError, ValueError):
        return False
    stored.pop("seconds", None)
    if stored != json.loads(json.dumps(params)):
        return False
    folder = csv_path.parent / IMAGE_DIR
    return all((folder / f"case_{i:05d}.npz").is_file() for i in range(params["n"]))


# --------------------------------------------------------------------------------------------- preview
def save_preview_png(csv_path: str | Path, out_png: str | Path, n: int = 4, *, split: str | None = None) -> Path:
    """A PNG of `n` phantoms: axial slice in both windows and a coronal slice, with the report beneath.

    Displayed in radiological convention: patient right on the viewer's left, anterior (axial) and
    superior (coronal) at the top.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r.get("split") == split][:n]
    if not rows:
        raise ValueError(f"{csv_path}: no rows to preview" + (f" in split {split!r}" if split else ""))
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 4.6 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        with np.load(csv_path.parent / row["img_path"]) as npz:
            img = npz["image"].astype(np.float32)
        d, _, w = img.shape[1:]
        z, yw = int(0.4 * d), int(0.4 * w)  # a little below the middle and behind it: bases, fluid, heart
        panels = [
            (img[0, z].T[::-1, ::-1], f"axial slice {z}, window (-1000, 400)"),
            (img[1, z].T[::-1, ::-1], f"axial slice {z}, window (-1000, 2000)"),
            (img[0, :, :, yw][::-1, ::-1], f"coronal slice {yw}, window (-1000, 400)"),
        ]
        for ax, (pic, title) in zip(ax_row, panels):
            ax.imshow(pic, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel("R <-> L", fontsize=7)
        positives = [k for k in FINDINGS if str(row.get(k, "0")) == "1"]
        text = f"{row['img_path']} [{', '.join(positives) or 'normal'}]\n" + textwrap.fill(row["findings"], 150)
        ax_row[1].set_xlabel(text, fontsize=7, wrap=True)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ct_siglip.synthetic --out DIR --n N`: write a phantom set and its CSV."""
    p = argparse.ArgumentParser(prog="python -m ct_siglip.synthetic", description=main.__doc__)
    p.add_argument("--out", required=True, help="output folder (CSV, parameters, images/)")
    p.add_argument("--n", type=int, default=600, help="number of cases")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"))
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SD", "SH", "SW"),
        help="voxel spacing in mm (default: a fixed 320 x 380 x 380 mm field of view)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prevalence", type=float, default=0.3, help="probability of each finding")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--compress", action="store_true", help="compressed NPZ (smaller, slower)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even when a matching set exists")
    p.add_argument("--preview", type=int, default=0, metavar="K", help="also write preview.png of K cases")
    args = p.parse_args(argv)
    csv_path = generate_dataset(
        args.out,
        args.n,
        shape=args.shape,
        spacing_mm=args.spacing,
        seed=args.seed,
        prevalence=args.prevalence,
        workers=args.workers,
        overwrite=args.overwrite,
        compress=args.compress,
        verbose=True,
    )
    if args.preview:
        print(f"preview: {save_preview_png(csv_path, Path(args.out) / 'preview.png', n=args.preview)}")
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
