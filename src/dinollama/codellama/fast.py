"""Decode-speed rewrite for CPU: oneDNN pre-packed weights for every projection.

Batch-1 decoding is a chain of matrix-vector products; MKL's GEMV on this class of CPU reaches
about half the bandwidth oneDNN does with a packed weight layout (measured in bench/).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import onednn_available, pack_linears
from .model import Transformer
from .quant import QuantLinear, cat_quant


def _stack(*linears: nn.Module) -> nn.Module:
    if all(isinstance(lin, QuantLinear) for lin in linears):
        return cat_quant(list(linears))
    w = torch.cat([lin.weight.detach() for lin in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    return out


def fuse_projections(model: Transformer) -> Transformer:
    """Stack wq/wk/wv and w1/w3 so each layer runs 2 input projections instead of 5 (in place)."""
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        att.wqkv = _stack(att.wq, att.wk, att.wv)
        del att.wq, att.wk, att.wv
        ff.w13 = _stack(ff.w1, ff.w3)
        del ff.w1, ff.w3
    return model


def optimize_for_inference(model: Transformer, rows_hint: int = 1) -> Transformer:
    """Pack the linear weights of ``model`` in place (CPU only; a no-op elsewhere).

    The input projections are stacked (wq/wk/wv, w1/w3) and, on CPU, packed for oneDNN. The result
    serves generation and forward passes but no longer has Meta's ``state_dict``: export or train
    the unoptimised model.
    """
    model.eval().requires_grad_(False)
    fuse_projections(model)
    if model.tok_embeddings.weight.device.type == "cpu" and onednn_available():
        pack_linears(model, rows_hint)
    return model
