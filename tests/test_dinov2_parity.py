"""Numerical parity with Hugging Face transformers' Dinov2Model / Dinov2WithRegistersModel."""

import json

import pytest
import torch
from helpers_dinov2 import small
from safetensors.torch import save_file
from transformers import Dinov2Model, Dinov2WithRegistersModel

from dinollama.dinov2 import load, to_hf

TOL = 1e-4


def export_hf(model, folder):
    sd, config = to_hf(model.state_dict(), model.cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hf_model(model, folder, attn="sdpa"):
    cls = Dinov2WithRegistersModel if model.num_register_tokens else Dinov2Model
    return cls.from_pretrained(export_hf(model, folder), attn_implementation=attn).eval()


def compare(ours, theirs, x, masks=None):
    r = ours.num_register_tokens
    with torch.no_grad():
        out = ours.forward_features(x, masks=masks)
        ref = theirs(x, bool_masked_pos=masks, output_hidden_states=True)
    hidden = ref.last_hidden_state
    assert (out["x_norm_clstoken"] - hidden[:, 0]).abs().max() <= TOL
    assert out["x_norm_regtokens"].shape[1] == r
    assert torch.allclose(out["x_norm_regtokens"], hidden[:, 1 : 1 + r], atol=TOL, rtol=0)
    assert (out["x_norm_patchtokens"] - hidden[:, 1 + r :]).abs().max() <= TOL
    assert (out["x_prenorm"] - ref.hidden_states[-1]).abs().max() <= TOL
    if masks is not None:  # intermediate layers are taken without masks, as in the official model
        return
    with torch.no_grad():
        inter = ours.get_intermediate_layers(x, n=2, return_class_token=True, norm=False)
    for (patch, cls), ref_h in zip(inter, ref.hidden_states[-2:]):
        assert (cls - ref_h[:, 0]).abs().max() <= TOL
        assert (patch - ref_h[:, 1 + r :]).abs().max() <= TOL
    with torch.no_grad():
        pooled = ours(x)  # the last block computes the class token only
    assert (pooled - hidden[:, 0]).abs().max() <= TOL
    torch.testing.assert_close(pooled, out["x_norm_clstoken"], atol=1e-5, rtol=0)


CONFIGS = [
    ("dinov2_vits14", {}),
    ("dinov2_vitb14", {}),
    ("dinov2_vitl14", {}),
    ("dinov2_vitg14", {}),  # shrunk g: full width and SwiGLU, two blocks
]


@pytest.mark.parametrize("name,kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_plain_models_match_hf_at_native_grid(name, kw, tmp_path):
    ours = small(name, **kw)
    theirs = hf_model(ours, tmp_path / "hf")
    x = torch.randn(1, 3, 518, 518)
    masks = torch.rand(1, 37 * 37) < 0.3
    compare(ours, theirs, x)
    compare(ours, theirs, x, masks)


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov2_vitg14_reg"])
@pytest.mark.parametrize("size", [(224, 224), (280, 420), (518, 518), (700, 700)])
def test_register_models_match_hf(name, size, tmp_path):
    if name == "dinov2_vitg14_reg" and size != (280, 420):
        pytest.skip("one size suffices for the SwiGLU register model")
    ours = small(name)
    theirs = hf_model(ours, tmp_path / "hf")
    compare(ours, theirs, torch.randn(2, 3, *size))


def test_attention_maps_match_hf_eager(tmp_path):
    ours = small("dinov2_vits14_reg")
    theirs = hf_model(ours, tmp_path / "hf", attn="eager")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = ours.get_attention_maps(x, n=2)
        ref = theirs(x, output_attentions=True).attentions
    assert len(maps) == 2
    for a, b in zip(maps, ref[-2:]):
        assert a.shape == b.shape == (1, 6, 261, 261)
        assert (a - b).abs().max() <= TOL
    assert torch.allclose(maps[-1].sum(-1), torch.ones(1, 6, 261), atol=1e-5)


@pytest.mark.parametrize("layout", ["save_pretrained", "in_memory"])
def test_hf_checkpoints_load_into_ours(layout, tmp_path):
    """Folders written by transformers itself (legacy names on disk) and its in-memory key names
    (transformers >= 5: q_proj/o_proj/gate_proj) both load strict and give the same outputs."""
    ours = small("dinov2_vitg14_reg")
    theirs = hf_model(ours, tmp_path / "export")
    folder = tmp_path / "hf"
    if layout == "save_pretrained":
        theirs.save_pretrained(folder)
    else:
        folder.mkdir()
        sd = theirs.state_dict()
        assert any("q_proj" in k for k in sd) and any("gate_proj" in k for k in sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    loaded = load("dinov2_vitg14_reg", weights=folder, depth=2)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (loaded(x) - ours(x)).abs().max() <= TOL
