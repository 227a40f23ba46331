"""The int8 vision path: each linear against the dequantized product, and the shipped backbone's
k-NN accuracy and feature cosine against fp32."""

import pytest
import torch
import torch.nn.functional as F

from dinollama.dinov2.train.data import ArraySource
from dinollama.data.mnist import load_fashion_mnist
from dinollama.dinov2 import build, load, optimize_for_inference
from dinollama.dinov2.train.monitor import embed_source
from dinollama.dinov2.eval import knn_predict
from dinollama.nn import kernels
from dinollama.nn.fast import Int8Linear


@pytest.mark.parametrize("shape", [(1, 7, 24, 40), (3, 5, 33, 17)])
def test_int8_linear_equals_the_dequantized_product(shape):
    torch.manual_seed(0)
    b, t, k, n = shape
    lin, gamma = torch.nn.Linear(k, n), torch.rand(n) + 0.5
    x, res = torch.randn(b, t, k), torch.randn(b, t, n)
    q = Int8Linear(lin, scale=gamma)
    w = q.weight.t().float() * q.weight_scale[:, None] if q.exact_int8 else q.weight  # what the int8 weights stand for
    xs = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / xs).round() * xs if q.exact_int8 else x  # activations are int8 only on the int8 kernel
    ref = res + F.linear(xq, w, q.bias)
    torch.testing.assert_close(q(x, residual=res), ref, atol=1e-4, rtol=1e-4)
    plain = res + gamma * lin(x)
    assert (q(x, residual=res) - plain).abs().max() < 0.05 * plain.abs().max()  # int8 rounding only
    torch.testing.assert_close(Int8Linear(lin, activation="gelu")(x), F.gelu(Int8Linear(lin)(x)))


def test_int8_matmul_probe_matches_the_kernel(monkeypatch):
    """The probe decides the kernel: exact products where it says so; the fallback when forced."""
    a = torch.full((17, 64), 127, dtype=torch.int8)
    b = torch.full((64, 8), -127, dtype=torch.int8)
    if kernels.cpu_kernels().int8_matmul:
        assert torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())
    monkeypatch.setenv(kernels.ENV, "generic")
    q = Int8Linear(torch.nn.Linear(64, 8))
    assert not q.exact_int8 and q.weight.dtype == torch.float32


@pytest.mark.parametrize("flags,fast", [({"architecture": "x86_64", "avx2": True}, False),
                                        ({"architecture": "x86_64", "avx2": True, "avx_vnni": True}, True),
                                        ({"architecture": "x86_64", "avx512_vnni": True}, True),
                                        ({"architecture": "aarch64"}, True)])
def test_int8_matmul_needs_int8_dot_products_on_x86(flags, fast, monkeypatch):
    """An x86 CPU without VNNI/AMX (Zen 3: torch._int_mm at 2.5 GOPS) gets the float products."""
    monkeypatch.setattr(kernels, "_flags", lambda: flags)
    monkeypatch.setattr(kernels, "_CACHE", {})
    monkeypatch.setattr(kernels, "_BY_SETTING", {})
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.cpu_kernels().int8_matmul == (fast and kernels._int_mm_is_exact())


def test_int8_vit_is_close_to_fp32():
    torch.manual_seed(0)
    model = build("dinov2_vits14_reg", depth=3, img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        ref = model(x)
        got = optimize_for_inference(model, dtype=torch.int8)(x)
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got, ref).min() > 0.99


def test_int8_default_backbone_keeps_its_knn_accuracy():
    model = load("default")
    xtr, ytr = load_fashion_mnist("train", "mini")
    xte, yte = load_fashion_mnist("test", "mini")
    feats = {}
    for name, m in {"fp32": optimize_for_inference(model), "int8": optimize_for_inference(model, dtype=torch.int8)}.items():
        ftr = embed_source(m, ArraySource(xtr, ytr), list(range(len(xtr))), torch.device("cpu"), None)
        fte = embed_source(m, ArraySource(xte, yte), list(range(len(xte))), torch.device("cpu"), None)
        acc = float((knn_predict(ftr, torch.tensor(ytr), fte, ks=(20,))[20] == torch.tensor(yte)).float().mean())
        feats[name] = (fte, acc)
    assert abs(feats["int8"][1] - feats["fp32"][1]) <= 0.005, (feats["int8"][1], feats["fp32"][1])
    assert F.cosine_similarity(feats["int8"][0].float(), feats["fp32"][0].float()).mean() > 0.99
