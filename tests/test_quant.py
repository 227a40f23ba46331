"""Weight-only int8/int4 Code Llama linears: every scheme and kernel against the dequantized product,
bytes per weight, save/load, the fast path, and perplexity against bf16."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dinollama.codellama import (ModelArgs, QuantConfig, QuantLinear, Transformer, load, optimize_for_inference,
                                 quantize, save_native)
from dinollama.codellama.checkpoint import default_model_dir
from dinollama.nn import kernels, native

SCHEMES = [QuantConfig(8, 0), QuantConfig(8, 32), QuantConfig(4, 32), QuantConfig(4, 64), QuantConfig(4, 128),
           QuantConfig(4, 32, symmetric=False)]


@pytest.mark.parametrize("config", SCHEMES, ids=lambda c: f"int{c.bits}-g{c.group_size}-{'sym' if c.symmetric else 'asym'}")
@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, the int4 kernel's tile
@pytest.mark.parametrize("mode", ["auto", "generic"])
def test_quant_linear_equals_the_dequantized_product(config, out_features, mode, monkeypatch):
    monkeypatch.setenv(kernels.ENV, mode)
    torch.manual_seed(0)
    w = torch.randn(out_features, 256)
    q = QuantLinear.from_float(w, config)
    deq = q.dequantize()
    step = (w.abs().amax() / (127 if config.bits == 8 else 7)).item()
    assert (deq - w).abs().max() <= step  # rounding to the nearest level of its group
    # without native bf16 the native kernel (int8 activations, as llama.cpp's) takes prompts too, and so does
    # AVX-512 VNNI's int8 matrix product
    widened = (mode == "auto" and config.symmetric and (native.int8_gemm() or (
        not kernels.native_dtype_support(torch.bfloat16) and native.simd())))
    for dtype, tol in ((torch.float32, 2e-2 if widened else 1e-4), (torch.bfloat16, 2e-2)):
        x = torch.randn(3, 6, 256).to(dtype)  # 18 rows: more than the native decode products take
        got = q(x)
        ref = F.linear(x.float(), deq)
        assert got.shape == (3, 6, out_features) and got.dtype == dtype
        assert (got.float() - ref).abs().max() <= tol * ref.abs().max(), q.kernel(x)
    expected = "generic" if mode == "generic" else "native" if widened else (
        "int8pack" if config.bits == 8 and config.group_size == 0 else
        "int4pack" if config.bits == 4 and out_features % 16 == 0 else "generic")
    assert q.kernel(x) == expected  # 18 bf16 rows
    per_channel_int8 = mode == "auto" and config.bits == 8 and config.group_size == 0
    gemm = mode == "auto" and config.symmetric and native.int8_gemm()
    assert q.kernel(torch.randn(200, 256, dtype=torch.bfloat16)) == (
        "native" if gemm else "int8pack" if per_channel_int8 else "generic")


@pytest.mark.parametrize("config", [QuantConfig(8, 32), QuantConfig(4, 32), QuantConfig(4, 64, symmetric=False)],
                         ids=["q8", "q4", "q4-asym"])
def test_a_16_bit_prefill_without_native_support_computes_in_fp32(config, monkeypatch):
    """On an AVX2-only CPU torch emulates bf16 GEMMs (q8_0 prefill at 0.25x llama.cpp): the generic
    kernel widens the activations and takes the fp32 dequantized product, then rounds once to bf16."""
    monkeypatch.setenv(kernels.ENV, "avx2")  # native_bf16 off, as on Zen 3
    torch.manual_seed(0)
    q = QuantLinear.from_float(torch.randn(96, 256), config)
    x = torch.randn(200, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert q.kernel(x) == "generic"
        assert torch.equal(q(x), F.linear(x.float(), q.dequantize(torch.float32)).to(torch.bfloat16))


def test_a_dtype_cast_keeps_the_format():
    """model.to(bf16) moves nothing of a quantized linear: its codes and fp16 scales are the format."""
    q = QuantLinear.from_float(torch.randn(48, 256), QuantConfig(4, 32, symmetric=False))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.bfloat16)
    for k, v in q.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_bytes_per_weight():
    w = torch.randn(256, 4096)
    assert QuantLinear.from_float(w, QuantConfig(8, 32)).nbytes / w.numel() == pytest.approx(1.0625)
    assert QuantLinear.from_float(w, QuantConfig(4, 32)).nbytes / w.numel() == pytest.approx(0.5625)
    assert QuantLinear.from_float(w, QuantConfig(4, 32, False)).nbytes / w.numel() == pytest.approx(0.625)


def test_bad_schemes_are_refused():
    with pytest.raises(ValueError, match="group_size must be"):
        QuantConfig(4, 48)
    with pytest.raises(ValueError, match="int4 needs groups"):
        QuantConfig(4, 0)
    with pytest.raises(ValueError, match="'int8' or 'int4'"):
        quantize(Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=50, multiple_of=32)), "int3")


def _perplexity(model, ids):
    with torch.inference_mode():
        logits = model.forward_train(ids[:, :-1]).float()
    return math.exp(F.cross_entropy(logits[0], ids[0, 1:]).item())


@pytest.mark.parametrize("scheme,tol", [("int8", 0.01), ("int4", 0.05)])
def test_quantized_model_runs_saves_loads_and_keeps_perplexity(scheme, tol, tmp_path):
    ref, tok = load("default", dtype=torch.bfloat16)
    snippets = json.loads((default_model_dir() / "heldout_snippets.json").read_text())
    text = "\n".join(s["prefix"] + s["middle"] + s["suffix"] for s in snippets)
    ids = torch.tensor([tok.encode(text, True, False)[:512]])
    base = _perplexity(ref, ids)
    model, _ = load("default", dtype=torch.bfloat16)
    quantize(model, scheme, group_size=32)
    ppl = _perplexity(model, ids)
    assert abs(ppl - base) / base < tol, (ppl, base)
    folder = save_native(model, tmp_path / "q", tok)
    again, _ = load(folder, dtype=torch.bfloat16)
    assert isinstance(again.layers[0].attention.wq, QuantLinear)
    assert _perplexity(again, ids) == pytest.approx(ppl, rel=1e-6)
    with torch.inference_mode():
        plain = again(ids[:, :40], 0)
        fast = optimize_for_inference(again)(ids[:, :40], 0)
    assert (fast - plain).abs().max() < 0.05 * plain.abs().max()


def test_random_134m_model_perplexity_in_int8_and_int4():
    torch.manual_seed(0)
    args = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32016, multiple_of=256, rope_theta=1e6, max_seq_len=512)
    model = Transformer(args).to(torch.bfloat16).eval()
    ids = torch.randint(3, 32016, (1, 256), generator=torch.Generator().manual_seed(1))
    base = _perplexity(model, ids)
    sd = model.state_dict()
    for scheme, tol in (("int8", 0.01), ("int4", 0.05)):
        q = Transformer(args).to(torch.bfloat16).eval()
        q.load_state_dict(sd)
        quantize(q, scheme)
        assert abs(_perplexity(q, ids) - base) / base < tol, scheme
