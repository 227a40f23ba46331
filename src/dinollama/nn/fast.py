"""Inference-only rewrites that make CPU execution faster without changing the numbers' meaning.

On this class of CPU (MKL on AMD), ``F.linear`` reaches a fraction of peak while oneDNN with a
pre-packed weight layout is 1.2-1.3x faster, and it applies a GELU or a residual add to each
output tile while the tile is still in cache; for short sequences in bf16 a plain batched matmul
attention beats the CPU flash-attention kernel by 2x or more. GPUs are left alone. Whether a
weight can be packed is decided by :mod:`dinollama.nn.kernels`; where it cannot (bf16 on a CPU
without native bf16, ``DINOLLAMA_KERNELS=generic``) the same module runs plain torch ops.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .kernels import cpu_kernels, native_dtype_support, notice


def onednn_available() -> bool:
    """Whether oneDNN packed linears may be used at all (``DINOLLAMA_KERNELS=generic`` says no)."""
    return cpu_kernels().onednn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a oneDNN packed linear of ``dtype`` runs here; says once why not when the CPU lacks it."""
    kernels = cpu_kernels()
    if device.type != "cpu" or not kernels.onednn:
        return False
    if not kernels.can_pack(dtype):
        name = str(dtype).removeprefix("torch.")
        notice(f"this CPU has no native {name} (needs AVX512-{name.upper()}/AMX); {name} linears run unpacked on "
               "torch's generic kernels, Code Llama's prefill widened to fp32 (--dtype auto picks fp32 here)")
        return False
    return True


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight reordered once into oneDNN's blocked layout (CPU, no grad).

    ``activation="gelu"`` fuses the exact (erf) GELU after the product and ``forward(x, residual)``
    returns ``residual + linear(x)`` in the same pass. A per-output ``scale`` (a LayerScale gamma)
    is folded into the weight and bias in fp32 before the cast to ``dtype``, so ``gamma * (Wx + b)``
    costs no extra pass. The packed weight is opaque, so the module holds no state dict entries:
    pack after loading.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rows_hint: int,
        scale: Tensor | None = None,
        activation: Literal["none", "gelu"] = "none",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', not {activation!r}")
        self.in_features, self.out_features, self.activation = linear.in_features, linear.out_features, activation
        dtype = dtype or linear.weight.dtype
        w = linear.weight.detach()
        b = linear.bias.detach() if linear.bias is not None else None
        if scale is not None:
            s = scale.detach().float()
            w = w.float() * s[:, None]
            b = b.float() * s if b is not None else None
        w = w.to(dtype)
        self.packed = can_pack(dtype, w.device)
        weight = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint) if self.packed else w.contiguous()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", b.to(dtype) if b is not None else None, persistent=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is not None and self.activation != "none":
            raise ValueError("a residual add cannot follow a fused activation")
        if not self.packed:
            y = F.linear(x, self.weight, self.bias)
            y = F.gelu(y) if self.activation == "gelu" else y
            return y if residual is None else residual + y
        if residual is None:
            algorithm = "none" if self.activation == "gelu" else ""  # oneDNN's name for the erf form
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], algorithm)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), self.weight, self.bias, "add")

    def extra_repr(self) -> str:
        fused = f", activation={self.activation}" if self.activation != "none" else ""
        kernel = "oneDNN" if self.packed else "generic"
        return f"in_features={self.in_features}, out_features={self.out_features}{fused}, kernel={kernel}"


def pack_linears(module: nn.Module, rows_hint: int = 2048) -> nn.Module:
    """Replace every ``nn.Linear`` in ``module`` that oneDNN can pack here by a :class:`PackedLinear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and can_pack(child.weight.dtype, child.weight.device):
            setattr(module, name, PackedLinear(child, rows_hint))
        else:
            pack_linears(child, rows_hint)
    return module


UPCAST_ROWS = 32  # from here a 16-bit product the CPU lacks runs in fp32: f16 on Zen 4, 512 rows 148 -> 36 ms


class DecodeLinear(nn.Module):
    """A bias-free inference linear: up to :func:`~dinollama.nn.native.max_rows` rows (decoding) run the
    native matrix-vector kernel, which streams the plain weight near the memory bandwidth in f32, bf16
    and f16; more rows (prefill) run ``F.linear``, as fast as a packed layout at hundreds of rows. A
    16-bit weight the CPU has no native product for (f16 without AVX512-FP16, bf16 without AVX512-BF16)
    is widened to fp32 per call from :data:`UPCAST_ROWS` rows: torch's emulated 16-bit GEMM is 1.6-4x
    slower than widening plus fp32 MKL, and the weight stays 16-bit in memory; up to
    :data:`~dinollama.nn.native.WIDENED_ROWS` rows the native kernel, widening in registers, is faster still.
    On AVX2 (:func:`~dinollama.nn.native.tiled`) f32 and widened prompts of any length run its tiled product."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("DecodeLinear has no bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        widened = w.dtype != torch.float32 and not native_dtype_support(w.dtype)
        if native.usable(x, widened, float_weight=True):
            return native.gemv(x, w)
        if widened and x.numel() >= UPCAST_ROWS * x.shape[-1]:
            return F.linear(x.float(), w.float()).to(x.dtype)
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=native gemv / F.linear"


