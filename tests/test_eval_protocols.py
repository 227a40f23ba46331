"""Linear-probe grid, torch L-BFGS, dataset readers, retrieval files, dense probes, and the eval CLI."""

import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_dinov2 import small
from PIL import Image

from dinollama.cli.main import main
from dinollama.data.datasets import open_source
from dinollama.data.mnist import load_fashion_mnist
from dinollama.dinov2 import save
from dinollama.dinov2.eval import (
    FeatureSet,
    InputKind,
    LinearProbe,
    extract_features,
    linear_probe,
    train_logreg,
)
from dinollama.dinov2.eval.dense import (
    DepthHead,
    SegHead,
    SegMeter,
    depth_metrics,
    official_layers,
    sigloss,
    slide_logits,
)
from dinollama.dinov2.eval.linear import HeadGrid, available_kinds, train_grid
from dinollama.dinov2.eval.logreg import TorchLogreg
from dinollama.dinov2.eval.retrieval import load_ground_truth
from dinollama.dinov2.transforms import EvalTransform


def run(args):
    return main([str(a) for a in args])


def random_features(n=240, blocks=4, d=6, classes=4, seed=0, sep=2.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = torch.randn(classes, blocks, d, generator=g) * sep
    x = centers[labels] + torch.randn(n, blocks, d, generator=g)
    pm = centers[labels, -1] * 0.5 + torch.randn(n, d, generator=g)
    return FeatureSet(x, pm, labels, [f"c{i}" for i in range(classes)])


# ------------------------------------------------------------------------------- linear grid


def test_grid_equals_separate_heads_with_torch_sgd_and_cosine():
    """52-style grid == one nn.Linear per head trained by torch.optim.SGD(momentum=0.9) + CosineAnnealingLR."""
    feats = random_features()
    kinds = available_kinds(feats)
    assert [(k.n_blocks, k.avgpool) for k in kinds] == [(1, False), (1, True), (4, False), (4, True)]
    lrs, bs, epochs = (1e-3, 1e-2, 0.1), 32, 2
    grid = train_grid(feats, kinds, lrs, epochs=epochs, batch_size=bs, seed=3, progress=False)

    g = torch.Generator().manual_seed(3)
    inputs = [k.features(feats) for k in kinds]
    init = HeadGrid(kinds, [x.shape[1] for x in inputs], 4, len(lrs), g)
    heads, opts = [], []
    for k in range(len(kinds)):
        for h, lr in enumerate(lrs):
            lin = torch.nn.Linear(inputs[k].shape[1], 4)
            lin.load_state_dict({"weight": init.weight[k][h].detach().clone(), "bias": init.bias[k][h].detach().clone()})
            heads.append((k, h, lin))
            opts.append(torch.optim.SGD(lin.parameters(), lr=lr * bs / 256, momentum=0.9, weight_decay=0))
    steps = math.ceil(len(feats) / bs)
    total = epochs * steps
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, total, eta_min=0) for o in opts]
    for step in range(total):
        if step % steps == 0:
            order = torch.randperm(len(feats), generator=g)
        idx = order[(step % steps) * bs :][:bs]
        for (k, _, lin), opt, sched in zip(heads, opts, scheds):
            opt.zero_grad()
            F.cross_entropy(lin(inputs[k][idx]), feats.labels[idx]).backward()
            opt.step()
            sched.step()
    for k, h, lin in heads:
        assert torch.allclose(grid.weight[k][h], lin.weight, atol=1e-5), (k, h)
        assert torch.allclose(grid.bias[k][h], lin.bias, atol=1e-5)


def test_linear_probe_selection_refit_and_reporting_split():
    train, test = random_features(seed=0), random_features(n=120, seed=0)
    test.blocks = test.blocks + 0.01  # a distinct draw of the same classes is enough here
    res = linear_probe(train, test, epochs=5, progress=False)
    assert len(res.accuracy) == 52 and res.select_on == "holdout"
    assert res.best.accuracy(test) > 0.9
    official = linear_probe(train, test, select_on="test", epochs=5, progress=False)
    assert official.best.accuracy(test) == pytest.approx(max(official.accuracy.values()))
    with pytest.raises(ValueError, match="select_on"):
        linear_probe(train, test, select_on="val", progress=False)


