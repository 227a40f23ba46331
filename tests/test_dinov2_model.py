"""Backbone structure, position-embedding interpolation and the crop policy."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_dinov2 import small

from dinollama.dinov2 import BACKBONES, build

PARAMS_518 = {"s": 22_056_576, "b": 86_580_480, "l": 304_368_640, "g": 1_136_480_768}
DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}


@pytest.mark.parametrize("name", BACKBONES)
def test_parameter_counts_and_keys(name):
    with torch.device("meta"):
        model = build(name)
    size = name[len("dinov2_vit")]
    expected = PARAMS_518[size] + (4 * DIMS[size] if name.endswith("_reg") else 0)
    assert sum(p.numel() for p in model.parameters()) == expected
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 1370, DIMS[size])
    assert sd["mask_token"].shape == (1, DIMS[size])
    assert ("register_tokens" in sd) == name.endswith("_reg")
    block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    ffn = {"mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"} if size == "g" else {
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    assert block == {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "ls2.gamma"} | ffn
    if size == "g":
        assert sd["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
        assert sd["blocks.0.mlp.w3.weight"].shape == (1536, 4096)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def _bicubic_axis(x: np.ndarray, out: int, scale: float, axis: int) -> np.ndarray:
    """PyTorch's bicubic (A=-0.75, align_corners=False, clamped borders) along one axis, in float64,
    sampling with the given scale factor: source = (i + 0.5) / scale - 0.5."""
    n = x.shape[axis]
    src = (np.arange(out) + 0.5) / scale - 0.5
    base = np.floor(src).astype(int)
    res = 0
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n - 1)
        w = _cubic(src - (base + k))
        shape = [1] * x.ndim
        shape[axis] = out
        res = res + np.take(x, idx, axis=axis) * w.reshape(shape)
    return res


def official_formula(pos: np.ndarray, h: int, w: int, patch: int = 14, offset: float = 0.1) -> np.ndarray:
    """The official non-register interpolation: scale factor ((H/14 + 0.1)/M, (W/14 + 0.1)/M)."""
    m = int(np.sqrt(pos.shape[1] - 1))
    if (h // patch) * (w // patch) == m * m and h == w:  # the official model skips interpolation here
        return pos
    grid = pos[0, 1:].reshape(m, m, -1).astype(np.float64)
    h0, w0 = h // patch, w // patch
    grid = _bicubic_axis(grid, h0, (h0 + offset) / m, 0)
    grid = _bicubic_axis(grid, w0, (w0 + offset) / m, 1)
    return np.concatenate([pos[0, :1], grid.reshape(h0 * w0, -1)])[None]


@pytest.mark.parametrize("size", [(224, 224), (280, 420), (518, 518), (700, 700)])
def test_interpolation_matches_official_formula(size):
    model = build("dinov2_vits14", depth=1)
    ours = model.interpolate_pos_encoding((size[0] // 14) * (size[1] // 14), *size).detach().numpy()
    ref = official_formula(model.pos_embed.detach().numpy(), *size)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


def test_offset_changes_the_result():
    """The 0.1 offset is not a no-op: output-size interpolation gives different numbers at 224."""
    model = build("dinov2_vits14", depth=1)
    ours = model.interpolate_pos_encoding(256, 224, 224)
    sized = torch.nn.functional.interpolate(
        model.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert (ours[0, 1:] - sized.permute(0, 2, 3, 1).reshape(256, -1)).abs().max() > 1e-4


def test_crop_pad_error_policies():
    x = torch.randn(1, 3, 230, 245)
    crop = small("dinov2_vits14", depth=1)
    with torch.no_grad():
        out = crop.forward_features(x)
        assert out["x_norm_patchtokens"].shape[1] == (230 // 14) * (245 // 14)
        assert torch.allclose(crop(x), crop(x[..., :224, :238]), atol=1e-6)
    pad = small("dinov2_vits14", depth=1, crop="pad")
    with torch.no_grad():
        assert pad.forward_features(x)["x_norm_patchtokens"].shape[1] == 17 * 18
        padded = torch.nn.functional.pad(x, (3, 4, 4, 4))  # to 238 x 252: centred, odd pixel right
        assert torch.allclose(pad(x), pad(padded), atol=1e-6)
    strict = small("dinov2_vits14", depth=1, crop="error")
    with pytest.raises(ValueError, match="230x245 is not a multiple of the patch size 14.*224x238"):
        strict(x)
    with pytest.raises(ValueError, match="smaller than one"):
        crop(torch.randn(1, 3, 10, 10))


def test_masks_replace_patch_embeddings_before_position():
    model = small("dinov2_vits14_reg", depth=1)
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = True
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x, masks)
        pos = model.interpolate_pos_encoding(16, 56, 56)
    # layout [cls, 4 registers, patches]; a masked patch is mask_token + its position embedding
    assert torch.allclose(tokens[0, 5 + 3], model.mask_token[0] + pos[0, 1 + 3], atol=1e-6)
    assert torch.allclose(tokens[0, 1:5], model.register_tokens[0])
    assert not torch.allclose(tokens[1, 5 + 3], model.mask_token[0] + pos[0, 1 + 3])


def test_intermediate_layers_shapes_and_indices():
    model = small("dinov2_vits14_reg", depth=4)
    x = torch.randn(2, 3, 112, 98)
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True)
        last = model.get_intermediate_layers(x, n=1)[0]
        feats = model.forward_features(x)
    assert [tuple(p.shape) for p, _ in outs] == [(2, 384, 8, 7)] * 2
    assert torch.allclose(last, feats["x_norm_patchtokens"], atol=1e-6)


@pytest.mark.parametrize("name,kw", [
    ("dinov2_vits14_reg", {}),
    ("dinov2_vitg14", {"embed_dim": 96, "num_heads": 2}),  # SwiGLU
    ("dinov2_vitb14", {"init_values": None}),  # no LayerScale
])
def test_optimize_for_inference_keeps_outputs(name, kw):
    from dinollama.dinov2 import optimize_for_inference

    model = small(name, depth=2, **kw)
    x = torch.randn(3, 3, 70, 84)
    fast = optimize_for_inference(model, rows_hint=64)
    fast_bf16 = optimize_for_inference(model, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = model.forward_features(x)
        out = fast.forward_features(x)
        pooled = fast(x)  # the last block for the class token only
        maps, ref_maps = fast.get_attention_maps(x, n=2), model.get_attention_maps(x, n=2)
        out_bf16 = fast_bf16(x.bfloat16()).float()
        plain_bf16 = copy.deepcopy(model).bfloat16()(x.bfloat16()).float()
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref["x_norm_clstoken"], atol=1e-4, rtol=1e-4)
    for a, b in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # bf16 rounds in another order when fused: it must be as close to fp32 as a plain bf16 model
    err, err_plain = ((o - ref["x_norm_clstoken"]).abs().max().item() for o in (out_bf16, plain_bf16))
    assert err < max(2 * err_plain, 0.05), (err, err_plain)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # the original is untouched


def test_optimized_model_keeps_each_sizes_positions():
    """The fast path computes the interpolated position embedding once per input size: a second size,
    a return to the first and a new size after the parameters change all get their own, exact."""
    from dinollama.dinov2 import optimize_for_inference

    model = small("dinov2_vits14_reg", depth=1)
    fast = optimize_for_inference(model)
    sizes = [(70, 84), (56, 56), (70, 84)]
    with torch.inference_mode():
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
        assert sorted(k[:3] for k in fast.interpolate_pos_encoding.memo) == [(16, 56, 56), (30, 70, 84)]
        fast.pos_embed.add_(1.0)  # new parameters, a size not seen yet: computed from them
        x = torch.randn(1, 3, 42, 42)
        model.pos_embed.add_(1.0)
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)


def test_packed_linear_fusions_match_plain_ops():
    from dinollama.nn import PackedLinear

    lin = torch.nn.Linear(48, 80)
    gamma = torch.rand(80) + 0.5
    x, res = torch.randn(2, 5, 48), torch.randn(2, 5, 80)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(lin, 10, activation="gelu")(x), F.gelu(lin(x)))
        torch.testing.assert_close(PackedLinear(lin, 10, scale=gamma)(x, residual=res), res + gamma * lin(x))
        bf16 = PackedLinear(lin, 10, scale=gamma, dtype=torch.bfloat16)(x.bfloat16(), residual=res.bfloat16())
        torch.testing.assert_close(bf16.float(), res + gamma * lin(x), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="activation"):
        PackedLinear(lin, 10, activation="relu")


def test_bmm_attention_equals_sdpa():
    from dinollama.nn import bmm_attention

    q, k, v = torch.randn(3, 3, 4, 17, 8).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # token-major, as bmm_attention returns it
    with torch.inference_mode():
        torch.testing.assert_close(bmm_attention(q, k, v), ref)
        torch.testing.assert_close(bmm_attention(q[:, :, :1], k, v), ref[:, :1])  # fewer queries than keys
    qg = q.clone().requires_grad_()
    out = bmm_attention(qg, k, v)  # the training path keeps autograd
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    torch.testing.assert_close(qg.grad, torch.func.grad(lambda t: F.scaled_dot_product_attention(t, k, v).sum())(q))
