"""DINOv2 SSL training throughput on CPU: our trainer vs a plain loop, same model and batch.

    python bench/dinov2_train.py [--preset vits14] [--batch 8] [--iters 12] [--data FOLDER]

Both run the official ViT-S/14 recipe (2 x 224 px global + 8 x 98 px local crops, 65536
prototypes, iBOT, KoLeo) under bf16 autocast. The plain loop is what one writes first: crops made
in the training process, the fused SDPA kernel for attention. Ours: crops in a worker process and
two-matmul attention (the CPU's fused bf16 kernel is slow for these short sequences). Prints
images/s of each, their ratio, and our share of time waiting for data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dinollama.dinov2.train import Trainer, load_config


def measure(cfg, data: str, iters: int, plain: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, data, out, progress=False)
        if plain:
            for m in trainer.objective.modules():
                if hasattr(m, "bmm_attention"):
                    m.bmm_attention = False
        warm = 2
        trainer.run(stop_at=warm + iters)
        logs = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
        timed = [r for r in logs if "images_per_s" in r and r["iteration"] >= warm]
        batch = cfg.train.batch_size_per_gpu
        seconds = sum(batch / r["images_per_s"] for r in timed)
        waiting = sum(r["data_share"] * batch / r["images_per_s"] for r in timed)
        return len(timed) * batch / seconds, waiting / seconds


def photo_folder(root: Path, n: int = 96) -> str:
    """RGB images of smooth random colour fields (320 x 256 JPEG), so decoding and colour
    augmentation cost what they cost on photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 256), Image.BICUBIC).save(root / f"{i:03d}.jpg", quality=90)
    return str(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vits14")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--data", default=None, help="image folder (default: 96 generated 320x256 RGB JPEGs)")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    data = args.data or photo_folder(Path(tmp.name))
    base = ["train.saveckp_every=1000000", "train.log_every=1", f"train.batch_size_per_gpu={args.batch}"]
    ours_cfg = load_config(preset=args.preset, overrides=base + ["train.num_workers=1"])
    plain_cfg = load_config(preset=args.preset, overrides=base + ["train.num_workers=0"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, batch {args.batch}, "
          f"{args.iters} timed iterations, bf16 autocast")
    plain, _ = measure(plain_cfg, data, args.iters, plain=True)
    ours, share = measure(ours_cfg, data, args.iters, plain=False)
    print(f"plain loop : {plain:6.1f} img/s")
    print(f"ours       : {ours:6.1f} img/s   (data wait {100 * share:.0f}% of step time)")
    print(f"ours/plain : {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
