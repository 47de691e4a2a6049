"""Evaluation metrics as pure functions: retrieval recall, ROC AUC and zero-shot classification.

No model code here: callers pass embeddings (and, for zero-shot, a text-encoding callable), so the
same functions serve validation during training, the evaluation CLI and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ZERO_SHOT_TEMPLATES: list[tuple[str, str]] = [
    ("There is {finding}.", "There is no {finding}."),  # CT-RATE's prompt pair
    ("{finding} is present.", "No {finding}."),
    ("Findings consistent with {finding}.", "No evidence of {finding}."),
    ("The scan shows {finding}.", "The scan shows no {finding}."),
]
"""(positive, negative) prompt variants; `{finding}` is the lower-cased label name."""


def retrieval_recall(sim: Tensor | np.ndarray, ks: Sequence[int] = (1, 5, 10), *, prefix: str = "") -> dict[str, float]:
    """Recall@k for image->text (rows) and text->image (columns); the true pair is on the diagonal.

    Ties are resolved pessimistically: the rank of the true item is the number of candidates scoring
    at least as high as it (itself included), so a model that gives every pair the same score gets
    R@k = 0 for every k < N, not a perfect 1. NaN scores count as -inf (a broken embedding never
    helps). k >= N gives 1.0.
    """
    s = torch.as_tensor(sim).detach().to("cpu", torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sim must be a square (N, N) matrix, got shape {tuple(s.shape)}")
    s = torch.nan_to_num(s, nan=-float("inf"))
    diag = s.diagonal()
    rank_i2t = (s >= diag[:, None]).sum(dim=1)  # per image: texts scoring >= its own text
    rank_t2i = (s >= diag[None, :]).sum(dim=0)  # per text: images scoring >= its own image
    out: dict[str, float] = {}
    for name, rank in (("i2t", rank_i2t), ("t2i", rank_t2i)):
        for k in ks:
            out[f"{prefix}{name}_R@{k}"] = float((rank <= k).double().mean()) if len(rank) else float("nan")
    return out


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic with midranks for tied scores.

    Labels are 1 (positive), 0 (negative) or -1 / NaN (unknown, ignored).
    Returns nan when one class is absent or a kept score is NaN: the AUC is then undefined, and a
    number would be misleading in a mean.
    """
    s, y = _numpy(scores), _numpy(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    y = np.where(np.isnan(y), -1.0, y)  # an empty CSV cell reads as NaN: unknown, like -1
    bad = ~np.isin(y, (0.0, 1.0, -1.0))
    if bad.any():
        raise ValueError(f"labels must be 0, 1 or -1 (unknown); found {np.unique(y[bad])[:5].tolist()}")
    keep = y != -1
    s, y = s[keep], y[keep]
    n_pos = int((y == 1).sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    midranks = ends - (counts - 1) / 2.0  # 1-based average rank of each group of equal scores
    rank_sum = midranks[inverse][y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _numpy(x) -> np.ndarray:
    """Flat float64 copy of a tensor, array, list or pandas Series."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def zero_shot_scores(image_emb: Tensor, pos_text_emb: Tensor, neg_text_emb: Tensor) -> Tensor:
    """Score (N,) = cos(image, positive prompt) - cos(image, negative prompt).

    With P prompt variants, each side is ensembled the CLIP way: the mean of the L2-normalised prompt
    embeddings, renormalised. Averaging in embedding space keeps one odd prompt from dominating and
    gives the same result as a single prompt when P = 1.
    """
    img = F.normalize(image_emb.detach().float(), dim=-1)

    def prototype(t: Tensor) -> Tensor:
        t = t.detach().float().reshape(-1, t.shape[-1])
        return F.normalize(F.normalize(t, dim=-1).mean(dim=0), dim=0).to(img.device)

    return img @ prototype(pos_text_emb) - img @ prototype(neg_text_emb)


def format_prompt(template: str, finding: str) -> str:
    """Fill a template with the lower-cased finding and capitalise the sentence's first letter."""
    text = template.format(finding=finding.lower())
    return text[:1].upper() + text[1:]


@torch.no_grad()
def zero_shot_auroc(
    image_emb: Tensor,
    encode_text: Callable[[list[str]], Tensor],
    labels: Mapping[str, Sequence | np.ndarray | Tensor],
    templates: Sequence[tuple[str, str]] = ZERO_SHOT_TEMPLATES,
    scores_out: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Zero-shot AUROC per label: score each image with `zero_shot_scores`, compare with the 0/1/-1 labels.

    `encode_text(texts) -> (len(texts), E)` is called once with every prompt of every label. Returns
    `{"zeroshot_auroc/<label>": auc, ..., "zeroshot_auroc_mean": mean over labels with a defined AUC}`;
    `scores_out`, when given, receives each label's scores.
    """
    names = list(labels)
    if not names or not templates:
        return {"zeroshot_auroc_mean": float("nan")}
    prompts = [format_prompt(t[side], name) for name in names for side in (0, 1) for t in templates]
    emb = encode_text(prompts)
    emb = torch.as_tensor(emb).reshape(len(names), 2, len(templates), -1)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        scores = zero_shot_scores(image_emb, emb[i, 0], emb[i, 1]).cpu().numpy()
        out[f"zeroshot_auroc/{name}"] = roc_auc(scores, labels[name])
        if scores_out is not None:  # for ROC curves (ct_siglip.plots)
            scores_out[name] = scores
    defined = [v for v in out.values() if not np.isnan(v)]
    out["zeroshot_auroc_mean"] = float(np.mean(defined)) if defined else float("nan")
    return out
