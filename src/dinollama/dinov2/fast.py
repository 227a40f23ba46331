"""A faster inference copy of a DINOv2 backbone (same outputs, no state dict)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory import keep_freed_memory
from ..nn import Attention, LayerScale, Mlp, PackedLinear, onednn_available, self_attention
from ..nn.fast import Int8Linear
from .model import Block, DinoVisionTransformer


def _gamma(ls: nn.Module) -> Tensor | None:
    return ls.gamma if isinstance(ls, LayerScale) else None


class InferenceBlock(nn.Module):
    """A :class:`Block` rewritten for CPU inference on oneDNN, with the same outputs.

    Both LayerScales are folded into ``attn.proj`` / ``mlp.fc2`` (``w3``), the GELU into ``fc1``
    and both residual adds into the projections, so a block runs four matrix multiplies, two
    LayerNorms and the attention, and no elementwise passes of its own.
    """

    def __init__(self, block: Block, rows_hint: int, dtype: torch.dtype) -> None:
        super().__init__()
        compute = torch.float32 if dtype == torch.int8 else dtype  # int8: weights only, the rest in fp32
        self.norm1, self.norm2 = block.norm1.to(compute), block.norm2.to(compute)
        self.num_heads = block.attn.num_heads

        def linear(lin: nn.Linear, scale=None, activation="none") -> nn.Module:
            if dtype == torch.int8:
                return Int8Linear(lin, scale=scale, activation=activation)
            return PackedLinear(lin, rows_hint, scale=scale, activation=activation, dtype=dtype)

        self.qkv = linear(block.attn.qkv)
        self.proj = linear(block.attn.proj, scale=_gamma(block.ls1))
        mlp = block.mlp
        self.gated = not isinstance(mlp, Mlp)  # SwiGLUFused: silu(first half) * second half
        fc_in, fc_out = (mlp.w12, mlp.w3) if self.gated else (mlp.fc1, mlp.fc2)
        self.fc_in = linear(fc_in, activation="none" if self.gated else "gelu")
        self.fc_out = linear(fc_out, scale=_gamma(block.ls2))

    def forward(
        self, x: Tensor, return_attention: bool = False, queries: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        out, weights = self_attention(self.qkv(self.norm1(x)), self.num_heads, return_attention, queries=queries)
        x = self.proj(out, residual=x[:, :queries])
        h = self.fc_in(self.norm2(x))
        if self.gated:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.fc_out(h, residual=x), weights


class _Positions:
    """The model's interpolated position embedding, computed once per input size (and device/dtype):
    the bicubic resize costs 0.4 ms a call, 1% of a ViT-S/14 image at 224 px, batch 1."""

    def __init__(self, model: DinoVisionTransformer) -> None:
        self.model, self.memo = model, {}

    def __call__(self, n_patches: int, h: int, w: int) -> Tensor:
        pos = self.model.pos_embed
        key = (n_patches, h, w, pos.device, pos.dtype)
        if key not in self.memo:
            if len(self.memo) >= 8:  # a stream of many sizes: keep the memory bounded
                self.memo.clear()
            self.memo[key] = type(self.model).interpolate_pos_encoding(self.model, n_patches, h, w).detach()
        return self.memo[key]


def optimize_for_inference(
    model: DinoVisionTransformer, dtype: torch.dtype | None = None, rows_hint: int = 2048, inplace: bool = False
) -> DinoVisionTransformer:
    """Cast, fuse and pre-pack the blocks for oneDNN, on CPU.

    Call it after the weights are loaded: the rewritten blocks have no ``state_dict()`` entries.
    LayerScale is folded into the weights before the cast, from the original precision. On other
    devices only the dtype changes. ``dtype=torch.int8`` (CPU) quantizes the block linears to int8
    weights with int8 activations per token (dynamic) and keeps everything else in fp32: inputs
    and outputs stay float32. The result is for ``torch.inference_mode()``; it keeps the interpolated
position embedding of each input size it has seen. On CPU the process also
    keeps its freed memory (:func:`~dinollama.memory.keep_freed_memory`).
    """
    model = model if inplace else copy.deepcopy(model)
    model = model.eval().requires_grad_(False)
    dtype = dtype or model.cls_token.dtype
    on_cpu = model.cls_token.device.type == "cpu"
    if dtype == torch.int8 and not on_cpu:
        raise ValueError("dtype=torch.int8 is the CPU path; on GPUs use bfloat16 or float16")
    if on_cpu:
        keep_freed_memory()  # the blocks' large temporaries come back from the heap, not page-faulted in
    if on_cpu and (onednn_available() or dtype == torch.int8):
        model.blocks = nn.ModuleList(InferenceBlock(b, rows_hint, dtype) for b in model.blocks)
    model = model.to(dtype=torch.float32 if dtype == torch.int8 else dtype)
    model.interpolate_pos_encoding = _Positions(model)
    for m in model.modules():
        if isinstance(m, Attention):  # SDPA's flash kernel: in torch 2.13 the fastest in bf16/fp16 too (1.1-3x)
            m.bmm_attention = False
    return model
