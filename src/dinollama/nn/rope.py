"""Rotary position embeddings with Meta's interleaved pairs, computed in fp32."""

from __future__ import annotations

import torch
from torch import Tensor


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> Tensor:
    """Complex rotations ``(end, head_dim // 2)``: pair i of position t turns by ``t * theta^(-2i/d)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate ``x`` of shape ``(B, T, H, hd)`` by ``freqs_cis`` ``(T, hd/2)``; math in fp32 as the reference."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    return rotated.type_as(x)
