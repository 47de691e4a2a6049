"""One phantom case: `_Case` paints anatomy and the drawn findings onto a canvas, `make_case` runs it.

Built on `anatomy` (canvas, banks, painters) and `findings` (catalogue and draw); the report comes from
`reports.write_report`, fed from the case's own text stream so that it does not shift the picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .anatomy import (
    _F32,
    DEFAULT_SHAPE,
    _arch,
    _Canvas,
    _lobe_mask,
    _lobe_of,
    _noise_bank,
    _paint_spine,
    _sample_point,
    _vessel_bank,
    default_spacing,
)
from .findings import FINDINGS, LOBES, MIN_NODULE_VOXELS, NODE_STATIONS, _draw_findings
from .reports import write_report


# --------------------------------------------------------------------------------------------- phantom
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