def decode_linears(module: nn.Module) -> nn.Module:
    """Replace every bias-free CPU ``nn.Linear`` in ``module`` by a :class:`DecodeLinear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None and child.weight.device.type == "cpu":
            can_pack(child.weight.dtype, child.weight.device)  # its notice: prefill in 16 bits is slow without native support
            setattr(module, name, DecodeLinear(child))
        else:
            decode_linears(child)
    return module


def bmm_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal softmax attention as two batched matmuls: ``(B, H, T, hd)`` in, ``(B, T, H, hd)`` out.

    Without autograd it goes one batch element at a time: that element's score matrices stay in
    cache from the first matmul through the softmax to the second, its heads are taken as strided
    views of the fused qkv projection (the matmuls copy one element's views at a time, in cache,
    never the whole q/k/v), and the result lands in token-major order.
    """
    b, h, t, d = q.shape
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        q2, k2, v2 = q.reshape(b * h, t, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
        scores = torch.baddbmm(q2.new_empty(1, 1, 1), q2, k2.transpose(1, 2), beta=0.0, alpha=d**-0.5)
        return torch.bmm(F.softmax(scores, dim=-1), v2).view(b, h, t, d).transpose(1, 2)
    out = q.new_empty(b, t, h, d)
    for i in range(b):
        scores = torch.baddbmm(q.new_empty(1, 1, 1), q[i], k[i].transpose(1, 2), beta=0.0, alpha=d**-0.5)
        out[i] = torch.bmm(F.softmax(scores, dim=-1), v[i]).transpose(0, 1)
    return out


class Int8Linear(nn.Module):
    """Dynamic int8 ``nn.Linear`` for CPU inference: int8 weights with a scale per output channel,
    activations quantized per row (token) at run time, int32 products by ``torch._int_mm`` (oneDNN,
    with VNNI/AMX-INT8 where the CPU has them). Same interface as :class:`PackedLinear`: a LayerScale
    ``scale`` is folded in before quantizing, ``activation="gelu"`` and ``residual`` are applied after.
    Where ``torch._int_mm`` is slow or not exact (x86 without VNNI/AMX; see ``cpu_kernels().int8_matmul``)
    the int8 weights are expanded once to float32 and the product is a plain ``F.linear``.
    """

    def __init__(self, linear: nn.Linear, scale: Tensor | None = None, activation: Literal["none", "gelu"] = "none") -> None:
        super().__init__()
        self.in_features, self.out_features, self.activation = linear.in_features, linear.out_features, activation
        w = linear.weight.detach().float()
        b = linear.bias.detach().float() if linear.bias is not None else None
        if scale is not None:
            w, b = w * scale.detach().float()[:, None], (b * scale.detach().float() if b is not None else None)
        w_scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
        self.register_buffer("weight", (w / w_scale[:, None]).round().clamp(-127, 127).to(torch.int8).t().contiguous(),
                             persistent=False)  # (in, out): _int_mm's layout
        self.register_buffer("weight_scale", w_scale, persistent=False)
        self.register_buffer("bias", b, persistent=False)
        self.exact_int8 = cpu_kernels().int8_matmul
        if not self.exact_int8:
            notice("this CPU has no fast, exact int8 matmul (needs VNNI/AMX): int8 weights run as float32 products")
            self.weight = (self.weight.t().float() * w_scale[:, None]).contiguous()  # (out, in), the same values

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if not self.exact_int8:
            y = F.linear(x.float(), self.weight, self.bias)
            y = F.gelu(y) if self.activation == "gelu" else y
            return y if residual is None else residual + y
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if native.runs(x2):  # the same numbers, one pass in and one out
            xq, x_scale = native.quantize_rows(x2.contiguous())
            y = native.int8_epilogue(torch._int_mm(xq, self.weight), x_scale, self.weight_scale, self.bias,
                                     self.activation == "gelu", residual)
            return y.view(*shape[:-1], self.out_features)
        x_scale = (x2.abs().amax(1, keepdim=True) / 127.0).clamp_min(1e-12)
        xq = (x2 / x_scale).round_().to(torch.int8)
        y = torch._int_mm(xq, self.weight).float().mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y += self.bias
        y = y.view(*shape[:-1], self.out_features)
        y = F.gelu(y) if self.activation == "gelu" else y
        return y if residual is None else residual + y

    def extra_repr(self) -> str:
        fused = f", activation={self.activation}" if self.activation != "none" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{fused}, int8 (dynamic)"
