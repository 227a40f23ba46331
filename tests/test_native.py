"""The native decode kernels (dinollama/nn/csrc/gemv.cpp) against torch: every instruction-set path this
CPU has, the scalar one included, each weight type, odd shapes; the choice by DINOLLAMA_KERNELS; and the
fallback to torch's kernels when the extension cannot be built."""

import pytest
import torch
import torch.nn.functional as F

from dinollama.codellama import ModelArgs, QuantConfig, QuantLinear, Transformer, optimize_for_inference, quantize
from dinollama.nn import DecodeLinear, kernels, native

EXT = native.extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the native extension did not build here (see the notice)")
LEVELS = list(range(EXT.best_isa() + 1)) if EXT is not None else []
# (rows, K, N); the last ones span several 256 KB weight tiles with more rows than a pass takes (by_row_blocks:
# 4, or 8 in AVX-512's float kernels); one row of 19 outputs: 4 streams of 4 rows and 3 rows one at a time (AVX2 and AVX-512); from 17
# rows AVX2's tiled product: blocks of 6 rows (and a partial one) against panels of 16 columns (and a partial one)
SHAPES = [(1, 64, 48), (1, 96, 19), (3, 96, 17), (5, 256, 33), (8, 128, 64), (9, 32, 5), (6, 4096, 41), (13, 4096, 41),
          (17, 64, 16), (23, 96, 37), (40, 512, 70)]
QSHAPES = [(1, 128, 48), (3, 256, 17), (5, 384, 33), (8, 128, 64), (9, 512, 5), (7, 4096, 130),  # K: every group
           (17, 128, 48), (23, 384, 33), (70, 4096, 130)]  # from 17 rows: AVX-512's int8 product, panels of 32, 4 rows a pass


