"""``dinollama embed|pca|classify|convert|download``: the vision commands."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser, default: str = "default") -> None:
    p.add_argument("--model", default=default, help="'default' (the shipped small backbone trained on Fashion-MNIST), a hub "
                   f"name (dinov2_vit{{s,b,l,g}}14[_reg]) or a checkpoint path (default {default})")
    p.add_argument("--weights", default="official",
                   help="'official' (download/cache), 'random' (seed 0), or a checkpoint path in any supported format")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_model(args) -> torch.nn.Module:
    from ..dinov2 import load

    weights = None if args.weights == "random" else args.weights
    if args.weights == "random":
        # Seeded, so that separate runs (e.g. train and test embeddings) share one random network.
        torch.manual_seed(0)
        print(f"note: {args.model} with random weights (seed 0; a baseline, not a trained model)", file=sys.stderr)
    return load(args.model, weights=weights, device=args.device)


def cmd_embed(args) -> int:
    from ..data import list_images
    from ..dinov2 import default_transform, optimize_for_inference
    from ..dinov2.embed import FORMATS, embed_paths, merge_parts, write_features
    from ..distributed import setup

    out = Path(args.out)
    if out.suffix not in FORMATS:
        raise ValueError(f"--out {out}: use a name ending in {', '.join(FORMATS)}")
    paths = []
    for src in args.inputs:
        paths += list_images(src)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    rank, world, _ = setup()
    if world > 1 and args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model = load_model(args)
    fast = optimize_for_inference(model, dtype=DTYPES[args.dtype], rows_hint=args.batch_size * 257)
    transform = default_transform(model) if args.image_size is None else _transform(args.image_size)
    parts = out.with_name(out.name + ".parts")
    manifest = {"inputs": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest(), "model": args.model,
                "weights": str(args.weights), "patch": args.patch_tokens, "size": transform.crop_size,
                "world": world, "chunk": args.chunk_size}
    if rank == 0:
        _check_manifest(parts, manifest, args.overwrite)
    if world > 1:
        torch.distributed.barrier()
    embed_paths(fast, paths, transform, parts, batch_size=args.batch_size, workers=args.workers,
                patch_tokens=args.patch_tokens, dtype=DTYPES[args.dtype], chunk_size=args.chunk_size,
                on_error=args.on_error, progress=not args.quiet)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        result = merge_parts(paths, parts)
        written = write_features(result, out, args.model)
        shutil.rmtree(parts)
        print(f"{len(result.paths)} images -> {', '.join(map(str, written))}; {len(result.failed)} failed")
        for msg in result.failed.values():
            print(f"  failed: {msg}", file=sys.stderr)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _transform(size: int):
    from ..dinov2 import EvalTransform

    return EvalTransform(round(size * 256 / 224), size)


def _check_manifest(parts: Path, manifest: dict, overwrite: bool) -> None:
    file = parts / "manifest.json"
    if parts.exists() and (overwrite or not file.exists()):
        shutil.rmtree(parts)
    if file.exists():
        old = json.loads(file.read_text())
        if old != manifest:
            raise ValueError(f"{parts} holds an interrupted run with other settings ({old}); "
                             "rerun with --overwrite to start again")
        print(f"resuming from {parts}", file=sys.stderr)
        return
    parts.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(manifest))


def cmd_pca(args) -> int:
    from ..data import load_image
    from ..dinov2.pca import patch_pca, pca_figure

    model = load_model(args)
    images = [load_image(p) for p in args.images]
    with torch.inference_mode():
        maps = patch_pca(model, images, size=args.size, threshold=args.threshold)
    pca_figure(images, maps).save(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_classify(args) -> int:
    from ..data import load_image
    from ..dinov2 import default_transform

    args.model = args.model if args.model.endswith("_lc") else args.model + "_lc"
    model = load_model(args)
    tf = default_transform(model.backbone)
    for path in args.images:
        with torch.inference_mode():
            top = model.predict(tf(load_image(path))[None].to(args.device), topk=args.topk)[0]
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def cmd_convert(args) -> int:
    from ..dinov2 import load, save

    model = load(args.checkpoint)  # a path (architecture inferred) or a hub name with official weights
    out = save(model, args.output, format=args.format)
    print(f"wrote {out} ({args.format})")
    return 0


def cmd_download(args) -> int:
    from ..dinov2 import weight_url
    from ..io import fetch

    for name in args.names:
        core = name.removesuffix("_lc")
        urls = [weight_url(core)] + ([weight_url(core, args.layers)] if name.endswith("_lc") else [])
        for url in urls:
            print(fetch(url))
    return 0


def register(sub) -> None:
    p = sub.add_parser("embed", help="extract features of many images into one file",
                       description="Extract final-norm class (and optionally patch) tokens of images.")
    p.add_argument("inputs", nargs="+", help="image folders (recursive), image files, or .txt/.csv/.jsonl file lists")
    p.add_argument("--out", "-o", required=True, help="output file: .safetensors, .npy or .parquet")
    add_model_args(p)
    p.add_argument("--patch-tokens", action="store_true", help="also store the patch tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")
    p.add_argument("--image-size", type=int, default=None, help="center-crop size (default: the model's)")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="unreadable images: report and skip, or stop")
    p.add_argument("--overwrite", action="store_true", help="discard an interrupted run instead of resuming it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("pca", help="picture of the first 3 PCA components of patch features")
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    add_model_args(p)
    p.add_argument("--size", type=int, default=448, help="input side in pixels (rounded down to a patch multiple)")
    p.add_argument("--threshold", type=float, default=0.0, help="foreground threshold on the first component")
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("classify", help="ImageNet top-k with the official linear heads (*_lc)")
    p.add_argument("images", nargs="+")
    add_model_args(p, default="dinov2_vits14")
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("convert", help="export a backbone checkpoint to safetensors, .pth or a Hugging Face folder")
    p.add_argument("checkpoint", help="any supported checkpoint file/folder, or a hub name (official weights)")
    p.add_argument("output")
    p.add_argument("--format", choices=["safetensors", "pth", "hf"], default="safetensors")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="fetch official weights into the cache (resumable)")
    p.add_argument("names", nargs="+", help="hub names, e.g. dinov2_vits14 dinov2_vitb14_reg_lc")
    p.add_argument("--layers", type=int, choices=[1, 4], default=4, help="linear head variant for *_lc names")
    p.set_defaults(func=cmd_download)
