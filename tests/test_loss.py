"""SigLIPLoss against a direct transcription of the paper's Algorithm 1 (Zhai et al., 2023)."""

import math

import numpy as np
import pytest
import torch

from ct_siglip.loss import SigLIPLoss


def algorithm_1(zimg, ztxt, t_prime, b):
    """The paper's pseudo-code, line by line. Its first step (L2-normalising the embeddings) is the
    towers' job in this package, so the inputs here are already normalised."""
    n = zimg.shape[0]
    t = torch.exp(t_prime)
    logits = zimg @ ztxt.T * t + b
    labels = 2 * torch.eye(n, dtype=logits.dtype) - torch.ones(n, n, dtype=logits.dtype)
    return -torch.sum(torch.nn.functional.logsigmoid(labels * logits)) / n


def _normalised(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_loss_value_and_all_gradients_equal_algorithm_1(n):
    img, txt = _normalised(n, 8, 0).requires_grad_(), _normalised(n, 8, 1).requires_grad_()
    loss_fn = SigLIPLoss(temperature=0.3, bias_init=-2.5).double()
    ours = loss_fn(img, txt)
    g_ours = torch.autograd.grad(ours, [img, txt, loss_fn.t_prime, loss_fn.bias])

    img2, txt2 = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    assert loss_fn.t_prime.item() == pytest.approx(math.log(1 / 0.3), rel=1e-7)  # float32-stored init
    t_prime = loss_fn.t_prime.detach().clone().requires_grad_()
    b = torch.tensor(-2.5, dtype=torch.float64, requires_grad=True)
    ref = algorithm_1(img2, txt2, t_prime, b)
    g_ref = torch.autograd.grad(ref, [img2, txt2, t_prime, b])

    # float64 on both sides; the only difference is summation order, so 1e-12 relative is ample.
    torch.testing.assert_close(ours.double(), ref, rtol=1e-12, atol=0)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-10, atol=1e-14)


def test_initialisation_follows_tau_and_bias():
    loss_fn = SigLIPLoss(temperature=0.1, bias_init=-10.0)
    assert loss_fn.t.item() == pytest.approx(10.0, rel=1e-6)
    assert loss_fn.b.item() == -10.0
    assert loss_fn.t_prime.requires_grad and loss_fn.bias.requires_grad
    fixed = SigLIPLoss(learnable=False)
    assert not fixed.t_prime.requires_grad and not fixed.bias.requires_grad


def test_loss_is_computed_in_float32_under_bf16_inputs():
    img = _normalised(8, 16, 2).to(torch.bfloat16)
    txt = _normalised(8, 16, 3).to(torch.bfloat16)
    loss_fn = SigLIPLoss()
    loss = loss_fn(img, txt)
    assert loss.dtype == torch.float32
    ref = algorithm_1(img.double(), txt.double(), loss_fn.t_prime.detach().double(), loss_fn.bias.detach().double())
    # bf16 values are exact in float64; a float32 matmul over 16 dims keeps ~1e-6 relative.
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_matching_pairs_give_lower_loss_than_shuffled():
    img = _normalised(32, 16, 4)
    loss_fn = SigLIPLoss().double()
    aligned = loss_fn(img, img)
    shuffled = loss_fn(img, img[torch.from_numpy(np.random.default_rng(0).permutation(32))])
    assert aligned < shuffled


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SigLIPLoss(temperature=0.0)