def activation_reference(x: torch.Tensor, q4: bool) -> torch.Tensor:
    """x as the kernel sees it: each 32-block rounded to int8 with scale amax / 127 (llama.cpp's Q8 activations)."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax as a division: Python's 127 / tensor is reciprocal() * 127, an ulp off at times, and ties then round
    # the other way
    codes = torch.round(blocks * torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax)))
    return (codes * amax / 127).reshape(m, k)


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_float_weights_equal_the_torch_product(level, shape, dtype):
    m, k, n = shape
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n, k).to(dtype)
    got = EXT.gemv(x, w, native.NO_SCALES, 0, level)
    ref = x.double() @ w.double().t()
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() < 1e-5 * k


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("shape", QSHAPES, ids=str)
@pytest.mark.parametrize("config", [QuantConfig(8, 32), QuantConfig(8, 64), QuantConfig(8, 0), QuantConfig(4, 32),
                                    QuantConfig(4, 128)], ids=lambda c: f"int{c.bits}-g{c.group_size}")
def test_quantized_weights_equal_the_integer_reference(level, shape, config):
    """Exact up to float summation order against the same rounding done in torch; within the activation
    rounding of the dequantized fp32 product."""
    m, k, n = shape
    torch.manual_seed(1)
    x, lin = torch.randn(m, k), QuantLinear.from_float(torch.randn(n, k), config)
    if config.bits == 8:
        lin.qweight[0, :32] = -128  # GGUF files may hold it; |w| is then 128, which maddubs takes unsaturated
    got = EXT.gemv(x, lin.qweight, lin.scales, 3 if config.bits == 8 else 4, level).double()
    deq = lin.dequantize().double()
    exact = activation_reference(x, config.bits == 4).double() @ deq.t()
    assert (got - exact).abs().max() <= 1e-5 * exact.abs().max()
    full = x.double() @ deq.t()
    assert (got - full).abs().max() <= 2e-2 * full.abs().max()


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_models_products_within_one_bf16_rounding(level, shape):
    """bf16 x and weights: the AVX512-BF16 dot product where the CPU has it (level avx512-vnni), else widened
    to fp32; either way the exact product rounded once to bf16."""
    m, k, n = shape
    torch.manual_seed(2)
    x, w = torch.randn(m, k).to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
    got = EXT.gemv(x, w, native.NO_SCALES, 0, level)
    ref = x.double() @ w.double().t()
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * k).all()


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_row_alone_equals_the_row_among_others(level, dtype):
    """Bit for bit: one row runs the kernels' weight streams, several rows the multi-row loops; a server's
    greedy tokens must not depend on how many sequences share the step (up to the 16 rows of a decode step)."""
    torch.manual_seed(3)
    xdtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # a bf16 model's own activations
    x, w = torch.randn(16, 1024).to(xdtype), torch.randn(4 * 67 + 5, 1024).to(dtype)
    many = EXT.gemv(x, w, native.NO_SCALES, 0, level)
    for i in (0, 7, 15):
        assert torch.equal(EXT.gemv(x[i : i + 1], w, native.NO_SCALES, 0, level)[0], many[i])


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("config,k", [(QuantConfig(8, 32), 160), (QuantConfig(8, 64), 1024), (QuantConfig(4, 32), 160),
                                      (QuantConfig(4, 128), 1024), (QuantConfig(4, 64), 192)],
                         # K = 160: the last block has no pair; 192: three pairs (AVX-512 takes two at a time)
                         ids=lambda c: f"int{c.bits}-g{c.group_size}" if isinstance(c, QuantConfig) else f"k{c}")
def test_a_quantized_row_alone_equals_the_row_among_others(level, config, k):
    torch.manual_seed(4)
    x, lin = torch.randn(16, k), QuantLinear.from_float(torch.randn(4 * 67 + 5, k), config)
    kind = 3 if config.bits == 8 else 4
    many = EXT.gemv(x, lin.qweight, lin.scales, kind, level)
    for i in (0, 7, 15):
        assert torch.equal(EXT.gemv(x[i : i + 1], lin.qweight, lin.scales, kind, level)[0], many[i])


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("k", [32, 96, 160])  # odd block counts: Q4's last block has no pair
@pytest.mark.parametrize("bits", [8, 4])
def test_odd_block_counts(level, k, bits):
    torch.manual_seed(3)
    x, lin = torch.randn(3, k), QuantLinear.from_float(torch.randn(21, k), QuantConfig(bits, 32))
    got = EXT.gemv(x, lin.qweight, lin.scales, 3 if bits == 8 else 4, level).double()
    exact = activation_reference(x, bits == 4).double() @ lin.dequantize().double().t()
    assert (got - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_input_dtypes_and_shapes_come_back():
    w = torch.randn(40, 64).to(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 1, 64).to(dtype)
        y = native.gemv(x, w)
        assert y.shape == (2, 1, 40) and y.dtype == dtype
        torch.testing.assert_close(y.float(), x.float() @ w.float().t(), rtol=2e-2, atol=2e-2)


def test_bad_arguments_raise_not_crash():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        EXT.gemv(torch.randn(1, 48), torch.randn(4, 48), native.NO_SCALES, 0, 2)
    with pytest.raises(RuntimeError, match="weight columns"):
        EXT.gemv(x, torch.randn(4, 32), native.NO_SCALES, 0, 2)
    with pytest.raises(RuntimeError, match="int8"):
        EXT.gemv(x, torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2, dtype=torch.half), 3, 2)
    with pytest.raises(RuntimeError, match="scales"):
        EXT.gemv(x, torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3, dtype=torch.half), 3, 2)


@pytest.mark.parametrize("mode", ["auto", "avx2", "generic"])
def test_the_mode_picks_the_path(mode, monkeypatch):
    monkeypatch.setenv(kernels.ENV, mode)
    cap = torch.backends.cpu.get_cpu_capability()  # ATEN_CPU_CAPABILITY=avx2 emulates an AVX2-only CPU
    best = min(EXT.best_isa(), 2 if cap.startswith("AVX512") else 1 if cap == "AVX2" else 0)
    assert native.isa() == {"auto": native.ISAS[best], "avx2": native.ISAS[min(1, best)], "generic": "off"}[mode]
    q = QuantLinear.from_float(torch.randn(48, 256), QuantConfig(8, 32))
    # without native bf16 the other path widens the weight to fp32, so the native kernel takes prompts too
    widened = not kernels.native_dtype_support(torch.bfloat16) and native.simd()
    limit = native.WIDENED_ROWS if widened else native.MAX_ROWS_F32
    few, many = torch.randn(limit, 256), torch.randn(limit + 1, 256)
    assert q.kernel(few) == ("generic" if mode == "generic" else "native")
    # prefill of grouped int8: AVX-512 VNNI's int8 product, else dequantize + F.linear
    gemm = mode != "generic" and native.int8_gemm()
    assert gemm == (native.isa() == "avx512-vnni" and not kernels.cpu_kernels().amx)
    assert q.kernel(many) == ("native" if gemm else "generic")
    bf16 = torch.randn(native.WIDENED_ROWS + 1, 256, dtype=torch.bfloat16)
    limit = native.WIDENED_ROWS if widened else native.max_rows(bf16)  # AMX/oneDNN products beyond 8 bf16 rows
    bf16 = bf16[: limit + 1]
    assert q.kernel(bf16[:limit]) == q.kernel(few) and (q.kernel(bf16) == "native") == gemm
    assert native.isa() in kernels.cpu_kernels().describe()


@pytest.mark.parametrize("amx", [True, False])
def test_16_bit_decode_rows_stay_native_without_amx(amx, monkeypatch):
    """With AMX oneDNN's bf16 products win from 9 rows; with AVX512-BF16 alone (Zen 4) the native rows do. Quantized
    prompts likewise keep the dequantized copy on AMX tiles there, and take the VNNI int8 product without AMX."""
    from dataclasses import replace

    k = replace(kernels.cpu_kernels(), native_bf16=True, amx=amx)
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: k)
    monkeypatch.setattr(native, "cpu_kernels", lambda: k)
    assert native.max_rows(torch.zeros(1, 32, dtype=torch.bfloat16)) == (8 if amx else 16)
    assert native.max_rows(torch.zeros(1, 32)) == 16
    assert native.int8_gemm() == (native.isa() == "avx512-vnni" and not amx)


@pytest.mark.parametrize("mode", ["auto", "avx2", "generic"])
def test_optimized_model_decodes_as_the_plain_one(mode, monkeypatch):
    """Greedy decode through DecodeLinear / native QuantLinear equals the unoptimized model's logits."""
    monkeypatch.setenv(kernels.ENV, mode)
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    for scheme in (None, "int8", "int4"):
        plain = Transformer(args).eval()
        if scheme:
            quantize(plain, scheme, head=True)
        fast = Transformer(args).eval()
        if scheme:
            quantize(fast, scheme, head=True)
        fast.load_state_dict(plain.state_dict())
        optimize_for_inference(fast)
        assert any(isinstance(mod, DecodeLinear) for mod in fast.modules()) == (mode != "generic" and scheme is None)
        tokens = torch.randint(0, 96, (1, 12))
        with torch.inference_mode():
            ref = plain(tokens, 0)
            got = torch.cat([fast(tokens[:, :8], 0)] + [fast(tokens[:, i : i + 1], i) for i in range(8, 12)], 1)
        tol = 1e-4 if scheme is None or mode == "generic" else 5e-2  # int8 activations on the native path
        assert (got - ref).abs().max() <= tol * ref.abs().max(), scheme


