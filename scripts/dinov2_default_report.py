"""k-NN report of a Fashion-MNIST backbone: 20-NN top-1 on the 10k test images with the 60k
training images as the index, for raw pixels, a random-init backbone of the same architecture and
the trained one (official k-NN: cosine, T=0.07 vote weights), with the model's own preprocessing
(``crop_pct`` from its config) and, for comparison, the ImageNet 256 -> 224 centre crop.

    python scripts/dinov2_default_report.py BACKBONE.safetensors [--root /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dinollama.data.mnist import DEBIAN_DIR, load_fashion_mnist
from dinollama.dinov2 import DinoVisionTransformer, load
from dinollama.dinov2.eval import knn_predict
from dinollama.dinov2.hub import saved_config
from dinollama.dinov2.train.data import ArraySource
from dinollama.dinov2.train.monitor import embed_source


def knn_acc(ftr, ytr, fte, yte, k: int) -> float:
    return float((knn_predict(ftr, ytr, fte, ks=(k,))[k] == yte).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbone")
    p.add_argument("--root", default=str(DEBIAN_DIR))
    args = p.parse_args()
    xtr, ytr = load_fashion_mnist("train", args.root)
    xte, yte = load_fashion_mnist("test", args.root)
    ytr_t, yte_t = torch.tensor(ytr), torch.tensor(yte)
    report = {"n_train": len(xtr), "n_test": len(xte)}
    raw_tr = torch.tensor(xtr.reshape(len(xtr), -1), dtype=torch.float32)
    raw_te = torch.tensor(xte.reshape(len(xte), -1), dtype=torch.float32)
    report["raw_pixels_5nn"] = knn_acc(raw_tr, ytr_t, raw_te, yte_t, 5)
    report["raw_pixels_20nn"] = knn_acc(raw_tr, ytr_t, raw_te, yte_t, 20)
    torch.manual_seed(0)
    models = {"random_init": DinoVisionTransformer(saved_config(args.backbone)).eval(), "trained": load(args.backbone)}
    src_tr, src_te = ArraySource(xtr, ytr), ArraySource(xte, yte)
    official_crop = load(args.backbone)
    official_crop.cfg.crop_pct = 0.875  # the ImageNet 256 -> 224 centre crop, for comparison
    models["trained_official_crop"] = official_crop
    for name, model in models.items():
        t = time.perf_counter()
        ftr = embed_source(model, src_tr, list(range(len(xtr))), torch.device("cpu"), None)
        fte = embed_source(model, src_te, list(range(len(xte))), torch.device("cpu"), None)
        report[f"{name}_20nn"] = knn_acc(ftr, ytr_t, fte, yte_t, 20)
        report[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
    report["crop_pct"] = models["trained"].cfg.crop_pct
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
