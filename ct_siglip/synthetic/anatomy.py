"""The phantom's body: HU canvas, windowing, spacing, shared noise and vessel banks, anatomy painters.

Everything here is geometry and tissue, with no notion of which findings a case has: the case
(`cases._Case`) and the tests build on it. The data-contract constants that concern the picture
(`DEFAULT_WINDOWS`, `DEFAULT_SHAPE`, `FIELD_OF_VIEW_MM`) live here because `window` and
`default_spacing` need them. Orientation and units: see the package docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((-1000.0, 400.0), (-1000.0, 2000.0))
"""The two HU windows of the data contract (SPEC.md): lung/soft tissue and a wide bone window."""

DEFAULT_SHAPE: tuple[int, int, int] = (32, 64, 64)
FIELD_OF_VIEW_MM: tuple[float, float, float] = (320.0, 380.0, 380.0)
"""Default scanned extent (D, H, W) in mm; the spacing is this divided by the shape."""

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


# --------------------------------------------------------------------------------------------- painters
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
