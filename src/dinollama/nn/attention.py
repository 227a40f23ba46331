"""Multi-head attention on top of ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast import bmm_attention


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    return_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Attention over ``(B, H, T, hd)`` tensors.

    The fused SDPA kernel is used unless the caller wants the attention map, which the
    fused kernels never materialise; then the same softmax is computed explicitly.
    """
    if not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal), None
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if is_causal:
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.float().softmax(dim=-1).to(q.dtype)
    return weights @ v, weights


def self_attention(
    qkv: Tensor, num_heads: int, return_attention: bool = False, bmm: bool = False, queries: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention from a fused ``(B, T, 3C)`` qkv projection to ``(B, T, C)``.

    ``bmm`` picks :func:`bmm_attention` (faster than the fused kernels for bf16 on CPU) unless the
    attention map is wanted. ``queries=n`` attends from the first ``n`` tokens only (to all keys).
    """
    b, n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    if queries is not None:
        q, n = q[:, :, :queries], min(queries, n)
    if bmm and not return_attention:
        return bmm_attention(q, k, v).reshape(b, n, c), None
    out, weights = sdpa(q, k, v, return_weights=return_attention)
    return out.transpose(1, 2).reshape(b, n, c), weights


class Attention(nn.Module):
    """ViT self-attention with one fused ``qkv`` projection (the official DINOv2 layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.bmm_attention = False  # the trainer sets it (bf16 on CPU); inference keeps SDPA's flash kernel
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self, x: Tensor, return_attention: bool = False, queries: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        out, weights = self_attention(self.qkv(x), self.num_heads, return_attention, self.bmm_attention, queries)
        return self.proj(out), weights
