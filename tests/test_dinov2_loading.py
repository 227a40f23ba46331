"""Every checkpoint format loads strict into the same model; mismatches and offline mode explain themselves."""

import http.server
import threading

import pytest
import torch
from helpers_dinov2 import small
from safetensors.torch import save_file

from dinollama.dinov2 import detect_format, load, save, to_hf, weight_url
from dinollama.io import CheckpointError, OfflineError, fetch


def same_outputs(a, b, masks=False):
    x = torch.randn(2, 3, 70, 56)
    m = torch.rand(2, 20) < 0.5 if masks else None
    with torch.no_grad():
        fa, fb = a.forward_features(x, masks=m), b.forward_features(x, masks=m)
    return all(torch.allclose(fa[k], fb[k], atol=1e-5) for k in ("x_norm_clstoken", "x_norm_patchtokens"))


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitg14_reg"])
def test_official_pth_loads_unchanged(name, tmp_path):
    ref = small(name)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    assert detect_format(torch.load(tmp_path / "w.pth", weights_only=True)) == "official"
    assert same_outputs(ref, load(name, weights=tmp_path / "w.pth", depth=2), masks=True)


def test_training_checkpoints(tmp_path):
    ref = small("dinov2_vits14_reg", depth=4)
    sd = ref.state_dict()
    chunked = {}
    for k, v in sd.items():  # block_chunks=2: chunk 0 holds blocks 0-1, chunk 1 holds 2-3 (global indices)
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{k.split('.', 1)[1]}"
        chunked[k] = v
    head = {"dino_head.mlp.0.weight": torch.randn(8, 384), "ibot_head.last_layer.weight_g": torch.randn(8, 1)}
    teacher_file = {"teacher": {**{"backbone." + k: v for k, v in chunked.items()}, **head}}
    torch.save(teacher_file, tmp_path / "teacher_checkpoint.pth")
    student_noise = {"student.backbone." + k: v + 1 for k, v in chunked.items()}
    full = {"model": {**{"module.teacher.backbone." + k: v for k, v in chunked.items()},
                      **{"module." + k: v for k, v in student_noise.items()}}, "iteration": 10}
    torch.save(full, tmp_path / "model_0000010.rank_0.pth")
    for f in ("teacher_checkpoint.pth", "model_0000010.rank_0.pth"):
        assert same_outputs(ref, load("dinov2_vits14_reg", weights=tmp_path / f, depth=4))


@pytest.mark.parametrize("name", ["dinov2_vitb14", "dinov2_vits14_reg"])
def test_hf_bin_folder(name, tmp_path):
    ref = small(name)
    sd, config = to_hf(ref.state_dict(), ref.cfg)
    (tmp_path / "hf").mkdir()
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    assert detect_format(sd) == "hf-legacy"
    assert same_outputs(ref, load(name, weights=tmp_path / "hf", depth=2), masks=True)


def timm_layout(sd: dict) -> dict:
    """What timm's DINOv2 filter makes of an official state dict."""
    out = {k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"): v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitg14"])
def test_timm_state_dicts(name, tmp_path):
    ref = small(name)
    with torch.no_grad():
        ref.mask_token.zero_()  # timm does not keep it; zeros is the official value
    save_file({k: v.contiguous() for k, v in timm_layout(ref.state_dict()).items()}, str(tmp_path / "timm.safetensors"))
    assert same_outputs(ref, load(name, weights=tmp_path / "timm.safetensors", depth=2))


def test_mismatch_names_keys_and_architecture(tmp_path):
    torch.save(small("dinov2_vits14").state_dict(), tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"s\.pth.*384-dim, 2-block"):
        load("dinov2_vitb14", weights=tmp_path / "s.pth", depth=2)
    with pytest.raises(CheckpointError, match=r"missing keys: register_tokens"):
        load("dinov2_vits14_reg", weights=tmp_path / "s.pth", depth=2)
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.1"):
        load("dinov2_vits14", weights=tmp_path / "s.pth", depth=1)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load("dinov2_vits14", weights=tmp_path / "junk.pth")


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hf"])
def test_export_roundtrip_infers_architecture(fmt, tmp_path):
    ref = small("dinov2_vitg14_reg")
    out = save(ref, tmp_path / ("model." + fmt if fmt != "hf" else "hf"), format=fmt)
    assert same_outputs(ref, load(out))  # architecture inferred from the file


def test_official_weights_come_from_the_cache_offline(offline_cache):
    ref = small("dinov2_vits14_reg", depth=4)
    offline_cache.mkdir(parents=True)
    torch.save(ref.state_dict(), offline_cache / "dinov2_vits14_reg4_pretrain.pth")
    head = torch.nn.Linear(5 * 384, 1000)
    torch.save(head.state_dict(), offline_cache / "dinov2_vits14_reg4_linear4_head.pth")
    assert same_outputs(ref, load("dinov2_vits14_reg", weights="official", depth=4))
    clf = load("dinov2_vits14_reg_lc", depth=4)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        logits = clf(x)
        outs = ref.get_intermediate_layers(x, n=4, return_class_token=True)
        expected = head(torch.cat([c for _, c in outs] + [outs[-1][0].mean(1)], dim=1))
    assert logits.shape == (2, 1000)
    assert torch.allclose(logits, expected, atol=1e-5)
    top = clf.predict(x, topk=3)
    assert len(top) == 2 and len(top[0]) == 3 and isinstance(top[0][0][0], str)
    with pytest.raises(OfflineError, match=r"dinov2_vitb14_pretrain\.pth.*" + str(offline_cache)):
        load("dinov2_vitb14", weights="official")
    with pytest.raises(OfflineError, match="linear_head.pth"):
        load("dinov2_vits14_reg_lc", depth=4, layers=1)


def test_weight_urls():
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert weight_url("dinov2_vitg14") == f"{base}/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    assert weight_url("dinov2_vits14_reg") == f"{base}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    assert weight_url("dinov2_vitl14_reg", 4) == f"{base}/dinov2_vitl14/dinov2_vitl14_reg4_linear4_head.pth"
    assert weight_url("dinov2_vitb14", 1) == f"{base}/dinov2_vitb14/dinov2_vitb14_linear_head.pth"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(range(256)) * 4096
    drop_after: int | None = None

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLLAMA_HOME", str(tmp_path))
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/weights/model.pth"
        (tmp_path / "model.pth.partial").write_bytes(RangeHandler.payload[:300_000])
        path = fetch(url, progress=False)
        assert path == tmp_path / "model.pth"
        assert path.read_bytes() == RangeHandler.payload
        assert not (tmp_path / "model.pth.partial").exists()
        assert fetch(url, progress=False) == path  # cached: no second download
    finally:
        server.shutdown()


def test_unreachable_host_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLLAMA_HOME", str(tmp_path))
    with pytest.raises(OfflineError, match=r"cannot reach 127\.0\.0\.1:9.*place it at .*model\.pth"):
        fetch("http://127.0.0.1:9/model.pth", progress=False)
