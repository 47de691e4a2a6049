"""Evaluation metrics against hand-computed cases and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ct_siglip.metrics import (
    ZERO_SHOT_TEMPLATES,
    format_prompt,
    retrieval_recall,
    roc_auc,
    zero_shot_auroc,
    zero_shot_scores,
)


def test_retrieval_hand_computed_with_tie_and_k_beyond_n():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # image 0: its text is best -> rank 1
            [0.8, 0.5, 0.7],  # image 1: two texts score higher -> rank 3
            [0.3, 0.6, 0.6],  # image 2: tied with text 1 -> pessimistic rank 2
        ]
    )
    r = retrieval_recall(sim, ks=(1, 2, 5))
    # text->image, by column: text 0 rank 1; text 1: 0.6 >= 0.5 -> rank 2; text 2: 0.7 >= 0.6 -> rank 2
    expected = {
        "i2t_R@1": 1 / 3,
        "i2t_R@2": 2 / 3,
        "i2t_R@5": 1.0,
        "t2i_R@1": 1 / 3,
        "t2i_R@2": 1.0,
        "t2i_R@5": 1.0,
    }
    assert r.keys() == expected.keys()
    for k, v in expected.items():
        assert r[k] == pytest.approx(v), k


def test_retrieval_ties_count_against_the_true_item():
    r = retrieval_recall(np.zeros((4, 4)), ks=(1, 3, 4, 10), prefix="val/")
    assert r["val/i2t_R@1"] == 0.0 and r["val/t2i_R@3"] == 0.0  # all tied: every true item ranks last
    assert r["val/i2t_R@4"] == 1.0 and r["val/t2i_R@10"] == 1.0


def test_retrieval_nan_is_a_miss_and_shape_is_checked():
    sim = torch.eye(3)
    sim[1, 1] = float("nan")
    r = retrieval_recall(sim, ks=(1,))
    assert r["i2t_R@1"] == pytest.approx(2 / 3) and r["t2i_R@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="square"):
        retrieval_recall(torch.zeros(2, 3))


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(brute_force_auc(scores, labels))


def test_auroc_hand_values():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_auroc_ignores_unknown_labels_and_undefined_cases_are_nan():
    scores = [0.9, 0.1, 0.8, 0.3, 0.05]
    assert roc_auc(scores, [1, 0, -1, 0, -1]) == roc_auc([0.9, 0.1, 0.3], [1, 0, 0]) == 1.0
    assert roc_auc(scores, [1, 0, float("nan"), 0, -1]) == 1.0  # an empty CSV cell is unknown too
    assert math.isnan(roc_auc(scores, [1, 1, 1, -1, 1]))  # one class only
    assert math.isnan(roc_auc(scores, [-1] * 5))
    assert math.isnan(roc_auc([0.1, float("nan")], [0, 1]))
    with pytest.raises(ValueError, match="0, 1 or -1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="length"):
        roc_auc([0.1, 0.2], [0])


def test_zero_shot_scores_ensemble_normalised_prompt_means():
    e = torch.eye(4)
    img = torch.stack([e[0], e[1]])
    pos = torch.stack([e[0], 3 * e[2]])  # scale must not matter: prompts are normalised first
    neg = e[1:2]
    s = zero_shot_scores(img, pos, neg)
    # prototype(pos) = (e0 + e2) / sqrt(2): image 0 -> 1/sqrt2 - 0, image 1 -> 0 - 1
    torch.testing.assert_close(s, torch.tensor([1 / math.sqrt(2), -1.0]))


def test_templates_start_with_ct_rate_pair_and_lowercase_findings():
    assert ZERO_SHOT_TEMPLATES[0] == ("There is {finding}.", "There is no {finding}.")
    assert len(ZERO_SHOT_TEMPLATES) >= 3
    assert format_prompt("{finding} is present.", "Pleural effusion") == "Pleural effusion is present."
    assert format_prompt("There is no {finding}.", "Lung nodule") == "There is no lung nodule."


def test_zero_shot_auroc_on_constructed_embeddings():
    """Texts about a finding point along its axis (negated: the opposite way); images do the same."""
    axes = {"pleural effusion": 0, "cardiomegaly": 1}
    calls = []

    def encode_text(texts):
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            name = next(n for n in axes if n in t.lower())
            negative = " no " in f" {t.lower()} "
            out[i, axes[name]] = -1.0 if negative else 1.0
            out[i, 3] = 0.3 * (i % 3)  # prompt-specific nuisance direction
        return torch.nn.functional.normalize(out, dim=-1)

    rng = np.random.default_rng(0)
    effusion = rng.integers(0, 2, size=30)
    cardio = rng.integers(0, 2, size=30)
    img = torch.randn(30, 4) * 0.1
    img[:, 0] += torch.tensor(effusion * 2.0 - 1.0)
    img[:, 1] += torch.tensor(1.0 - cardio * 2.0)  # deliberately inverted: AUROC 0
    img = torch.nn.functional.normalize(img, dim=-1)
    labels = {"Pleural effusion": effusion, "Cardiomegaly": cardio, "Emphysema": np.ones(30)}

    def encode_any(texts):  # "emphysema" has no axis: give it a constant embedding
        calls.append(list(texts))
        known = [t for t in texts if "emphysema" not in t.lower()]
        out = torch.zeros(len(texts), 4)
        out[[i for i, t in enumerate(texts) if "emphysema" not in t.lower()]] = encode_text(known)
        out[[i for i, t in enumerate(texts) if "emphysema" in t.lower()], 2] = 1.0
        return out

    r = zero_shot_auroc(img, encode_any, labels)
    assert r["zeroshot_auroc/Pleural effusion"] == 1.0
    assert r["zeroshot_auroc/Cardiomegaly"] == 0.0
    assert math.isnan(r["zeroshot_auroc/Emphysema"])  # one class only
    assert r["zeroshot_auroc_mean"] == 0.5  # mean over labels with a defined AUROC
    assert len(calls) == 1 and len(calls[0]) == 3 * 2 * len(ZERO_SHOT_TEMPLATES)  # one batched call
    assert "There is pleural effusion." in calls[0] and "There is no cardiomegaly." in calls[0]


def test_evaluation_scores_the_prompts_on_the_reports_too():
    """`zeroshot_text_auroc/<label>` is the zero-shot AUROC with the reports' embeddings in the images' place:
    here the reports are read perfectly (1.0) while the images carry the finding inverted (0.0)."""
    from ct_siglip.evaluate import evaluate_embeddings

    calls = []

    def encode(texts):  # prompts about effusion along axis 0, negated ones the opposite way
        calls.append(texts)
        return torch.tensor([[-1.0, 0.2] if " no " in f" {t.lower()} " else [1.0, 0.2] for t in texts])

    y = np.array([1, 0, 1, 1, 0, 0])
    text = torch.nn.functional.normalize(torch.tensor([[2 * v - 1.0, 0.5] for v in y]), dim=-1)
    image = -text
    emb = {"image": image, "text": text, "loss": 1.0, "index": torch.tensor([2, 0, 1, 3, 5, 4])}
    labels = {"Pleural effusion": y[[1, 2, 0, 3, 5, 4]]}  # in table order: emb row k is table row index[k]
    m = evaluate_embeddings(emb, labels=labels, encode_text=encode)
    assert m["val/zeroshot_text_auroc/Pleural effusion"] == 1.0
    assert m["val/zeroshot_text_auroc_mean"] == 1.0
    assert m["val/zeroshot_auroc/Pleural effusion"] == 0.0
    assert len(calls) == 1  # the prompts are encoded once for both scorings