def test_without_the_extension_torch_kernels_run_after_a_notice(monkeypatch, capsys, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv(kernels.ENV, "auto")  # the suite may run with the generic path forced, which never builds
    monkeypatch.setattr(native, "_EXT", [])
    monkeypatch.setattr(native, "_LEVEL", {})
    monkeypatch.setattr(native, "_build_dir", lambda: tmp_path)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert native.isa() == "off"
    err = capsys.readouterr().err
    assert "native decode kernels unavailable (RuntimeError: Ninja is required" in err and "using torch's kernels" in err
    q = QuantLinear.from_float(torch.randn(48, 256), QuantConfig(8, 32))
    x = torch.randn(1, 256)
    assert q.kernel(x) == "generic"
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize()))
    lin = torch.nn.Linear(256, 48, bias=False)
    torch.testing.assert_close(DecodeLinear(lin)(x), lin(x))


@pytest.mark.parametrize("mode", ["auto", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prefill_widens_a_16_bit_weight_the_cpu_lacks(mode, dtype, monkeypatch):
    """A 16-bit DecodeLinear without native support runs the native kernel (widening in registers) up to
    WIDENED_ROWS rows (on AVX2 any number, tiled), beyond them its product in fp32 (torch's emulated 16-bit GEMM
    is slower); with native support it stays 16-bit from max_rows; the results agree."""
    from dinollama.nn import fast as nn_fast

    monkeypatch.setenv(kernels.ENV, mode)
    lin = torch.nn.Linear(96, 40, bias=False).to(dtype)
    layer = DecodeLinear(lin)
    seen = []
    linear = F.linear
    monkeypatch.setattr(nn_fast.F, "linear", lambda x, w, *a: seen.append(w.dtype) or linear(x, w, *a))
    widened = not kernels.native_dtype_support(dtype)
    native_on = native.simd()  # the plain C++ loops take no prompts
    ref_w = lin.weight.double()
    beyond = [] if widened and native.tiled() else [torch.float32 if widened else dtype]  # AVX2: the tiled product
    for rows, expect in ((native.WIDENED_ROWS + 3, beyond),
                         (native.WIDENED_ROWS, [] if widened and native_on else [torch.float32 if widened else dtype]),
                         (nn_fast.UPCAST_ROWS - 1, [] if widened and native_on else [dtype])):
        x = torch.randn(rows, 96).to(dtype)
        seen.clear()
        with torch.inference_mode():
            got = layer(x)
        assert seen == expect and got.dtype == dtype, rows
        ref = F.linear(x.double(), ref_w)
        assert (got.double() - ref).abs().max() <= 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert widened or mode == "auto"  # the forced modes behave as a CPU without native 16-bit products


@pytest.mark.parametrize("mode", ["auto", "avx2", "generic"])
def test_f32_prompts_take_the_tiled_product_on_avx2(mode, monkeypatch):
    """On AVX2 an f32 DecodeLinear runs prompts of any length natively (tiled), elsewhere F.linear past max_rows."""
    from dinollama.nn import fast as nn_fast

    monkeypatch.setenv(kernels.ENV, mode)
    lin = torch.nn.Linear(160, 45, bias=False)
    seen = []
    linear = F.linear
    monkeypatch.setattr(nn_fast.F, "linear", lambda x, w, *a: seen.append(w.dtype) or linear(x, w, *a))
    x = torch.randn(3, 70, 160)
    with torch.inference_mode():
        got = DecodeLinear(lin)(x)
    assert seen == ([] if native.tiled() else [torch.float32])
    assert native.tiled() == (native.isa() == "avx2" or (native.isa() == "avx512-vnni" and EXT.is_amd()))
    ref = F.linear(x.double(), lin.weight.double())
    assert (got.double() - ref).abs().max() < 1e-5 * 160


# --- the fused decode-step ops against the torch ops they replace ---------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rmsnorm_silu_mul_and_rope_equal_the_torch_ops(dtype):
    from dinollama.nn import RMSNorm, apply_rotary_emb, precompute_freqs_cis

    torch.manual_seed(0)
    norm = RMSNorm(96).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x = torch.randn(3, 1, 96).to(dtype)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # summation order, exp
    with torch.no_grad():
        ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype) * norm.weight
        for level in LEVELS:  # f16 rows convert with F16C from AVX2 on
            torch.testing.assert_close(EXT.rmsnorm(x, norm.weight, norm.eps, level), ref, rtol=ulp, atol=0)
    gu = torch.randn(2, 1, 64).to(dtype) * 6  # both signs, and tails where sigmoid saturates
    gate, up = gu.chunk(2, -1)
    for level in LEVELS:  # std::exp, and the vectorized exp of the AVX2 path
        torch.testing.assert_close(EXT.silu_mul(gu, level), F.silu(gate) * up, rtol=ulp, atol=1e-7)
    heads, kv, d, t = 4, 2, 16, 3
    qkv = torch.randn(t, (heads + 2 * kv) * d).to(dtype)
    freqs = precompute_freqs_cis(d, 50, 1e6)[[5, 9, 20]]
    q, k = qkv[:, : heads * d].view(1, t, heads, d), qkv[:, heads * d : (heads + kv) * d].view(1, t, kv, d)
    close = dict(rtol=ulp, atol=1e-6)
    for level in LEVELS:
        rotated = qkv.clone()
        EXT.rope_qk_(rotated, heads + kv, d, torch.view_as_real(freqs).contiguous(), level)
        torch.testing.assert_close(rotated[:, : heads * d], apply_rotary_emb(q, freqs).reshape(t, -1), **close)
        torch.testing.assert_close(rotated[:, heads * d : (heads + kv) * d], apply_rotary_emb(k, freqs).reshape(t, -1),
                                   **close)
        assert torch.equal(rotated[:, (heads + kv) * d :], qkv[:, (heads + kv) * d :])  # v untouched


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 24, 48, 128], ids=["d16", "d24", "d48", "d128"])  # d24: the vector path's generic twin
def test_decode_attention_equals_sdpa_per_row(level, dtype, d):
    torch.manual_seed(0)
    heads, kv, rows, length = 4, 2, 4, 40
    k, v = torch.randn(rows, kv, length, d).to(dtype), torch.randn(rows, kv, length, d).to(dtype)
    q = torch.randn(3, heads, d).to(dtype)
    lengths = torch.tensor([5, 40, 17])
    got = EXT.decode_attention(q, k, v, lengths, 1, level)
    for i in range(3):
        keys = k[1 + i, :, : lengths[i]].float().repeat_interleave(heads // kv, 0)
        vals = v[1 + i, :, : lengths[i]].float().repeat_interleave(heads // kv, 0)
        ref = F.scaled_dot_product_attention(q[i].float()[:, None], keys, vals)[:, 0].reshape(-1)
        assert (got[i].float() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(RuntimeError, match="length is out of the cache"):
        EXT.decode_attention(q, k, v, torch.tensor([5, 41, 1]), 0, level)


def test_a_serving_step_equals_the_torch_path(monkeypatch):
    """Transformer.step of decode rows at different positions: native ops (auto) == torch ops (generic)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    model = optimize_for_inference(Transformer(args).eval())
    prompts = [torch.randint(0, 96, (n,)) for n in (5, 9, 3)]
    results = {}
    for mode in ("auto", "generic"):
        monkeypatch.setenv(kernels.ENV, mode)
        model.setup_cache(3, 32)
        with torch.inference_mode():
            model.step(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                       [(p, 0, row) for row, p in enumerate(prompts)])
            positions = torch.tensor([len(p) for p in prompts])
            results[mode] = [model.step(torch.tensor([7, 8, 9]) + i, positions + i, [])[0] for i in range(3)]
    for a, b in zip(results["auto"], results["generic"]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("mode", ["auto", "avx2"])
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_the_fused_decode_step_equals_the_layers_one_by_one(mode, scheme, monkeypatch):
    """decode_layers (its own row buffers, products, norms, RoPE, cache writes, attention) against the same model's
    layers as torch modules over the same native products and attention: a bf16 model, bit for bit, rows at
    different positions, grouped-query heads."""
    monkeypatch.setenv(kernels.ENV, mode)
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    model = Transformer(args).eval()
    if scheme:
        quantize(model, scheme, head=True)
    model = optimize_for_inference(model.to(torch.bfloat16))
    tokens = torch.randint(0, 96, (3, 12))
    results = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Transformer, "_native_decode", lambda *a: None)
        model.setup_cache(3, 32)
        with torch.inference_mode():
            model.step(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                       [(tokens[r, : 5 + r], 0, r) for r in range(3)])
            positions = torch.tensor([5, 6, 7])
            results[fused] = [model.step(tokens[:, 8 + i], positions + i, [])[0] for i in range(3)]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def test_a_stale_build_lock_is_removed(monkeypatch, tmp_path, capsys):
    """A first build killed half-way leaves torch's lock file behind, and every later load would wait on it."""
    import os
    import time

    from torch.utils import cpp_extension

    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    monkeypatch.setattr(native, "_build_dir", lambda: tmp_path)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: "built")
    assert native._load() == "built" and not lock.exists()
    assert "removing a stale build lock" in capsys.readouterr().err


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("shape", [(1, 24), (33, 40), (5, 45), (257, 384)], ids=str)  # 45: the 8-lane tails
def test_int8_row_quantization_and_epilogue_equal_the_torch_ops(level, shape):
    """The passes around torch._int_mm (vision's Int8Linear): codes and scales bit for bit, the
    dequantized product with bias and residual bit for bit, the GELU within its erf polynomial."""
    torch.manual_seed(0)
    m, n = shape
    x = torch.randn(m, n) * 4
    x[0] = 0.0  # an all-zero row: the scale's floor, codes 0
    q, scale = EXT.quantize_rows(x, level)
    ref_scale = (x.abs().amax(1, keepdim=True) / 127.0).clamp_min(1e-12)
    assert torch.equal(scale, ref_scale) and torch.equal(q, (x / ref_scale).round().to(torch.int8))
    acc = torch.randint(-(2**20), 2**20, (m, n), dtype=torch.int32)
    ws, bias, res = torch.rand(n) * 1e-3, torch.randn(n), torch.randn(m, n)
    plain = acc.float().mul_(scale).mul_(ws) + bias
    none = torch.empty(0)
    assert torch.equal(EXT.int8_epilogue(acc, scale, ws, bias, False, res, level), res + plain)
    assert torch.equal(EXT.int8_epilogue(acc, scale, ws, none, False, none, level), acc.float().mul_(scale).mul_(ws))
    torch.testing.assert_close(EXT.int8_epilogue(acc, scale, ws, bias, True, none, level), F.gelu(plain),
                               atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(EXT.int8_epilogue(acc, scale, ws, none, True, res, level),
                               res + F.gelu(acc.float().mul_(scale).mul_(ws)), atol=2e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="int8_epilogue"):
        EXT.int8_epilogue(acc, scale, ws[:-1], bias, False, none, level)


@pytest.mark.parametrize("mode", ["auto", "generic"])
def test_int8_vit_blocks_run_the_native_passes_and_equal_the_torch_path(mode, monkeypatch):
    from dinollama.dinov2 import build
    from dinollama.dinov2 import optimize_for_inference as optimize_vit

    torch.manual_seed(0)
    model = optimize_vit(build("dinov2_vits14", depth=2, img_size=56).eval(), dtype=torch.int8)
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        monkeypatch.setenv(kernels.ENV, "generic")
        ref = model(x)
        monkeypatch.setenv(kernels.ENV, mode)
        assert native.runs(x) == (mode == "auto")
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


def test_a_native_call_lets_other_threads_run():
    """The server streams tokens from other threads while a step runs: the kernels must not hold the GIL."""
    import threading
    import time

    x, w = torch.randn(16, 4096), torch.randn(2048, 4096)
    start = time.perf_counter()
    EXT.gemv(x, w, native.NO_SCALES, 0, 0)  # the scalar path: slow enough to see
    alone = time.perf_counter() - start
    worker = threading.Thread(target=EXT.gemv, args=(x, w, native.NO_SCALES, 0, 0))
    gaps, last = [], time.perf_counter()
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    assert alone > 0.02 and len(gaps) > 100  # holding the GIL, this thread would not run until the call returned
    assert max(gaps) < alone / 2


DEQUANT = [(QuantConfig(8, 32), 256), (QuantConfig(8, 0), 100), (QuantConfig(4, 32), 96), (QuantConfig(4, 32, False), 256),
           (QuantConfig(4, 64), 128), (QuantConfig(4, 128, False), 384)]


@pytest.mark.parametrize("level", LEVELS, ids=lambda i: native.ISAS[i])
@pytest.mark.parametrize("config,k", DEQUANT, ids=lambda c: str(c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_equals_the_torch_ops(level, config, k, dtype):
    """Prefill's one-pass dequantized copy: bit for bit what torch's codes * scales (+ mins) gives."""
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(37, k) * 3, config)
    ref = q.dequantize(dtype)  # autograd on: torch's ops
    mins = q.mins if config.bits == 4 else native.NO_SCALES
    got = EXT.dequantize(q.qweight, q.scales, native.NO_SCALES if mins is None else mins, config.bits == 4,
                         {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype], level)
    assert got.dtype == dtype and torch.equal(got, ref)
    with torch.inference_mode():
        assert torch.equal(q.dequantize(dtype), ref)  # the module's own choice of the native pass


def test_int4_prefill_takes_the_dequantized_product_from_16_rows():
    q = QuantLinear.from_float(torch.randn(64, 256), QuantConfig(4, 32))
    if kernels.cpu_kernels().mode == "generic":  # forced: every product dequantizes, whatever the rows
        assert q.kernel(torch.randn(9, 256, dtype=torch.bfloat16)) == "generic"
        return
    with torch.inference_mode():
        few, many = torch.randn(9, 256, dtype=torch.bfloat16), torch.randn(16, 256, dtype=torch.bfloat16)
        widened = not kernels.native_dtype_support(torch.bfloat16) and native.simd()  # native takes prompts
        rows = native.max_rows(few)  # 16 without AMX, where the native rows beat oneDNN's up to there
        native_few, native_many = widened or rows >= 9, widened or rows >= 16
        assert q.kernel(few) == ("native" if native_few else "int4pack")
        assert q.kernel(many) == ("native" if native_many else "generic")
        ref = F.linear(many.float(), q.dequantize()).bfloat16()
        assert (q(many).float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    # with autograd on, torch's slower dequantize: its int4 kernel up to 128 rows
    assert q.kernel(many) == ("native" if native_many else "int4pack")
