"""Weight-only quantization of the Code Llama linears: int8 and int4, per group or per channel.

Layouts follow GGUF's so that its files map on without a second rounding: int8 in groups of 32 is
Q8_0 (``w = d * q``), symmetric int4 in groups of 32 is Q4_0 (``w = d * (u - 8)``, ``u`` a nibble),
asymmetric int4 is Q4_1 (``w = d * u + m``). Scales (and minima) are float16, one per group:
1.06 bytes per weight for int8/32, 0.56 for int4/32 (0.62 asymmetric).

Kernels (picked in :meth:`QuantLinear.kernel`, forced to the generic one by
``DINOLLAMA_KERNELS=generic``): up to 16 rows (decoding), int8 and symmetric int4 run the native
integer dot products of :mod:`dinollama.nn.native`, and prompts too on AVX-512 VNNI CPUs (its int8 matrix
product) or where bf16 is emulated (up to 128 rows); otherwise int8 per channel ->
``torch._weight_int8pack_mm``, int4 in bf16 below 128 rows -> ``torch._weight_int4pack_mm_for_cpu``,
and the rest (prefill) dequantizes the weight for ``F.linear``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import native
from ..nn.kernels import cpu_kernels, native_dtype_support

# From this many rows a dequantized copy and one matrix product (oneDNN/AMX) beat torch's int4 kernel: with
# the native one-pass dequantize (0.3 ms for 4096 x 768, torch's ops 3-8 ms) already from 16, else from 128
PREFILL_ROWS, PREFILL_ROWS_NATIVE = 128, 16
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")


@dataclass(frozen=True)
class QuantConfig:
    bits: int  # 8 or 4
    group_size: int = 32  # 0: one scale per output channel (int8)
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization bits must be 8 or 4, got {self.bits}")
        if self.group_size not in (0, 32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128, 256 (or 0: per channel, int8), got {self.group_size}")
        if self.bits == 4 and self.group_size == 0:
            raise ValueError("int4 needs groups (32, 64, 128 or 256)")
        if self.bits == 8 and not self.symmetric:
            raise ValueError("int8 is symmetric (as Q8_0)")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_scheme(scheme: str | QuantConfig, group_size: int = 32, symmetric: bool = True) -> QuantConfig:
    if isinstance(scheme, QuantConfig):
        return scheme
    if scheme not in ("int8", "int4"):
        raise ValueError(f"scheme must be 'int8' or 'int4', got {scheme!r}")
    return QuantConfig(8 if scheme == "int8" else 4, group_size, symmetric)


class QuantLinear(nn.Module):
    """A bias-free linear with quantized weights (buffers ``qweight``, ``scales`` and, asymmetric,
    ``mins``: they are the state dict, so a quantized model saves and loads as safetensors)."""

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        g = config.group_size or in_features
        if in_features % g or (config.bits == 4 and in_features % 2):
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {g}")
        cols = in_features if config.bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.int8 if config.bits == 8 else torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(out_features, in_features // g, dtype=torch.float16, device=device))
        mins = torch.zeros(out_features, in_features // g, dtype=torch.float16, device=device) if not config.symmetric else None
        self.register_buffer("mins", mins)
        self._packed: tuple | None = None

    @classmethod
    def from_float(cls, weight: Tensor, config: QuantConfig) -> QuantLinear:
        """Round ``weight`` (out, in) to the nearest value of the scheme (absmax scales; min/max asymmetric)."""
        out_f, in_f = weight.shape
        q = cls(in_f, out_f, config, device=weight.device)
        g = config.group_size or in_f
        w = weight.detach().float().reshape(out_f, in_f // g, g)
        if config.bits == 8:
            d = w.abs().amax(-1) / 127
            codes = (w / d.clamp_min(1e-12)[..., None]).round().clamp(-127, 127).to(torch.int8)
            q.set_codes(codes.reshape(out_f, in_f), d)
        elif config.symmetric:  # Q4_0: the signed absmax value maps to -8
            amax = w.gather(-1, w.abs().argmax(-1, keepdim=True))[..., 0]
            d = amax / -8
            codes = (w / torch.where(d == 0, 1.0, d)[..., None] + 8).round().clamp(0, 15)
            q.set_codes(codes.reshape(out_f, in_f).to(torch.uint8), d)
        else:  # Q4_1
            lo, hi = w.amin(-1), w.amax(-1)
            d = (hi - lo) / 15
            codes = ((w - lo[..., None]) / d.clamp_min(1e-12)[..., None]).round().clamp(0, 15)
            q.set_codes(codes.reshape(out_f, in_f).to(torch.uint8), d, lo)
        return q

    def set_codes(self, codes: Tensor, scales: Tensor, mins: Tensor | None = None) -> None:
        """Store integer codes (int8 values, or int4 nibbles 0..15 as uint8, shape (out, in)) and scales."""
        if self.config.bits == 4:
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        self.qweight.copy_(codes)
        self.scales.copy_(scales.reshape(self.scales.shape))
        if mins is not None:
            self.mins.copy_(mins.reshape(self.mins.shape))
        self._packed = None

    def codes(self) -> Tensor:
        """Integer codes (out, in): int8 values, or int4 nibbles 0..15."""
        if self.config.bits == 8:
            return self.qweight
        lo, hi = self.qweight & 15, self.qweight >> 4
        return torch.stack([lo, hi], -1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if native.runs(self.scales) and dtype in (torch.float32, torch.bfloat16, torch.float16):
            mins = self.mins if self.config.bits == 4 else None
            return native.dequantize(self.qweight, self.scales, mins, self.config.bits, dtype)
        g = self.config.group_size or self.in_features
        c = self.codes().float().reshape(self.out_features, -1, g)
        s = self.scales.float()[..., None]
        if self.config.bits == 8:
            w = c * s
        elif self.config.symmetric:
            w = (c - 8) * s
        else:
            w = c * s + self.mins.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply, dtype casts do not: the codes and their fp16 scales are the format
        (``model.to(torch.bfloat16)`` would round the scales to bf16's 8-bit mantissa)."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        self._packed = None
        return self

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in (self.qweight, self.scales, self.mins) if b is not None)

    def kernel(self, x: Tensor) -> str:
        """Which kernel runs ``x``: ``native``, ``int8pack``, ``int4pack`` or ``generic`` (dequantize + ``F.linear``)."""
        if x.device.type != "cpu" or cpu_kernels().mode == "generic" or x.dtype not in (torch.float32, torch.bfloat16):
            return "generic"
        # without native bf16 the generic path widens the weight to fp32: the native kernel takes prompts too
        if self.config.symmetric and native.usable(x, widened=not native_dtype_support(torch.bfloat16, x.device),
                                                   quantized=True):
            return "native"
        if self.config.bits == 8 and self.config.group_size == 0:
            return "int8pack"
        # torch's int4 kernel: fast in bf16 for a few rows, 8-70x slower than dequantize + F.linear in fp32,
        # 3.3x slower at 64 rows in bf16 than the native dequantize + F.linear (measured, 134M shapes)
        few = x.numel() < (PREFILL_ROWS_NATIVE if native.runs(x) else PREFILL_ROWS) * self.in_features
        if (self.config.bits == 4 and few and x.dtype == torch.bfloat16 and self.out_features % 16 == 0
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
            return "int4pack"
        return "generic"

    def _int4pack(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._packed is None or self._packed[1].dtype != dtype:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
            # the kernel computes (u - 8) * d + zero: 0 for Q4_0, m + 8d for Q4_1's d * u + m
            zeros = self.mins.float() + 8 * self.scales.float() if self.mins is not None else torch.zeros_like(self.scales.float())
            sz = torch.stack([self.scales.float().t(), zeros.t()], -1).contiguous().to(dtype)
            self._packed = (packed, sz)
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        kind = self.kernel(x)
        if kind == "generic":
            # bf16/f16 activations on a CPU without that product in hardware: fp32 (torch emulates 16-bit GEMMs,
            # 4x slower: q8_0 prefill at 0.25x llama.cpp with AVX2 only)
            compute = x.dtype if native_dtype_support(x.dtype, x.device) else torch.float32
            return F.linear(x.to(compute), self.dequantize(compute)).to(x.dtype)
        if kind == "native":
            return native.gemv(x, self.qweight, self.scales, "q8" if self.config.bits == 8 else "q4")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if kind == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales[:, 0].to(x.dtype))
        else:
            packed, sz = self._int4pack(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.config.group_size, sz)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        c = self.config
        kind = f"int{c.bits}, {'per channel' if not c.group_size else f'groups of {c.group_size}'}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}" + (
            "" if c.symmetric else ", asymmetric")


def cat_quant(linears: list[QuantLinear]) -> QuantLinear:
    """Stack quantized linears along the output dimension (the fused wqkv / w13 of the fast path)."""
    first = linears[0]
    out = QuantLinear(first.in_features, sum(q.out_features for q in linears), first.config, first.qweight.device)
    out.qweight.copy_(torch.cat([q.qweight for q in linears]))
    out.scales.copy_(torch.cat([q.scales for q in linears]))
    if out.mins is not None:
        out.mins.copy_(torch.cat([q.mins for q in linears]))
    return out


def _modules(model: nn.Module, head: bool):
    for layer in model.layers:
        for name in LINEARS:
            parent, attr = name.split(".")
            yield getattr(layer, parent), attr
    if head:
        yield model, "output"


def quantize(model: nn.Module, scheme: str | QuantConfig = "int8", group_size: int = 32, symmetric: bool = True,
             head: bool = False) -> nn.Module:
    """Quantize the layers' linears of a Code Llama ``Transformer`` in place (embeddings and norms stay;
    the output head too unless ``head``); the scheme is kept in ``model.quantization``."""
    config = parse_scheme(scheme, group_size, symmetric)
    for parent, attr in _modules(model, head):
        lin = getattr(parent, attr)
        if isinstance(lin, nn.Linear):
            setattr(parent, attr, QuantLinear.from_float(lin.weight, config))
    model.quantization = {**config.to_dict(), "head": head}
    model.invalidate()
    return model


def quantized_skeleton(model: nn.Module, spec: dict) -> nn.Module:
    """Empty quantized modules where ``spec`` (``model.quantization`` as saved) says, to load weights into."""
    config = QuantConfig(spec["bits"], spec["group_size"], spec["symmetric"])
    device = model.tok_embeddings.weight.device
    for parent, attr in _modules(model, spec.get("head", False)):
        lin = getattr(parent, attr)
        setattr(parent, attr, QuantLinear(lin.in_features, lin.out_features, config, device))
    model.quantization = dict(spec)
    model.invalidate()
    return model
