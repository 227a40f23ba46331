"""The KV cache and attention over it at long context: fused kernels, no dense masks, bounded memory.

A chunk of ``t`` queries at ``start`` attends to the cached past ``[0, start)`` without a mask and to
itself causally. Each part runs on the fused flash kernel (CPU) or memory-efficient kernel (CUDA),
which also return the log-sum-exp of the scores; the parts, and the past taken in blocks of
``BLOCK`` keys, are merged exactly with those (the online-softmax identity). Memory is the chunk's
activations plus one block, whatever the context. The int8/fp8 cache stores one scale per
(token, head) and is dequantized block by block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BLOCK = 8192  # cached keys per fused-kernel call: bounds the dequantized copy, not the result
QUANTIZED = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # storage dtype -> largest value stored


class KVCache(nn.Module):
    """Keys/values ``(B, kv_heads, max_seq_len, head_dim)`` written in place; ``dtype`` int8 or
    float8_e4m3fn stores them quantized with a float16 scale per (token, head)."""

    def __init__(self, batch: int, seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        shape = (batch, kv_heads, seq_len, head_dim)
        self.quantized = dtype in QUANTIZED
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        scale_shape = (batch, kv_heads, seq_len, 1) if self.quantized else (0,)
        self.register_buffer("k_scale", torch.zeros(scale_shape, dtype=torch.float16, device=device), persistent=False)
        self.register_buffer("v_scale", torch.zeros(scale_shape, dtype=torch.float16, device=device), persistent=False)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in (self.k, self.v, self.k_scale, self.v_scale))

    def _quantize(self, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        s = (x.abs().amax(-1, keepdim=True).float() / QUANTIZED[dtype]).clamp_min(1e-8).to(torch.float16)
        q = x.float() / s.float()
        return (q.round().clamp(-127, 127) if dtype == torch.int8 else q).to(dtype), s

    def _store(self, data: Tensor, scale: Tensor, where: tuple, x: Tensor) -> None:
        if not self.quantized:
            data[where] = x
            return
        data[where], scale[where] = self._quantize(x, data.dtype)

    def update(self, start: int, k: Tensor, v: Tensor, row: int = 0) -> None:
        """Write ``t`` positions from ``start`` of rows ``row..row+B-1``."""
        where = (slice(row, row + k.shape[0]), slice(None), slice(start, start + k.shape[2]))
        self._store(self.k, self.k_scale, where, k)
        self._store(self.v, self.v_scale, where, v)

    def update_at(self, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Write one position per row, row ``i`` at ``positions[i]`` (continuous batching)."""
        where = (torch.arange(k.shape[0], device=positions.device), slice(None), positions)
        self._store(self.k, self.k_scale, where, k[:, :, 0])
        self._store(self.v, self.v_scale, where, v[:, :, 0])

    def read(self, b: int, lo: int, hi: int, dtype: torch.dtype, row: int = 0) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``lo..hi-1`` of rows ``row..row+b-1``: views of the cache, or
        dequantized copies."""
        rows = slice(row, row + b)
        k, v = self.k[rows, :, lo:hi], self.v[rows, :, lo:hi]
        if not self.quantized:
            return k, v
        return (k.to(dtype) * self.k_scale[rows, :, lo:hi].to(dtype), v.to(dtype) * self.v_scale[rows, :, lo:hi].to(dtype))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """``(out, logsumexp)`` of softmax attention, ``(B, H, T, d)`` with as many heads in q, k and v,
    on the fused kernel of the device (the plain formula elsewhere)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    if q.device.type == "cuda":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
        return out, lse
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def _grouped(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Grouped-query attention without repeating the cached keys: without a mask the ``g`` query heads
    of a KV head are one longer query sequence; the causal (chunk) part repeats its few keys."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    g = h // kv
    if g == 1:
        return fused_attention(q, k, v, causal)
    if causal:
        return fused_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), True)
    out, lse = fused_attention(q.reshape(b, kv, g * t, d), k, v, False)
    return out.reshape(b, h, t, d), lse.reshape(b, h, t)


