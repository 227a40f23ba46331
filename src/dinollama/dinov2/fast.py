"""A faster inference copy of a DINOv2 backbone (same outputs, no state dict)."""

from __future__ import annotations

import copy

import torch

from ..nn import Attention, onednn_available, pack_linears
from .model import DinoVisionTransformer


def optimize_for_inference(
    model: DinoVisionTransformer, dtype: torch.dtype | None = None, rows_hint: int = 2048, inplace: bool = False
) -> DinoVisionTransformer:
    """Cast, pre-pack linear weights for oneDNN and pick the fastest attention kernel, on CPU.

    Call it after the weights are loaded: packed weights are not part of ``state_dict()``. On
    other devices only the dtype changes. The result is for ``torch.inference_mode()``.
    """
    model = model if inplace else copy.deepcopy(model)
    model = model.eval().requires_grad_(False).to(dtype=dtype)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and onednn_available():
        pack_linears(model.blocks, rows_hint)
    for m in model.modules():
        if isinstance(m, Attention):
            m.bmm_attention = on_cpu and model.cls_token.dtype in (torch.bfloat16, torch.float16)
    return model
