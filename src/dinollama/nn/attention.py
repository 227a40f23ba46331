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


class Attention(nn.Module):
    """ViT self-attention with one fused ``qkv`` projection (the official DINOv2 layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.bmm_attention = False  # set by optimize_for_inference where it is faster (bf16 on CPU)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.bmm_attention and not return_attention:
            out, weights = bmm_attention(qkv[0], qkv[1], qkv[2]), None
        else:
            out, weights = sdpa(qkv[0], qkv[1], qkv[2], return_weights=return_attention)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), weights
