"""Pooling of LLM2Vec token states into one embedding per text, batched.

All functions take left-padded `hidden` (B, L, H) and a 0/1 `mask` (B, L) that marks the tokens to pool
(llm2vec's `embed_mask`: the report tokens after the instruction separator). llm2vec pools with a Python
loop over the batch (one host sync per row on GPU); these do the same maths in one vectorised call, and
`tests/test_text_tower.py` proves them equal to llm2vec's own output.

Padded positions are removed with `masked_fill`, not by multiplying with the mask, so that a non-finite
value in a padded row (possible in bf16) can never leak into the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "bos_token", "latent_attention")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens; a row with no masked token gives zeros (never NaN)."""
    keep = mask.bool().unsqueeze(-1)
    total = hidden.masked_fill(~keep, 0.0).sum(dim=1)
    count = keep.sum(dim=1).clamp_min(1).to(hidden.dtype)
    return total / count


def weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """llm2vec's `weighted_mean`: token k of n pooled tokens gets weight k / (1 + ... + n), later tokens weigh more."""
    m = mask.to(hidden.dtype)
    weights = torch.cumsum(m, dim=1) * m  # 1..n over the pooled (contiguous, right-aligned) tokens
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0).mul(weights.unsqueeze(-1)).sum(dim=1)


def last_token(hidden: torch.Tensor) -> torch.Tensor:
    """`eos_token` pooling: with left padding the last position is every row's last real token."""
    return hidden[:, -1]


def first_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`bos_token` pooling: the first non-padding token of each row (the BOS the tokenizer prepends).

    llm2vec selects `hidden[input_ids == bos_id]`, which is the same row-for-row when each text holds exactly
    one BOS, and returns the wrong number of rows otherwise; indexing by position cannot.
    """
    first = attention_mask.shape[1] - attention_mask.sum(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first.clamp_max(hidden.shape[1] - 1)]


class LatentAttentionPooling(nn.Module):
    """The llm2vec4cxr pooling head, batched: tokens attend to a learned latent table, then MLP, then mean.

    Each token is a query of an 8-head attention whose keys and values are the same `num_latents` learned
    vectors; the result goes through Linear-GELU-Linear and is averaged over the pooled tokens. Parameter names
    (`latents`, `multihead_attn.*`, `mlp.0.*`, `mlp.2.*`) are those of the llm2vec4cxr release, so its
    `latent_attn.*` weights load unchanged.

    A token's output depends only on that token (the latents are the only keys), so running every position,
    padding included, and masking the final mean equals the per-sample computation exactly. The latents'
    key/value projections are computed once per call instead of once per sample.
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"latent attention: hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.hidden_size, self.num_latents, self.num_heads = hidden_size, num_latents, num_heads
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        self.multihead_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) token states -> (B, L, H) per-token outputs before the mean."""
        b, n, h = hidden.shape
        heads, head_dim = self.num_heads, h // self.num_heads
        mha = self.multihead_attn
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q = F.linear(hidden, w_q, b_q).view(b, n, heads, head_dim).transpose(1, 2)
        k = F.linear(self.latents, w_k, b_k).view(self.num_latents, heads, head_dim).transpose(0, 1)
        v = F.linear(self.latents, w_v, b_v).view(self.num_latents, heads, head_dim).transpose(0, 1)
        # scale 1/sqrt(head_dim), no mask: every query may see every latent, exactly as nn.MultiheadAttention
        out = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        out = mha.out_proj(out.transpose(1, 2).reshape(b, n, h))
        return self.mlp(out)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.attend(hidden), mask)
