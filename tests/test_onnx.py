"""ONNX export checked against ONNX Runtime: every output within 1e-4 of ours (fp32) at several sizes."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from dinollama.dinov2 import LinearClassifier, build, export_onnx, load  # noqa: E402


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
@pytest.mark.parametrize("size", [(224, 224), (280, 420), (518, 518)])
def test_export_equals_our_model(name, size, tmp_path):
    torch.manual_seed(0)
    model = build(name, depth=2).eval()
    path = export_onnx(model, tmp_path / "m.onnx", size)
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output][:2] == ["x_norm_clstoken", "x_norm_patchtokens"]
    assert graph.graph.input[0].name == "image" and graph.opset_import[0].version >= 18
    assert "Resize" not in {n.op_type for n in graph.graph.node}  # the position embedding is a constant
    sess = session(path)
    for batch in (1, 3):  # the batch axis is free
        x = torch.randn(batch, 3, *size)
        outs = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref = model.forward_features(x)
            cls = model(x)
        assert np.abs(outs[0] - cls.numpy()).max() < 1e-4
        assert np.abs(outs[1] - ref["x_norm_patchtokens"].numpy()).max() < 1e-4
        if model.num_register_tokens:
            assert np.abs(outs[2] - ref["x_norm_regtokens"].numpy()).max() < 1e-4
    with pytest.raises(Exception, match="(?i)invalid dimensions|dimension"):  # another size: refused, not garbage
        sess.run(None, {"image": np.zeros((1, 3, size[0] + 14, size[1]), dtype=np.float32)})


def test_classifier_and_the_shipped_default_export(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = build("dinov2_vits14", depth=4).eval()
    clf = LinearClassifier(backbone, torch.nn.Linear(5 * 384, 1000), layers=4).eval()
    path = export_onnx(clf, tmp_path / "lc.onnx", (224, 224))
    x = torch.randn(2, 3, 224, 224)
    (logits,) = session(path).run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert np.abs(logits - clf(x).numpy()).max() < 1e-4

    from dinollama.cli.main import main

    assert main(["convert", "default", str(tmp_path / "d.onnx")]) == 0
    assert "input image N x 3 x 56 x 56" in capsys.readouterr().out
    model = load("default")
    x = torch.rand(4, 3, 56, 56)
    outs = session(tmp_path / "d.onnx").run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert np.abs(outs[0] - model(x).numpy()).max() < 1e-4
    assert main(["convert", "default", str(tmp_path / "any.onnx"), "--any-size"]) == 0
    assert "N x 3 x H x W (any multiples of 14)" in capsys.readouterr().out
    x = torch.rand(2, 3, 84, 112)  # the shipped model's grid is 4x4: resized up, not cropped
    outs = session(tmp_path / "any.onnx").run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert np.abs(outs[0] - model(x).numpy()).max() < 1e-4
    assert main(["convert", "default", str(tmp_path / "d.onnx"), "--image-size", "50", "56"]) == 2
    assert "multiples of the patch size 14" in capsys.readouterr().err
    assert main(["convert", "default", str(tmp_path / "d.safetensors"), "--image-size", "56", "56"]) == 2


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_any_size_export_equals_our_model_at_every_size(name, tmp_path):
    """One ``dynamic_size`` graph: the position resize runs in ONNX Runtime and still matches ours."""
    torch.manual_seed(0)
    model = build(name, depth=2).eval()
    with torch.no_grad():  # a non-smooth grid: the resize is checked, not hidden by near-constant inputs
        model.pos_embed.normal_()
    path = export_onnx(model, tmp_path / "any.onnx", (224, 224), dynamic_size=True)
    assert "Resize" in {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = session(path)
    for size in [(224, 224), (280, 420), (518, 518), (518, 700), (14, 42), (700, 700)]:
        x = torch.randn(2, 3, *size)
        outs = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref = model.forward_features(x)
        assert np.abs(outs[0] - ref["x_norm_clstoken"].numpy()).max() < 1e-4, size
        assert np.abs(outs[1] - ref["x_norm_patchtokens"].numpy()).max() < 1e-4, size
    with pytest.raises(Exception, match="(?i)reshape"):  # not a multiple of 14: refused, not cropped silently
        sess.run(None, {"image": np.zeros((1, 3, 225, 224), dtype=np.float32)})
