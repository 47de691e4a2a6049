"""Radiology-style report text: negations, fillers, sized and placed positive sentences, bare statements.

Needs only the catalogue (`findings.FINDINGS`), not the pictures: `write_report` turns a case's labels
and details into text, and the writer calls it a second time with its own stream for the paraphrase.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .findings import FINDINGS

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
                sentences.append(
                    _plain_sentence(rng, name, labels["effusion_side"] if name == "Pleural effusion" else None)
                )
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
