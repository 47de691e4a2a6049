"""The SigLIP sigmoid loss (Zhai et al., 2023), single- and multi-process.

Every image-text pair is an independent binary classification: the matching pair (the diagonal) is
positive, every other pair negative. With z_ij = label_ij * (t * <x_i, y_j> + b) the loss over a
batch of B pairs is  L = -1/B * sum_ij log sigmoid(z_ij)  (the paper's Algorithm 1: it normalises by
the number of positives per column, which is one, so a plain sum over the B x B matrix divided by B).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class SigLIPLoss(nn.Module):
    """Sigmoid contrastive loss with learnable temperature t = exp(t') and bias b.

    `temperature` is tau with t = 1 / tau (tau = 0.1 gives t = 10, the paper's initialisation);
    `bias_init` is b (the paper's -10, which makes the initial loss small for the mostly negative
    pairs). Both are learnable unless `learnable=False`.

    Across processes (`world_size > 1`), each rank scores its b local images against the texts of
    every rank, and the texts' gradients flow back to the rank that owns them. Every rank holds the
    same number b of pairs (the trainer's sampler guarantees it; B = b * world_size).

    Normalisation, precisely. The global loss is L = S / B with S the sum of -log sigmoid(z_ij) over
    all B x B pairs. Rank r returns L_r = S_r / b, S_r being the sum over the rows of its own images.
    Then sum_r L_r = S / b = world_size * L, and DDP, which *averages* gradients over ranks, turns the
    per-rank gradients into d(sum_r L_r)/d(theta) / world_size = dL/d(theta): exactly one process on the
    global batch. The text gradients are *summed* across ranks on the way back (an image on rank s
    scores a text on rank r), which is the "sum" inside sum_r L_r. t' and b are not tower parameters
    that DDP sees (the trainer averages their gradients itself), but the same argument holds.

    Implementations (`dist_impl`): "gather" all-gathers the texts (memory O(B * dim) for them);
    "bidir" passes them around the ring to both neighbours at once, world_size / 2 hops, so a rank
    holds at most two foreign blocks of b texts at a time (open_clip's neighbour exchange).
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

    @contextlib.contextmanager
    def local(self) -> Iterator[None]:
        """Score each call's pairs on this process only: validation batches are per-rank and may differ in
        size between ranks, so they must not enter a cross-rank exchange."""
        saved = self.world_size
        self.world_size = 1
        try:
            yield
        finally:
            self.world_size = saved

    def pair_logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """t * cos + b for every (image, text) pair, in float32 at least (float64 stays float64),
        whatever the autocast dtype: bf16 logits near |t| = 10 would lose the loss's small terms."""
        dtype = torch.promote_types(image_emb.dtype, torch.float32)
        with torch.autocast(device_type=image_emb.device.type, enabled=False):
            return self.t.to(dtype) * image_emb.to(dtype) @ text_emb.to(dtype).T + self.bias.to(dtype)

    def _block_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, positive: bool | int) -> torch.Tensor:
        """Sum of -log sigmoid(label * logit) over one block of pairs. `positive`: True for positives on the
        diagonal, an int k for positives on the diagonal at column offset k, False for none."""
        logits = self.pair_logits(image_emb, text_emb)
        labels = -torch.ones_like(logits)
        if positive is not False:
            labels.diagonal(0 if positive is True else positive).fill_(1.0)
        return -F.logsigmoid(labels * logits).sum()

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        local_b = image_emb.shape[0]
        if self.world_size == 1:
            return self._block_loss(image_emb, text_emb, positive=True) / local_b
        if self.dist_impl == "gather":
            return self._gather_loss(image_emb, text_emb) / local_b
        return self._bidir_loss(image_emb, text_emb) / local_b

    def _gather_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """One b x B block: local images against all texts, the positives at columns rank * b + i."""
        texts = _AllGather.apply(text_emb.contiguous())
        return self._block_loss(image_emb, texts, positive=self.rank * image_emb.shape[0])

    def _bidir_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Texts travel both ways round the ring: after hop k this rank holds the texts of ranks r - k and
        r + k. An even world size leaves the opposite rank (r + W/2) for one last one-way hop."""
        world, rank = self.world_size, self.rank
        left, right = (rank - 1) % world, (rank + 1) % world
        total = self._block_loss(image_emb, text_emb, positive=True)
        from_left = from_right = text_emb.contiguous()
        for _ in range((world - 1) // 2):
            # Pass on what came from the left to the right, and what came from the right to the left.
            from_left, from_right = _NeighbourExchange.apply(left, right, from_right, from_left)
            total = total + self._block_loss(image_emb, from_left, positive=False)
            total = total + self._block_loss(image_emb, from_right, positive=False)
        if world % 2 == 0:
            opposite = _RingShift.apply(left, right, from_left)
            total = total + self._block_loss(image_emb, opposite, positive=False)
        return total


class _AllGather(torch.autograd.Function):
    """All ranks' (b, d) tensors concatenated to (W * b, d). Backward: every rank holds a gradient for all
    W * b rows (from its own images); summed over ranks (all-reduce), each keeps the rows it owns."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # All-reduce rather than reduce-scatter: gloo lacks the latter, and these are B x dim floats.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        b = grad.shape[0] // ctx.world
        return grad[ctx.rank * b : (ctx.rank + 1) * b]


class _NeighbourExchange(torch.autograd.Function):
    """Send `to_left` to the left neighbour and `to_right` to the right one; return what the left and the
    right neighbour sent us. Backward is the same exchange of the gradients: the gradient of what came
    from the left goes back to the left, where it is the gradient of that rank's `to_right`."""

    @staticmethod
    def forward(ctx, left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor):
        ctx.left, ctx.right = left, right
        return _p2p([(to_left, left), (to_right, right)], [(to_right, left), (to_left, right)])

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):
        to_left_grad, to_right_grad = _p2p(
            [(grad_from_left.contiguous(), ctx.left), (grad_from_right.contiguous(), ctx.right)],
            [(grad_from_right, ctx.left), (grad_from_left, ctx.right)],
        )
        return None, None, to_left_grad, to_right_grad


class _RingShift(torch.autograd.Function):
    """One-way hop: send to the right neighbour, receive from the left; the gradient travels back."""

    @staticmethod
    def forward(ctx, left: int, right: int, tensor: torch.Tensor) -> torch.Tensor:
        ctx.left, ctx.right = left, right
        return _p2p([(tensor.contiguous(), right)], [(tensor, left)])[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, _p2p([(grad.contiguous(), ctx.left)], [(grad, ctx.right)])[0]


def _p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, ...]:
    """Post all sends and receives at once (no ordering deadlock), wait, return the received tensors.
    `recvs` holds (a tensor shaped like the incoming one, source rank)."""
    outs = [torch.empty_like(like) for like, _ in recvs]
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, out, peer) for out, (_, peer) in zip(outs, recvs)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return tuple(outs)


def text_pair_loss(
    first: torch.Tensor, second: torch.Tensor, temperature: float = 0.05, *, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Symmetric InfoNCE between two texts of each study (`--text_pair_weight`): row i of `first` must pick
    row i of `second` among the global batch's, and the reverse, on cosine similarity / `temperature`.

    LLM2Vec's pair step (`ct_siglip.simcse`) uses the one-directional form of this loss before CLIP. During
    CLIP it runs on the projected embeddings the SigLIP loss sees, symmetric, so that both texts of a pair are
    pulled toward each other and neither drifts alone.

    Across processes each rank scores its own rows (of `first` against every rank's `second`, and of `second`
    against every rank's `first`) and returns their sum / b, as `SigLIPLoss` does: the mean over ranks is the
    global batch's loss, and DDP's averaged gradients are its gradient (the gathered rows' gradients are summed
    back to their owners). So 2 processes of 4 train like one of 8.
    """
    dtype = torch.promote_types(first.dtype, torch.float32)  # float32 at least; float64 stays float64
    a = F.normalize(first.to(dtype), dim=-1)
    b = F.normalize(second.to(dtype), dim=-1)
    if world_size == 1:
        logits = a @ b.T / temperature
        target = torch.arange(len(a), device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    all_a, all_b = _AllGather.apply(a.contiguous()), _AllGather.apply(b.contiguous())
    target = torch.arange(len(a), device=a.device) + rank * len(a)
    rows = F.cross_entropy(a @ all_b.T / temperature, target, reduction="sum")
    cols = F.cross_entropy(b @ all_a.T / temperature, target, reduction="sum")
    return 0.5 * (rows + cols) / len(a)