def test_head_save_load_and_official_head_matches_hub_classifier(tmp_path):
    """A saved head reloads; an official-format *_linear4_head.pth reads 4 cls tokens + mean patch token in
    the order of the hub classifier."""
    from dinollama.dinov2.hub import LinearClassifier

    model = small("dinov2_vits14", depth=4)
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (42, 42, 3), dtype=np.uint8)) for i in range(6)]
    src = _PilSource(imgs)
    transform = EvalTransform(42, 42)
    feats = extract_features(model, src, transform, n_blocks=4, workers=0, progress=False)
    lin = torch.nn.Linear(5 * model.embed_dim, 1000)
    torch.save(lin.state_dict(), tmp_path / "dinov2_vits14_linear4_head.pth")
    probe = LinearProbe.load(tmp_path / "dinov2_vits14_linear4_head.pth", embed_dim=model.embed_dim)
    assert probe.kind == InputKind(4, True) and len(probe.classes) == 1000
    with torch.no_grad():
        ref = LinearClassifier(model, lin, layers=4)(torch.stack([transform(i) for i in imgs]))
    assert torch.allclose(probe.logits(feats), ref, atol=1e-4)
    probe.save(tmp_path / "head.safetensors")
    again = LinearProbe.load(tmp_path / "head.safetensors")
    assert again.kind == probe.kind and torch.equal(again.logits(feats), probe.logits(feats))
    torch.save({"fc.weight": lin.weight}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="weight"):
        LinearProbe.load(tmp_path / "bad.pth", embed_dim=model.embed_dim)


class _PilSource:
    def __init__(self, imgs, labels=None):
        self.imgs = imgs
        self.labels = torch.tensor(labels if labels is not None else [0] * len(imgs))
        self.classes = sorted({str(v) for v in self.labels.tolist()})

    def __len__(self):
        return len(self.imgs)

    def pil(self, i):
        return self.imgs[i]

    def name(self, i):
        return f"#{i}"


# ------------------------------------------------------------------------------------- logreg


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_torch_lbfgs_logreg_matches_sklearn(c):
    from sklearn.linear_model import LogisticRegression

    feats = random_features(n=300, blocks=1, d=8, classes=3, sep=0.7)
    x, y = feats.cls.double().numpy(), feats.labels.numpy()
    ref = LogisticRegression(C=c, max_iter=5000, tol=1e-12).fit(x, y)
    ours = TorchLogreg.fit(x, y, c, max_iter=1000)
    assert np.allclose(ours.coef_.numpy(), ref.coef_, atol=2e-4, rtol=1e-3)
    assert np.allclose(ours.intercept_.numpy(), ref.intercept_, atol=2e-4, rtol=1e-3)
    assert (ours.predict(x) == ref.predict(x)).all()


def test_train_logreg_torch_backend_selects_like_sklearn():
    feats = random_features(n=200, blocks=1, d=5, classes=3, sep=0.8)
    grid = 10 ** np.linspace(-4, 2, 7)
    a = train_logreg(feats.cls.numpy(), feats.labels.numpy(), c_grid=grid, backend="sklearn")
    b = train_logreg(feats.cls.numpy(), feats.labels.numpy(), c_grid=grid, backend="torch")
    assert a.holdout_accuracy == pytest.approx(b.holdout_accuracy) and a.C == b.C


# ------------------------------------------------------------------------------------ datasets


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(path)


