"""The SigLIP sigmoid loss (Zhai et al., 2023), single- and multi-process.

Every image-text pair is an independent binary classification: the matching pair (the diagonal) is
positive, every other pair negative. With z_ij = label_ij * (t * <x_i, y_j> + b) the loss over a
batch of B pairs is  L = -1/B * sum_ij log sigmoid(z_ij)  (the paper's Algorithm 1: it normalises by
the number of positives per column, which is one, so a plain sum over the B x B matrix divided by B).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class SigLIPLoss(nn.Module):
    """Sigmoid contrastive loss with learnable temperature t = exp(t') and bias b.

    `temperature` is tau with t = 1 / tau (tau = 0.1 gives t = 10, the paper's initialisation);
    `bias_init` is b (the paper's -10, which makes the initial loss small for the mostly negative
    pairs). Both are learnable unless `learnable=False`.

    Across processes (`world_size > 1`), each rank scores its local images against the texts of every
    rank; texts are gathered with an autograd-aware all-gather so their gradients flow back to the
    rank that owns them. Each rank's loss is its share of pairs divided by the *local* batch: DDP
    averages gradients over ranks, which turns that into the global-batch loss divided by the global
    batch, exactly as one process on the whole batch.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        bias_init: float = -10.0,
        learnable: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str = "gather",
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (tau, with t = 1/tau), got {temperature}")
        if dist_impl not in ("gather", "bidir"):
            raise ValueError(f"--loss_dist_impl must be 'gather' or 'bidir', got {dist_impl!r}")
        self.t_prime = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor(float(bias_init)), requires_grad=learnable)
        self.rank, self.world_size, self.dist_impl = rank, world_size, dist_impl

    @property
    def t(self) -> torch.Tensor:
        return self.t_prime.exp()

    @property
    def b(self) -> torch.Tensor:
        return self.bias

    def pair_logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """t * cos + b for every (image, text) pair, in float32 at least (float64 stays float64),
        whatever the autocast dtype: bf16 logits near |t| = 10 would lose the loss's small terms."""
        dtype = torch.promote_types(image_emb.dtype, torch.float32)
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            return self.t.to(dtype) * image_emb.to(dtype) @ text_emb.to(dtype).T + self.bias.to(dtype)

    def _block_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, positive: bool) -> torch.Tensor:
        """Sum of -log sigmoid(label * logit) over one block of pairs; positives on its diagonal if `positive`."""
        logits = self.pair_logits(image_emb, text_emb)
        labels = -torch.ones_like(logits)
        if positive:
            labels.diagonal().fill_(1.0)
        return -F.logsigmoid(labels * logits).sum()

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        local_b = image_emb.shape[0]
        if self.world_size == 1:
            return self._block_loss(image_emb, text_emb, positive=True) / local_b
        if self.dist_impl == "gather":
            return self._gather_loss(image_emb, text_emb) / local_b
        return self._bidir_loss(image_emb, text_emb) / local_b

    def _gather_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        # Autograd all_gather: the backward reduce-scatters each rank's text gradients to their owner.
        texts = torch.distributed.nn.functional.all_gather(text_emb.contiguous())
        total = image_emb.new_zeros((), dtype=torch.float32)
        for r, t_emb in enumerate(texts):
            total = total + self._block_loss(image_emb, t_emb, positive=(r == self.rank))
        return total

    def _bidir_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Neighbour exchange: texts travel around the ring, so memory stays O(local batch^2)."""
        total = self._block_loss(image_emb, text_emb, positive=True)
        left, right = (self.rank - 1) % self.world_size, (self.rank + 1) % self.world_size
        current = text_emb.contiguous()
        for _ in range(self.world_size - 1):
            current = _ring_shift(current, left, right)
            total = total + self._block_loss(image_emb, current, positive=False)
        return total


class _RingShift(torch.autograd.Function):
    """Send to the right neighbour, receive from the left; the gradient travels the opposite way."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, left: int, right: int) -> torch.Tensor:
        ctx.left, ctx.right = left, right
        return _exchange(tensor, send_to=right, recv_from=left)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad.contiguous(), send_to=ctx.left, recv_from=ctx.right), None, None


def _exchange(tensor: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    out = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, out, recv_from)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _ring_shift(tensor: torch.Tensor, left: int, right: int) -> torch.Tensor:
    return _RingShift.apply(tensor, left, right)
