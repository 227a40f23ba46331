"""The one place that decides which kernels run, by device and CPU capability.

oneDNN's packed bf16/fp16 linears need hardware support (AVX512-BF16/AMX, AVX512-FP16): on an
AVX2-only CPU such as AMD Zen 3 ``_reorder_linear_weight`` raises. Everything that picks a fast
path asks :func:`cpu_kernels` first and falls back to plain torch ops, so no command crashes for
an instruction the CPU lacks.

``DINOLLAMA_KERNELS`` forces a path, for tests and for comparing paths on one machine:

- ``auto`` (default): what this CPU supports;
- ``avx2``: behave as an AVX2-only CPU (oneDNN fp32 packing, no native bf16/fp16);
- ``generic``: plain torch ops only (no oneDNN packing, no native bf16/fp16).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

ENV = "DINOLLAMA_KERNELS"
MODES = ("auto", "avx2", "generic")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
_FP16_FLAGS = ("avx512_fp16", "amx_fp16", "fp16", "asimdhp")


@dataclass(frozen=True)
class CpuKernels:
    """What the CPU paths may use; ``mode`` says whether it was forced."""

    mode: str
    capability: str  # torch's ATen kernel level: DEFAULT, AVX2, AVX512, ...
    onednn: bool  # pre-packed oneDNN linears (fp32 on every x86 CPU oneDNN supports)
    native_bf16: bool  # bf16 products in hardware: packed bf16 linears, bf16 as the auto dtype
    native_fp16: bool
    int8_matmul: bool  # torch._int_mm fast and exact here (x86 without VNNI/AMX: 2.5 GOPS on a Zen 3, or saturating)
    amx: bool = False  # AMX tiles (bf16): oneDNN's 16-bit products beat the native rows from 9 rows (native.max_rows)

    def can_pack(self, dtype: torch.dtype) -> bool:
        """Whether a oneDNN packed linear of ``dtype`` runs here."""
        if not self.onednn:
            return False
        return dtype == torch.float32 or (dtype == torch.bfloat16 and self.native_bf16) or (
            dtype == torch.float16 and self.native_fp16)

    def describe(self) -> str:
        from . import native  # it builds on this module

        forced = f" (forced by {ENV}={self.mode})" if self.mode != "auto" else ""
        return (f"cpu kernels: native decode {native.describe()}, ATen {self.capability}, "
                f"oneDNN packing {'on' if self.onednn else 'off'}, "
                f"native bf16 {'yes' if self.native_bf16 else 'no'}, native fp16 {'yes' if self.native_fp16 else 'no'}, "
                f"int8 matmul {'yes' if self.int8_matmul else 'no'}{forced}")


def _flags() -> dict:
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    return get() if get is not None else {}


def _mkldnn_check(name: str) -> bool:
    fn = getattr(torch.ops.mkldnn, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def cpu_kernels() -> CpuKernels:
    """The CPU's kernel choices under the current ``DINOLLAMA_KERNELS`` setting (asked per layer call
    while decoding, so a setting seen before costs one lookup)."""
    raw = os.environ.get(ENV)
    known = _BY_SETTING.get(raw)
    if known is not None:
        return known
    mode = (raw or "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    _BY_SETTING[raw] = _detect(mode)
    return _BY_SETTING[raw]


_BY_SETTING: dict[str | None, CpuKernels] = {}


_CACHE: dict[str, CpuKernels] = {}


def _detect(mode: str) -> CpuKernels:
    if mode not in _CACHE:
        flags = _flags()
        onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        bf16 = any(flags.get(f) for f in _BF16_FLAGS) and _mkldnn_check("_is_mkldnn_bf16_supported")
        fp16 = any(flags.get(f) for f in _FP16_FLAGS) and _mkldnn_check("_is_mkldnn_fp16_supported")
        capability = torch.backends.cpu.get_cpu_capability()
        int8 = mode == "auto" and _int8_dot(flags) and _int_mm_is_exact()
        if mode != "auto":
            bf16 = fp16 = False
            onednn = onednn and mode == "avx2"
            capability = f"{capability}->AVX2" if mode == "avx2" and capability.startswith("AVX512") else capability
        amx = bf16 and bool(flags.get("amx_bf16"))
        _CACHE[mode] = CpuKernels(mode, capability, onednn, bf16, fp16, int8, amx)
    return _CACHE[mode]


_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _int8_dot(flags: dict) -> bool:
    """Whether the CPU has int8 dot-product instructions: on x86 without them ``torch._int_mm`` ran at
    2.5 GOPS on a Zen 3 (the fp32 product of the same matrices: 96 GFLOP/s), so int8 weights run as
    fp32 products there. Other architectures are left to the exactness probe."""
    if not flags or flags.get("architecture") not in ("x86_64", "AMD64", "i386", "i686"):
        return True  # an older torch without the flags, or not x86
    return any(flags.get(f) for f in _INT8_DOT_FLAGS)


def _int_mm_is_exact() -> bool:
    """Probe ``torch._int_mm`` with the products that overflow a 16-bit pairwise sum (127 x 127 with the
    sign trick of AVX2's ``vpmaddubsw``): a CPU whose kernel saturates gets the float fallback instead."""
    if not hasattr(torch, "_int_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = (torch.randint(0, 2, (32, 64), generator=g) * 254 - 127).to(torch.int8)
    b = (torch.randint(0, 2, (64, 32), generator=g) * 254 - 127).to(torch.int8)
    b[:, 0] = 127
    a[0] = 127
    try:
        got = torch._int_mm(a, b)
    except RuntimeError:
        return False
    return bool(torch.equal(got.long(), a.long() @ b.long()))


def native_dtype_support(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether ``dtype`` computes at full speed on ``device`` (GPUs: bf16 where CUDA says so)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or (dtype == torch.bfloat16 and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        k = cpu_kernels()
        return k.native_bf16 if dtype == torch.bfloat16 else k.native_fp16 if dtype == torch.float16 else False
    return dtype in (torch.float16, torch.bfloat16)  # mps, xpu: half precision is their fast path


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bf16 where the device computes it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else fp16 on
    GPUs without bf16, else fp32."""
    device = torch.device(device)
    if native_dtype_support(torch.bfloat16, device):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


_SAID: set[str] = set()


def notice(message: str) -> None:
    """Print a one-line ``note:`` to stderr, once per process for each message."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"note: {message}", file=sys.stderr)