def test_csv_jsonl_and_imagenet_layouts(tmp_path):
    for i, c in enumerate(["a", "b", "a"]):
        _png(tmp_path / "img" / f"{i}.png", 40 * i)
    (tmp_path / "h.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png,dog\nimg/2.png,cat\n")
    (tmp_path / "n.csv").write_text("img/0.png,cat\nimg/1.png,dog\n")
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"path": f"img/{i}.png", "label": c}) + "\n"
                                              for i, c in enumerate("xyx")))
    h = open_source(str(tmp_path / "h.csv"))
    assert h.classes == ["cat", "dog"] and h.labels.tolist() == [0, 1, 0] and h.pil(1).size == (24, 20)
    assert open_source(str(tmp_path / "n.csv")).labels.tolist() == [0, 1]
    assert open_source(str(tmp_path / "l.jsonl")).labels.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"labels \['x'\] are not classes"):
        open_source(str(tmp_path / "l.jsonl"), classes=["cat", "y"])

    root = tmp_path / "imagenet"
    for wnid in ("n01", "n02"):
        _png(root / "train" / wnid / f"{wnid}_1.JPEG")
    _png(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    _png(root / "val" / "ILSVRC2012_val_00000002.JPEG")
    (root / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n02 1 2 3 4\n"
                                               "ILSVRC2012_val_00000002,n01 1 2 3 4 n01 5 6 7 8\n")
    tr, va = open_source(f"imagenet:{root}", "train"), open_source(f"imagenet:{root}", "test")
    assert tr.classes == va.classes == ["tench", "goldfish"] and va.labels.tolist() == [1, 0]
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        open_source(f"imagenet:{root}", "val")


# ------------------------------------------------------------------------------------ retrieval


def test_ground_truth_pickle_json_and_refusal(tmp_path):
    for name in ("q0", "d0", "d1"):
        _png(tmp_path / "jpg" / f"{name}.jpg")
    gnd = {"qimlist": ["q0"], "imlist": ["d0", "d1"],
           "gnd": [{"bbx": np.array([1.0, 2.0, 10.0, 12.0]), "easy": np.array([1]), "hard": [], "junk": [0]}]}
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(gnd))
    gt = load_ground_truth(tmp_path / "g.pkl", tmp_path / "jpg", tmp_path / "jpg")
    assert gt.entries == [{"easy": [1], "hard": [], "junk": [0]}] and gt.boxes == [[1.0, 2.0, 10.0, 12.0]]
    assert [p.name for p in gt.db_paths] == ["d0.jpg", "d1.jpg"]
    (tmp_path / "g.json").write_text(json.dumps({**gnd, "gnd": [{"easy": [1], "hard": [], "junk": []}]}))
    assert load_ground_truth(tmp_path / "g.json", tmp_path / "jpg", tmp_path / "jpg").boxes is None

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"qimlist": [], "imlist": [], "gnd": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_ground_truth(tmp_path / "evil.pkl", tmp_path / "jpg", tmp_path / "jpg")