def _merge(acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Combine two softmax attentions over disjoint keys from their log-sum-exps (in float32)."""
    out, lse = part[0].float(), part[1].float()
    if acc is None:
        return out, lse
    m = torch.maximum(acc[1], lse)
    w1, w2 = (acc[1] - m).exp(), (lse - m).exp()
    total = w1 + w2
    return (acc[0] * (w1 / total)[..., None] + out * (w2 / total)[..., None]), m + total.log()


def cached_attention(q: Tensor, k_new: Tensor, v_new: Tensor, cache: KVCache, start: int, row: int = 0) -> Tensor:
    """Queries at ``start..start+t-1`` against the cached past of cache rows ``row..`` (in blocks) and,
    causally, the chunk's own keys ``k_new``/``v_new`` (full precision, also when the cache is quantized)."""
    b = q.shape[0]
    acc = None
    for lo in range(0, start, BLOCK):
        k, v = cache.read(b, lo, min(start, lo + BLOCK), q.dtype, row)
        acc = _merge(acc, _grouped(q, k, v, causal=False))
    acc = _merge(acc, _grouped(q, k_new, v_new, causal=True))
    return acc[0].to(q.dtype)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a generation needs: weights, KV cache and the prefill workspace of one chunk."""

    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def kv_cache_bytes(n_layers: int, kv_heads: int, head_dim: int, batch: int, ctx: int, dtype: torch.dtype) -> int:
    """``2 x layers x kv_heads x head_dim x ctx x bytes`` (x batch), plus the scales of a quantized cache."""
    elem = torch.empty(0, dtype=dtype).element_size()
    scales = 2 * 2 * n_layers * kv_heads * batch * ctx if dtype in QUANTIZED else 0
    return 2 * n_layers * kv_heads * head_dim * ctx * batch * elem + scales


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: free GPU memory, or Linux's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(plan: MemoryPlan, device: torch.device, ctx: int, kv_dtype: torch.dtype, resident: int = 0) -> None:
    """Raise ``MemoryError`` with the numbers and the options when ``plan`` exceeds the device's memory
    (``resident``: bytes of the plan already allocated, e.g. loaded weights)."""
    free = available_memory(device)
    need = plan.total - resident
    if free is None or need <= free:
        return
    kv = str(kv_dtype).removeprefix("torch.")
    raise MemoryError(
        f"a {ctx:,}-token context needs {gib(plan.total)} (weights {gib(plan.weights)} + KV cache {gib(plan.kv_cache)} "
        f"in {kv} + workspace {gib(plan.workspace)}) but {device.type} has {gib(free + resident)} available: use a "
        "smaller --ctx, an int8 KV cache (--kv-dtype int8, half of bf16), or quantized weights")


def plan_memory(args, batch: int, ctx: int, weight_dtype: torch.dtype, kv_dtype: torch.dtype,
                chunk: int = 2048, weight_bytes: int | None = None) -> MemoryPlan:
    """What a generation of ``batch`` x ``ctx`` tokens needs with ``args`` (a ``ModelArgs``): the
    weights (``weight_bytes``, else counted from ``args`` in ``weight_dtype``), the cache, and one
    prefill chunk's activations in float32 (residual, norms, q/k/v, the SwiGLU hidden states, one
    dequantized block of the cache, last-position logits)."""
    if weight_bytes is None:
        layer = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads) + 3 * args.dim * args.ffn_hidden
        n_params = args.n_layers * (layer + 2 * args.dim) + 2 * args.vocab_size * args.dim + args.dim
        weight_bytes = n_params * torch.empty(0, dtype=weight_dtype).element_size()
    rows = batch * min(chunk, ctx)
    activations = rows * (6 * args.dim + 3 * args.ffn_hidden + (args.n_heads + 2 * args.kv_heads) * args.head_dim) * 4
    block = 2 * batch * args.kv_heads * args.head_dim * min(BLOCK, ctx) * 4 if kv_dtype in QUANTIZED else 0
    freqs = ctx * args.head_dim * 4  # complex64 rotations, head_dim / 2 per position
    workspace = activations + block + freqs + batch * args.vocab_size * 4
    return MemoryPlan(weight_bytes, kv_cache_bytes(args.n_layers, args.kv_heads, args.head_dim, batch, ctx, kv_dtype),
                      workspace)
