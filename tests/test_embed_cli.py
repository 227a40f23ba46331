"""The embed job (formats, resume, bad files), pca, the CLI surface and torch.hub."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_dinov2 import small
from PIL import Image

from dinollama.cli.main import main
from dinollama.dinov2 import default_transform, save
from dinollama.dinov2.embed import read_features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    (folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


@pytest.fixture
def weights(tmp_path):
    model = small("dinov2_vits14", depth=1)
    return save(model, tmp_path / "tiny.safetensors"), model


def run(args):
    return main([str(a) for a in args])


def test_embed_matches_direct_forward_all_formats(images, weights, tmp_path, capsys):
    path, model = weights
    base = ["embed", images, "--model", path, "--image-size", "56", "--workers", "0", "--quiet",
            "--dtype", "fp32"]
    assert run(base + ["-o", tmp_path / "f.safetensors", "--patch-tokens"]) == 0
    assert "broken.jpg" in capsys.readouterr().err
    feats = read_features(tmp_path / "f.safetensors")
    assert len(feats.paths) == 10 and feats.cls.shape == (10, 384) and feats.patch.shape == (10, 16, 384)
    assert list(feats.failed) == [str(images / "dog" / "broken.jpg")]
    from dinollama.data import load_image
    from dinollama.dinov2 import EvalTransform

    x = torch.stack([EvalTransform(64, 56)(load_image(p)) for p in feats.paths[:3]])
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(feats.cls[:3], ref, atol=1e-4)
    assert run(base + ["-o", tmp_path / "f.npy"]) == 0
    assert np.allclose(np.load(tmp_path / "f.npy"), feats.cls.numpy(), atol=1e-5)
    assert (tmp_path / "f.npy.paths.txt").read_text().splitlines() == feats.paths
    assert run(base + ["-o", tmp_path / "f.parquet", "--patch-tokens"]) == 0
    pq = read_features(tmp_path / "f.parquet")
    assert pq.paths == feats.paths and torch.allclose(pq.cls, feats.cls, atol=1e-6)
    assert torch.allclose(pq.patch, feats.patch, atol=1e-6)
    assert run(base + ["-o", tmp_path / "f.bin"]) == 2
    assert run(base + ["-o", tmp_path / "x.npy", "--on-error", "fail"]) == 2


def test_embed_resumes_after_interruption(images, weights, tmp_path):
    path, _ = weights
    base = ["embed", images, "--model", path, "--image-size", "56", "--workers", "0",
            "--quiet", "--chunk-size", "4"]
    out = tmp_path / "r.safetensors"
    assert run(base + ["-o", out]) == 0
    full = read_features(out)
    # simulate a kill (Ctrl-C) while the third chunk is being written
    import dinollama.dinov2.embed as emb

    calls = []

    real_save = emb.save_file

    def dying_save(tensors, name, metadata=None):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(tensors, name, metadata=metadata)

    emb.save_file = dying_save
    try:
        assert run(base + ["-o", tmp_path / "again.safetensors"]) == 130
    finally:
        emb.save_file = real_save
    parts = tmp_path / "again.safetensors.parts"
    assert len(list(parts.glob("rank0-*.safetensors"))) == 2
    assert run(base + ["-o", tmp_path / "again.safetensors"]) == 0
    again = read_features(tmp_path / "again.safetensors")
    assert again.paths == full.paths and torch.allclose(again.cls, full.cls)
    assert not parts.exists()


def test_pca_picture(images, weights, tmp_path):
    path, _ = weights
    out = tmp_path / "pca.png"
    files = sorted(images.rglob("*.png"))[:3]
    assert run(["pca", *files, "-o", out, "--model", path, "--size", "112"]) == 0
    pic = Image.open(out)
    assert pic.size == (3 * 224, 2 * 224)
    bottom = np.asarray(pic)[224:]
    assert bottom.std() > 0  # colours, not a blank canvas


def test_offline_download_error_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DINOLLAMA_HOME", str(tmp_path))
    monkeypatch.setenv("DINOLLAMA_OFFLINE", "1")
    assert run(["download", "dinov2_vits14"]) == 2
    err = capsys.readouterr().err
    assert "dinov2_vits14_pretrain.pth" in err and "Traceback" not in err


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dinollama.cli.main", "--help"], capture_output=True, text=True)
    for cmd in ("embed", "pca", "classify", "convert", "download", "demo"):
        assert cmd in out.stdout


def test_torch_hub_local_entry_points(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOLLAMA_HOME", str(tmp_path))
    model = small("dinov2_vits14", depth=12)
    torch.save(model.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    hub = torch.hub.load(str(ROOT), "dinov2_vits14", source="local")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(hub(x), model(x), atol=1e-5)
    entries = [n for n in dir(__import__("importlib").import_module("hubconf")) if n.startswith("dinov2_")]
    assert {"dinov2_vitg14_reg", "dinov2_vitl14_lc"} <= set(entries)
    assert default_transform(hub).crop_size == 224
    assert json.loads(json.dumps(hub.cfg.to_dict()))["embed_dim"] == 384


def test_embed_under_torchrun_shards_inputs(images, weights, tmp_path):
    """Two gloo processes split the inputs; the merged file equals a single-process run."""
    path, _ = weights
    args = [str(images), "--model", str(path), "--image-size", "56", "--workers", "0", "--quiet"]
    assert run(["embed", *args, "-o", tmp_path / "one.safetensors"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "dinollama.cli.main", "embed", *args, "-o", str(tmp_path / "two.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = read_features(tmp_path / "one.safetensors"), read_features(tmp_path / "two.safetensors")
    assert one.paths == two.paths
    assert torch.allclose(one.cls, two.cls, atol=1e-5)
    assert list(two.failed) == list(one.failed)


def test_eval_knn_and_logreg_end_to_end_on_real_images(tmp_path, capsys):
    """Committed Fashion-MNIST images -> image folders -> eval knn / logreg through the CLI."""
    from dinollama.cli.demo import _write_folder
    from dinollama.data.mnist import load_fashion_mnist
    from dinollama.dinov2.eval import knn_predict

    xtr, ytr = load_fashion_mnist("train", "mini")
    xte, yte = load_fashion_mnist("test", "mini")
    _write_folder(xtr[:200], ytr[:200], tmp_path / "train")
    _write_folder(xte[:60], yte[:60], tmp_path / "test")
    model = small("dinov2_vits14", depth=1)
    weights = save(model, tmp_path / "m.safetensors")
    common = ["--model", weights, "--image-size", "28", "--workers", "0"]
    for split in ("train", "test"):
        assert run(["embed", tmp_path / split, "-o", tmp_path / f"{split}.safetensors", *common, "--quiet"]) == 0
    report = tmp_path / "knn.json"
    # train from a feature file, test straight from the image folder (embedded on the fly)
    assert run(["eval", "knn", "--train", tmp_path / "train.safetensors", "--test", tmp_path / "test",
                "--ks", "1", "20", "--report", report, *common]) == 0
    result = json.loads(report.read_text())
    assert (result["n_train"], result["n_test"], result["n_classes"]) == (200, 60, 10)
    assert "20-NN" in capsys.readouterr().out
    tr, te = read_features(tmp_path / "train.safetensors"), read_features(tmp_path / "test.safetensors")
    classes = sorted({Path(p).parent.name for p in tr.paths})
    label = lambda paths: torch.tensor([classes.index(Path(p).parent.name) for p in paths])  # noqa: E731
    preds = knn_predict(tr.cls, label(tr.paths), te.cls, ks=(1, 20), num_classes=10)
    for k in (1, 20):
        assert result["top1"][f"{k}-NN"] == pytest.approx((preds[k] == label(te.paths)).float().mean().item())
    assert run(["eval", "logreg", "--train", tmp_path / "train.safetensors", "--test", tmp_path / "test.safetensors",
                "--report", tmp_path / "lr.json", "--max-iter", "50", *common]) == 0  # 45 fits: 277 s at 1000 (Zen 3)
    assert run(["eval", "knn", "--train", tmp_path / "train.safetensors", "--test", tmp_path / "test.safetensors",
                "--ks", "10", "--n-per-class", "5", "--n-tries", "3", "--report", tmp_path / "fs.json"]) == 0
    few = json.loads((tmp_path / "fs.json").read_text())
    assert len(few["top1_per_try"]["10-NN"]) == 3 and few["n_per_class"] == 5 and "10-NN" in few["top5"]
    lr = json.loads((tmp_path / "lr.json").read_text())
    assert lr["protocol"] == "logreg" and 0.0 <= next(iter(lr["top1"].values())) <= 1.0


def test_random_weights_are_the_same_network_every_run(tmp_path):
    from dinollama.cli.vision import load_model

    args = __import__("argparse").Namespace(model="dinov2_vits14", weights="random", device="cpu")
    a, b = load_model(args), load_model(args)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_serve_step_of_the_demo(tmp_path, capsys):
    from dinollama.cli.demo import _write_folder, serve_demo
    from dinollama.data.mnist import load_fashion_mnist

    x, y = load_fashion_mnist("test", "mini")
    _write_folder(x[:3], y[:3], tmp_path)
    assert serve_demo("default", "default", [str(p) for p in sorted(tmp_path.rglob("*.png"))]) == 0
    out = capsys.readouterr().out
    assert "POST /v1/chat/completions ->" in out and "POST /infill" in out and "cosine" in out