def test_eval_retrieval_cli_duplicates_rank_first(tmp_path):
    """Queries are copies of database images: each is its own easy positive, so mAP is 1; marking it junk
    and a different image easy gives the AP of that image's rank."""
    xte, _ = load_fashion_mnist("test", "mini")
    for i in range(12):
        Image.fromarray(xte[i]).convert("RGB").save(tmp_path / f"d{i}.png")
    gnd = {"qimlist": ["d0", "d3", "d7"], "imlist": [f"d{i}" for i in range(12)],
           "gnd": [{"easy": [q], "hard": [], "junk": []} for q in (0, 3, 7)]}
    (tmp_path / "g.json").write_text(json.dumps(gnd))
    common = ["--model", "default", "--workers", "0", "--quiet"]
    assert run(["eval", "retrieval", "--gnd", tmp_path / "g.json", "--queries", tmp_path, "--database", tmp_path,
                "--report", tmp_path / "r.json", *common]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["easy"]["mAP"] == pytest.approx(1.0) and report["easy"]["mP@1"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- dense parts


def test_seg_meter_and_depth_metrics_hand_cases():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    gt = torch.tensor([[0, 1, 1], [1, 2, 255]])
    m = SegMeter(3)
    m.update(pred, gt)
    s = m.summary()
    # class 0: I=1, U=2; class 1: I=2, U=3; class 2: I=1, U=1 (the 255 pixel is ignored)
    assert s["IoU"] == pytest.approx([1 / 2, 2 / 3, 1.0]) and s["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["aAcc"] == pytest.approx(4 / 5)
    m4 = SegMeter(4)
    m4.update(pred, gt)
    assert m4.summary()["mIoU"] == pytest.approx(s["mIoU"])  # absent classes do not count

    gt_d = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    pr_d = torch.tensor([[1.0, 3.0], [4.0, 9.0]])  # the 0 pixel is invalid
    r = depth_metrics(pr_d, gt_d)
    assert r["rmse"] == pytest.approx(math.sqrt(1 / 3)) and r["abs_rel"] == pytest.approx(0.5 / 3)
    assert r["delta1"] == pytest.approx(2 / 3) and r["delta2"] == pytest.approx(1.0)


def test_sigloss_formula_and_heads():
    pred, tgt = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.5, 0.0, 2.5, 4.0])
    g = torch.log(pred[[0, 2, 3]] + 1e-3) - torch.log(tgt[[0, 2, 3]] + 1e-3)
    assert sigloss(pred, tgt) == pytest.approx(math.sqrt(g.var().item() + 0.15 * g.mean().item() ** 2), rel=1e-5)
    assert sigloss(pred, tgt, warm_up=True) == pytest.approx(math.sqrt(0.15 * g.mean().item() ** 2), rel=1e-5)
    feats = [(torch.randn(2, 8, 3, 4), torch.randn(2, 8)) for _ in range(4)]
    depth = DepthHead(8, 4, 0.001, 7.0)
    out = depth(feats)
    assert out.shape == (2, 1, 12, 16) and out.min() >= 0.001 and out.max() <= 7.0
    assert set(depth.state_dict()) == {"conv_depth.weight", "conv_depth.bias"}
    assert depth.conv_depth.in_channels == 64  # 4 layers x (patch + cls) x 8
    seg = SegHead(8, 1, 5)
    assert seg(feats[:1]).shape == (2, 5, 3, 4) and {k.split(".")[0] for k in seg.state_dict()} == {"bn", "conv_seg"}
    assert official_layers(12, 4) == [2, 5, 8, 11] and official_layers(24, 4) == [4, 11, 17, 23]
    assert official_layers(40, 4) == [9, 19, 29, 39] and official_layers(6, 1) == [5]


def test_slide_logits_covers_and_averages():
    img = torch.randn(1, 3, 30, 47)
    out = slide_logits(lambda x: x[:, :2] * 2, img, crop=20, stride=13, num_classes=2)
    assert torch.allclose(out, img[:, :2] * 2, atol=1e-6)


# ------------------------------------------------------------------------------- end to end (CLI)


def _dense_folders(root, split, xs, ys):
    """Fashion-MNIST images at 56 px with targets: segmentation = class+1 on the garment, 0 elsewhere;
    depth = 1 + 3 x darkness (metres, 16-bit PNG in mm)."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        big = np.asarray(Image.fromarray(x).resize((56, 56), Image.NEAREST))
        (root / split / "img").mkdir(parents=True, exist_ok=True)
        for sub in ("seg", "depth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(big).convert("RGB").save(root / split / "img" / f"{i}.png")
        Image.fromarray(np.where(big > 20, y + 1, 0).astype(np.uint8)).save(root / split / "seg" / f"{i}.png")
        Image.fromarray((1000 + 3000 * (255 - big.astype(np.int32)) // 255).astype(np.uint16)).save(
            root / split / "depth" / f"{i}.png")


def test_dense_probes_end_to_end_on_real_images(tmp_path):
    xtr, ytr = load_fashion_mnist("train", "mini")
    xte, yte = load_fashion_mnist("test", "mini")
    _dense_folders(tmp_path, "train", xtr[:64], ytr[:64])
    _dense_folders(tmp_path, "test", xte[:16], yte[:16])
    common = ["--model", "default", "--workers", "0", "--quiet", "--size", "56",
              "--batch-size", "8"]
    assert run(["eval", "seg", "--train-images", tmp_path / "train/img", "--train-targets", tmp_path / "train/seg",
                "--test-images", tmp_path / "test/img", "--test-targets", tmp_path / "test/seg", "--iters", "300",
                "--lr", "1e-2",
                "--report", tmp_path / "seg.json", "--save-head", tmp_path / "seg.pth", *common]) == 0
    seg = json.loads((tmp_path / "seg.json").read_text())
    assert seg["config"]["num_classes"] == 11 and seg["n_images"] == 16
    gt = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "test/seg").iterdir())])
    background = float((gt == 0).mean())  # predicting background everywhere: aAcc = this, IoU 0 elsewhere
    assert seg["aAcc"] > background + 0.05, (seg["aAcc"], background)
    assert seg["mIoU"] > 1.5 * background / len(np.unique(gt)), seg["mIoU"]
    state = torch.load(tmp_path / "seg.pth", weights_only=True)
    assert state["state_dict"]["conv_seg.weight"].shape == (11, 192, 1, 1)
    assert run(["eval", "depth", "--train-images", tmp_path / "train/img", "--train-targets", tmp_path / "train/depth",
                "--test-images", tmp_path / "test/img", "--test-targets", tmp_path / "test/depth", "--iters", "300",
                "--lr", "1e-2", "--report", tmp_path / "depth.json", *common]) == 0
    depth = json.loads((tmp_path / "depth.json").read_text())
    assert depth["config"]["max_depth"] == pytest.approx(4.0, abs=0.01)  # from the data, not hard-coded
    gts = [np.asarray(Image.open(p), dtype=np.float64) / 1000 for p in sorted((tmp_path / "test/depth").iterdir())]
    mean_rmse = np.mean([np.sqrt(((g - np.mean(np.concatenate([x.ravel() for x in gts]))) ** 2).mean()) for g in gts])
    assert depth["rmse"] < mean_rmse  # better than predicting the mean depth everywhere


def test_eval_linear_and_knn_on_fashion_mnist_spec_with_cache(tmp_path):
    """The IDX dataset spec straight into the protocols; the second protocol reads the feature cache."""
    model = small("dinov2_vits14", depth=4)
    w = save(model, tmp_path / "m.safetensors")
    common = ["--model", w, "--image-size", "28", "--workers", "0", "--quiet",
              "--cache", tmp_path / "cache"]
    assert run(["eval", "linear", "--train", "fashion-mnist:mini", "--test", "fashion-mnist:mini", "--epochs", "2",
                "--save-head", tmp_path / "head.safetensors", "--report", tmp_path / "lin.json", *common]) == 0
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert (lin["n_train"], lin["n_test"], lin["n_classes"]) == (2000, 1000, 10) and len(lin["holdout_accuracy"]) == 52
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert run(["eval", "knn", "--train", "fashion-mnist:mini", "--test", "fashion-mnist:mini", "--ks", "20",
                "--report", tmp_path / "knn.json", *common]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the same features, read from the cache
    assert run(["eval", "linear", "--head", tmp_path / "head.safetensors", "--test", "fashion-mnist:mini",
                "--report", tmp_path / "head.json", *common]) == 0
    head = json.loads((tmp_path / "head.json").read_text())
    assert next(iter(head["top1"].values())) == pytest.approx(next(iter(lin["top1"].values())))


def test_eval_under_torchrun_equals_one_process(tmp_path):
    model = small("dinov2_vits14", depth=1)
    w = save(model, tmp_path / "m.safetensors")
    args = ["eval", "knn", "--train", "fashion-mnist:mini", "--test", "fashion-mnist:mini", "--ks", "10", "20",
            "--model", w, "--image-size", "28", "--workers", "0", "--quiet"]
    assert run([*args, "--report", tmp_path / "one.json"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "dinollama.cli.main", *map(str, args), "--report", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["top1"] == pytest.approx(two["top1"], abs=1e-3) and one["n_train"] == two["n_train"] == 2000


def test_rank_database_faiss_equals_torch_and_truncation():
    from dinollama.dinov2.eval import rank_database, retrieval_map

    g = torch.Generator().manual_seed(0)
    q, db = torch.randn(7, 16, generator=g), torch.randn(300, 16, generator=g)
    full = rank_database(q, db, backend="torch")
    assert torch.equal(full, (F.normalize(q, dim=1) @ F.normalize(db, dim=1).T).argsort(1, descending=True))
    assert torch.equal(rank_database(q, db, backend="faiss"), full)
    assert torch.equal(rank_database(q, db, topk=10, backend="faiss"), full[:, :10])
    assert torch.equal(rank_database(q, db, topk=10, backend="torch"), full[:, :10])
    # a positive outside a truncated ranking counts as not retrieved
    gnd = [{"ok": [int(full[0, 3]), int(full[0, 50])]}] + [{"ok": [int(full[i, 0])]} for i in range(1, 7)]
    truncated = retrieval_map(full[:, :10], gnd)["custom"]["mAP"]
    assert truncated == pytest.approx((1 / 16 + 6) / 7)  # trapezoid: (0 + 1/4) / (2 x 2 positives)
    gnd[0] = {"ok": [int(full[0, 50])]}
    assert retrieval_map(full[:, :10], gnd)["custom"]["mAP"] == pytest.approx(6 / 7)
