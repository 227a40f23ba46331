"""The native decode kernels (``csrc/gemv.cpp``): built once per torch version, loaded on first use.

Batch-1 decoding is a chain of matrix-vector products bound by the bytes of weight read. torch has
no int8-in-groups product at all (Q8_0 ran at 0.07x llama.cpp) and its 16-bit and int4 products
reach half of the bandwidth or less at one row, so a small C++ extension does those rows. It is
compiled with ``torch.utils.cpp_extension`` (``make test`` builds it during the install:
``native.describe()`` loads it) into ``$DINOLLAMA_CACHE`` or ``~/.cache/dinollama``. Its
instruction set is picked at run time (AVX-512 VNNI, AVX2+FMA, or plain C++); where it cannot be
built the torch kernels run instead, after a one-line notice.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from .kernels import cpu_kernels, native_dtype_support, notice

ISAS = ("scalar", "avx2", "avx512-vnni")  # the extension's levels, in its numbering
STALE_LOCK_S = 600  # a build takes ~30 s; a lock older than this is left over
MAX_ROWS = 8  # bf16/f16 rows on AMX CPUs: beyond this oneDNN's AMX matrix products are faster (Sapphire Rapids)
MAX_ROWS_F32 = 16  # f32 rows: the tiled native product matches MKL's at 16 rows, and the fused step saves Python
# rows whose weights would otherwise be widened to fp32 per call: on a Zen 3 (2 threads, 134M shapes) 64 rows of
# a 4096 x 768 product took 3.0-3.9 ms native against 6.3 widened from f16 (Q8 3.2-4.0 vs 7.9, Q4 2.3-3.5 vs 13.2)
WIDENED_ROWS = 128
# from here float weights on AVX2 run the extension's tiled product (csrc kTiledRows): at 64 rows of the 134M shapes
# on a Zen 3 it ran 1.2-1.5x MKL's f32 GEMM (which uses no tiled AVX2 code on AMD) and 1.9x the widened 16-bit one
TILED_ROWS = MAX_ROWS_F32 + 1
_SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
_EXT: list = []  # [module or None], once loaded or failed


def _build_dir() -> Path:
    root = Path(os.environ.get("DINOLLAMA_CACHE") or Path.home() / ".cache" / "dinollama")
    tag = torch.__version__.replace("+", "_")
    return root / "ext" / f"gemv-torch{tag}-py{sys.version_info[0]}{sys.version_info[1]}"


def extension():
    """The compiled module, or ``None`` (with a notice) where it cannot be built or loaded."""
    if not _EXT:
        _EXT.append(_load())
    return _EXT[0]


def _ninja_on_path() -> None:
    """torch builds with ninja from PATH; the ``ninja`` package puts its binary next to this Python,
    which is not on PATH when the venv is not activated (``make test`` runs ``.venv/bin/python``)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load():
    from torch.utils import cpp_extension

    _ninja_on_path()
    folder = _build_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"  # torch's build lock; one left by a killed build makes every load wait forever
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            notice(f"removing a stale build lock {lock} (a build was interrupted)")
            lock.unlink(missing_ok=True)
        if not any(folder.glob("*.so")):
            print("note: building dinollama's native decode kernels (once per torch version, ~30 s)", file=sys.stderr)
        return cpp_extension.load("dinollama_gemv", [str(_SOURCE)], build_directory=str(folder),
                                  extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, an unwritable cache, a failed build: torch's kernels still work
        first = " ".join(str(e).split())[:160]
        notice(f"native decode kernels unavailable ({type(e).__name__}: {first}); using torch's kernels")
        return None


_LEVEL: dict[str, int] = {}  # per DINOLLAMA_KERNELS mode: -1 off, else an index of ISAS


def _level() -> int:
    kernels = cpu_kernels()
    if kernels.mode not in _LEVEL:
        ext = extension() if kernels.mode != "generic" else None
        best = ext.best_isa() if ext is not None else -1
        # torch limited to AVX2 (ATEN_CPU_CAPABILITY, or an AVX2-only CPU) or to DEFAULT limits these too
        cap = kernels.capability.upper()
        ceiling = 2 if cap.startswith("AVX512") and kernels.mode != "avx2" else 1 if "AVX2" in cap else 0
        _LEVEL[kernels.mode] = min(best, ceiling)
    return _LEVEL[kernels.mode]


def isa() -> str:
    """The instruction set the native kernels use here: ``avx512-vnni``, ``avx2``, ``scalar``, or ``off``.

    ``DINOLLAMA_KERNELS=generic`` turns them off and ``avx2`` caps them at AVX2 (the path of AMD Zen 3
    and most laptops), so both fallbacks can be tested on an AVX-512 machine; so does torch's own
    ``ATEN_CPU_CAPABILITY=avx2`` (``default``: the plain C++ loops).
    """
    level = _level()
    return ISAS[level] if level >= 0 else "off"


def simd() -> bool:
    """Whether the native kernels run a vector path here (AVX2 or AVX-512), not the plain C++ loops."""
    return _level() >= 1


def describe() -> str:
    """:func:`isa`, and whether bf16 models' products use AVX512-BF16's bf16 dot product."""
    level = isa()
    return level + (" (+bf16 dot)" if level == "avx512-vnni" and _EXT[0].has_bf16_dot() else "")


def max_rows(x: Tensor) -> int:
    """The most rows of ``x`` the native products take: :data:`MAX_ROWS` in a 16-bit dtype the CPU multiplies on
    AMX tiles (oneDNN's products are faster beyond), else :data:`MAX_ROWS_F32`. Without AMX more rows stay native:
    on a Zen 3 (emulated bf16) torch's per-layer ops made a 16-stream server's decode steps slower than its
    8-stream ones, and on a Zen 4 (AVX512-BF16) a 16-row bf16 step took 20-25 ms fused against 43 ms in torch's
    per-layer ops (9-16-row bf16 products: native 0.9-1.3x the speed of oneDNN's)."""
    if x.dtype != torch.float32 and native_dtype_support(x.dtype) and cpu_kernels().amx:
        return MAX_ROWS
    return MAX_ROWS_F32


def tiled() -> bool:
    """Whether prompts against float weights run the native tiled product: on AVX2, and on AMD's AVX-512 CPUs
    (Zen 4/5), where MKL runs its AVX2 code; Intel's AVX-512 machines keep oneDNN/MKL, which reach their peak."""
    return _level() == 1 or (_level() == 2 and _EXT[0].is_amd())


def int8_gemm() -> bool:
    """Whether Q8/Q4 prompts (17 rows or more) run the extension's int8 matrix product (AVX-512 VNNI): at 64 and 512
    rows of the 134M shapes on a Zen 4 it ran 1.8-3x a dequantized bf16 copy through oneDNN (csrc quant_gemm_vnni).
    Not on AMX CPUs, where that copy runs on AMX tiles (several times VNNI's rate; not measured against it here)."""
    return _level() == 2 and not cpu_kernels().amx


def usable(x: Tensor, widened: bool = False, float_weight: bool = False, quantized: bool = False) -> bool:
    """Whether the native product takes ``x`` (CPU, at most :func:`max_rows` rows, ``K % 32 == 0``).

    ``widened``: the caller's other path widens its weight to fp32 first (Q8/Q4 codes, or 16-bit
    weights the CPU has no product for); then the native kernels, which widen in registers, take up
    to :data:`WIDENED_ROWS` rows (prompts of a typical edit) where they are vectorized (:func:`simd`).
    ``float_weight`` (f32/bf16/f16): where :func:`tiled`, f32 and widened prompts of any length.
    ``quantized`` (Q8/Q4 codes): where :func:`int8_gemm`, prompts of any length."""
    if x.device.type != "cpu" or x.shape[-1] % 32 or _level() < 0:
        return False
    if float_weight and (x.dtype == torch.float32 or widened) and tiled():
        return True
    if quantized and int8_gemm():
        return True
    rows = WIDENED_ROWS if widened and simd() else max_rows(x)
    return x.numel() <= rows * x.shape[-1]


def gemv(x: Tensor, weight: Tensor, scales: Tensor | None = None, kind: str = "float") -> Tensor:
    """``x @ W.T`` for a few rows of ``x``; ``kind`` ``float`` (f32/bf16/f16 weight), ``q8`` or ``q4``
    (codes and fp16 group scales as :class:`~dinollama.codellama.quant.QuantLinear` keeps them)."""
    return _EXT[0].gemv(x, weight, NO_SCALES if scales is None else scales, _KINDS[kind], _level())


def runs(x: Tensor) -> bool:
    """Whether the native ops take ``x`` at all: CPU inference (no autograd), the extension loaded."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and _level() >= 0


def fusable(x: Tensor) -> bool:
    """Whether the fused decode step takes ``x``: :func:`runs`, at most :func:`max_rows` rows."""
    return x.numel() <= max_rows(x) * x.shape[-1] and runs(x)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, row0: int = 0) -> Tensor:
    """One query per row, ``q`` ``(n, H, d)``, against cache rows ``row0..`` of ``k``/``v`` ``(B, Hkv, L, d)``
    holding ``lengths[i]`` keys each: ``(n, H * d)`` in q's dtype, fp32 inside, GQA without copies."""
    return _EXT[0].decode_attention(q, k, v, lengths, row0, _level())


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 codes of a contiguous float32 ``(M, K)`` and their ``(M, 1)`` scales, in one pass."""
    return tuple(_EXT[0].quantize_rows(x, _level()))


def int8_epilogue(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Tensor | None, gelu: bool,
                  residual: Tensor | None) -> Tensor:
    """``gelu?(acc * x_scale * w_scale + bias) (+ residual)`` for int32 products ``acc`` ``(M, N)``, in one pass."""
    residual = NO_FLOATS if residual is None else residual.reshape(acc.shape).contiguous()
    return _EXT[0].int8_epilogue(acc, x_scale, w_scale, NO_FLOATS if bias is None else bias, gelu, residual, _level())


def dequantize(codes: Tensor, scales: Tensor, mins: Tensor | None, bits: int, dtype: torch.dtype) -> Tensor:
    """Q8 / Q4 codes and fp16 group scales (and Q4_1 mins) as a ``dtype`` matrix, in one pass:
    torch's ``codes * scales`` with the same rounding, without its full-size fp32 temporaries."""
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    return _EXT[0].dequantize(codes, scales, NO_SCALES if mins is None else mins, bits == 4, kind, _level())


def decode_layers(h: Tensor, tensors: list[Tensor], kinds: list[int], positions: Tensor, row0: int,
                  freqs_cis: Tensor, n_heads: int, n_kv: int, eps: float) -> Tensor:
    """Every layer of a decode step in one call (12 tensors and 4 weight kinds a layer, see
    ``csrc/gemv.cpp``): row ``i`` of ``h`` ``(n, dim)`` at ``positions[i]`` of cache row ``row0 + i``."""
    rot = torch.view_as_real(freqs_cis).contiguous()
    return _EXT[0].decode_layers(h, tensors, kinds, positions, row0, rot, n_heads, n_kv, eps, _level())


_KINDS = {"float": 0, "q8": 3, "q4": 4}
NO_SCALES = torch.empty(0, 1, dtype=torch.float16)  # what a float weight passes as its scales
NO_FLOATS = torch.empty(0)  # an absent bias or residual

