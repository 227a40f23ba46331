"""Feature-caching throughput (images/s) of the eval pipeline vs a plain transformers loop, same run.

    python bench/eval_features.py [--model s] [--images 256] [--size 224] [--dtypes fp32 bf16] [--workers 1]

Both sides read the same real images (the committed Fashion-MNIST subset, decoded and resized by the
same transform in DataLoader workers) and produce the class tokens of the last 4 blocks and the mean
patch token, i.e. everything the k-NN, logistic-regression and linear-probe protocols need. Ours:
``extract_features`` on ``optimize_for_inference``; reference: ``Dinov2Model(output_hidden_states)``.
The two run alternately, twice each, and the best of each is compared.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from dinov2_inference import DTYPES, hf_copy  # bench/ (the script's folder is on sys.path)
from torch.utils.data import DataLoader

from dinollama.data.datasets import Transformed, collate_skipping_errors, open_source
from dinollama.dinov2 import build, optimize_for_inference
from dinollama.dinov2.eval.features import extract_features
from dinollama.dinov2.transforms import EvalTransform


def hf_features(hf, source, transform, batch: int, workers: int, dtype) -> int:
    loader = DataLoader(Transformed(source, list(range(len(source))), transform), batch_size=batch,
                        num_workers=workers, collate_fn=collate_skipping_errors)
    n = 0
    with torch.inference_mode():
        for _, x, _ in loader:
            out = hf(pixel_values=x.to(dtype), output_hidden_states=True)
            states = [hf.layernorm(h) for h in out.hidden_states[-4:]]
            torch.cat([s[:, 0] for s in states] + [states[-1][:, 1:].mean(1)], 1).float()
            n += len(x)
    return n

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="s")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    source = open_source("fashion-mnist:mini", "test")
    source.images = source.images[: args.images]
    source.labels = source.labels[: args.images]
    transform = EvalTransform(round(args.size * 256 / 224), args.size)
    for name in args.dtypes:
        dtype = DTYPES[name]
        model = build(f"dinov2_vit{args.model}14").eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_copy(model, "sdpa", Path(tmp) / "h").to(dtype)
        ours = optimize_for_inference(model, dtype=dtype, rows_hint=args.batch * 257)
        best = {"ours": float("inf"), "hf-sdpa": float("inf")}
        for _ in range(2):
            t = time.perf_counter()
            extract_features(ours, source, transform, n_blocks=4, batch_size=args.batch, workers=args.workers,
                             dtype=dtype, progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - t)
            t = time.perf_counter()
            hf_features(hf, source, transform, args.batch, args.workers, dtype)
            best["hf-sdpa"] = min(best["hf-sdpa"], time.perf_counter() - t)
        rate = {k: args.images / v for k, v in best.items()}
        print(f"ViT-{args.model.upper()}/14 {name} {args.size}px batch {args.batch}, {args.images} images, "
              f"{args.workers} worker(s): ours {rate['ours']:.1f} img/s, hf-sdpa {rate['hf-sdpa']:.1f} img/s, "
              f"ratio {rate['ours'] / rate['hf-sdpa']:.2f}x")

if __name__ == "__main__":
    main()
