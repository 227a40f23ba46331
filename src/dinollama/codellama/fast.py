"""Decode-speed rewrite for CPU: fused projections, and linears that stream their weights fast.

Batch-1 decoding is a chain of matrix-vector products bound by the bytes of weight read. Where the
native kernels of :mod:`dinollama.nn.native` run, decoding rows go to them (f32/bf16/f16 near the
memory bandwidth; MKL's GEMV reaches about half of it in 16 bits); else oneDNN's pre-packed weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..memory import keep_freed_memory
from ..nn import decode_linears, native, onednn_available, pack_linears
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

    The input projections are stacked (wq/wk/wv, w1/w3). On CPU the float linears become
    :class:`~dinollama.nn.DecodeLinear` where the native kernels run (``native.isa()``), else
    oneDNN-packed. The result serves generation and forward passes but no longer has Meta's
    ``state_dict``: export or train the unoptimised model. On CPU the process also keeps its freed
    memory (:func:`~dinollama.memory.keep_freed_memory`).
    """
    model.eval().requires_grad_(False)
    fuse_projections(model)
    if model.tok_embeddings.weight.device.type == "cpu":
        keep_freed_memory()  # 512-token f32 prefill 1.8x faster in a process holding ~1 GB besides
        if native.isa() != "off":
            decode_linears(model)
        elif onednn_available():
            pack_linears(model, rows_hint)
    model.invalidate()
    return model
