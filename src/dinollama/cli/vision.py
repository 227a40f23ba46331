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
from PIL import Image

from .options import (
    add_device_arg,
    add_dtype_arg,
    finite_float,
    image_size,
    nonneg_int,
    positive_int,
    resolve_dtype,
    writable_file,
    writable_folder,
)


def add_model_args(p: argparse.ArgumentParser, default: str = "default") -> None:
    p.add_argument("--model", default=default, help="'default' (the shipped small backbone trained on Fashion-MNIST), a hub "
                   f"name (dinov2_vit{{s,b,l,g}}14[_reg]) or a checkpoint path (default {default})")
    p.add_argument("--weights", default="official",
                   help="'official' (download/cache; with --model default or a path: that model's own weights), "
                        "'random' (seed 0), or a checkpoint path in any supported format for a hub name")
    add_device_arg(p)


def dtype_of(args) -> torch.dtype:
    return resolve_dtype(args.dtype, args.device)


def check_model_args(args) -> None:
    """Refuse option combinations that would be silently ignored (before any work is done)."""
    from ..dinov2.hub import BACKBONES, CLASSIFIERS

    named = args.model in BACKBONES + CLASSIFIERS
    if not named and args.weights not in ("official", "random"):
        raise ValueError(f"--weights {args.weights} has no effect with --model {args.model}, which brings its own "
                         f"weights: pass the checkpoint as --model {args.weights}, or a hub name as --model")
    if not named and args.model != "default" and args.weights == "random":
        raise ValueError(f"--weights random needs a hub name or 'default' as --model, not the file {args.model}")


def load_model(args) -> torch.nn.Module:
    from ..dinov2 import load

    check_model_args(args)
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
    writable_file(out, "--out")
    check_model_args(args)
    paths = []
    for src in args.inputs:
        paths += list_images(src)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    rank, world, _ = setup()
    if world > 1 and args.device == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model = load_model(args)
    fast = optimize_for_inference(model, dtype=dtype_of(args), rows_hint=args.batch_size * 257)
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
                patch_tokens=args.patch_tokens, dtype=dtype_of(args), chunk_size=args.chunk_size,
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

    out = writable_file(args.output, "-o")
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"-o {out}: Pillow cannot write {out.suffix or 'files without an extension'}; use .png")
    images = [load_image(p) for p in args.images]
    model = load_model(args)
    with torch.inference_mode():
        maps = patch_pca(model, images, size=args.size, threshold=args.threshold)
    pca_figure(images, maps).save(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_classify(args) -> int:
    from ..data import load_image
    from ..dinov2 import default_transform
    from ..dinov2.hub import BACKBONES

    if args.model == "default":
        return _classify_default(args)
    core = args.model.removesuffix("_lc")
    if core not in BACKBONES:
        raise ValueError(f"--model {args.model}: classify needs a hub name with an official ImageNet head "
                         f"({', '.join(BACKBONES)}) or 'default' (Fashion-MNIST classes by k-NN)")
    images = [(path, load_image(path)) for path in args.images]
    args.model = core + "_lc"
    model = load_model(args)
    tf = default_transform(model.backbone)
    for path, img in images:
        with torch.inference_mode():
            top = model.predict(tf(img)[None].to(args.device), topk=args.topk)[0]
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def _classify_default(args, k: int = 20) -> int:
    """The shipped backbone has no ImageNet head: its classes are Fashion-MNIST's, by the official
    k-NN vote over the shipped 2,000 training images."""
    from ..data import load_image
    from ..data.datasets import open_source
    from ..dinov2 import default_transform
    from ..dinov2.eval import extract_features, knn_votes

    images = [(path, load_image(path)) for path in args.images]
    model = load_model(args)
    tf = default_transform(model)
    train = extract_features(model, open_source("fashion-mnist:mini", "train"), tf, n_blocks=1, patch_mean=False,
                             progress=False)
    with torch.inference_mode():
        queries = model(torch.stack([tf(img) for _, img in images]).to(args.device)).float().cpu()
    votes = knn_votes(train.cls, train.labels, queries, ks=(k,), num_classes=len(train.classes))[k]
    for (path, _), v in zip(images, votes):
        p, idx = v.topk(min(args.topk, len(train.classes)))
        print(f"{path}: " + ", ".join(f"{train.classes[i]} {x:.3f}" for x, i in zip(p.tolist(), idx.tolist())))
    return 0


def cmd_convert(args) -> int:
    from ..dinov2 import load, save

    fmt = args.format or ("onnx" if str(args.output).endswith(".onnx") else "safetensors")
    if fmt == "hf":
        writable_folder(args.output, "OUTPUT")
    else:
        writable_file(args.output, "OUTPUT", parents=True)
    if (args.image_size or args.any_size) and fmt != "onnx":
        flag = "--image-size" if args.image_size else "--any-size"
        raise ValueError(f"{flag} only applies to --format onnx (the {fmt} file holds every size)")
    model = load(args.checkpoint)  # a path (architecture inferred), 'default', or a hub name with official weights
    if fmt == "onnx":
        from ..dinov2.onnx import export_onnx

        backbone = getattr(model, "backbone", model)
        size = args.image_size or [backbone.default_image_size] * 2
        out = export_onnx(model, args.output, tuple(size), dynamic_size=args.any_size)
        p = backbone.patch_size
        shape = f"H x W (any multiples of {p})" if args.any_size else f"{size[0]} x {size[1]}"
        print(f"wrote {out} (onnx, opset 18, input image N x 3 x {shape})")
        return 0
    if getattr(model, "backbone", None) is not None:
        raise ValueError(f"{args.checkpoint}: a classifier (*_lc) converts to onnx only; convert the backbone name")
    out = save(model, args.output, format=fmt)
    print(f"wrote {out} ({fmt})")
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
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_dtype_arg(p)
    p.add_argument("--workers", type=nonneg_int, default=2, help="image-decoding worker processes")
    p.add_argument("--image-size", type=image_size, default=None, help="center-crop size (default: the model's)")
    p.add_argument("--chunk-size", type=positive_int, default=1024, help="images per resumable chunk")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="unreadable images: report and skip, or stop")
    p.add_argument("--overwrite", action="store_true", help="discard an interrupted run instead of resuming it")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("pca", help="picture of the first 3 PCA components of patch features")
    p.add_argument("images", nargs="+")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    add_model_args(p)
    p.add_argument("--size", type=image_size, default=448, help="input side in pixels (rounded down to a patch multiple)")
    p.add_argument("--threshold", type=finite_float, default=0.0, help="foreground threshold on the first component")
    p.set_defaults(func=cmd_pca)

    p = sub.add_parser("classify", help="ImageNet top-k with the official linear heads (*_lc); 'default': "
                       "Fashion-MNIST classes by k-NN")
    p.add_argument("images", nargs="+")
    add_model_args(p, default="dinov2_vits14")
    p.add_argument("--topk", type=positive_int, default=5)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("convert", help="export a backbone to safetensors, .pth, a Hugging Face folder or ONNX")
    p.add_argument("checkpoint", help="any supported checkpoint file/folder, 'default', or a hub name (official "
                   "weights; *_lc classifiers for onnx)")
    p.add_argument("output")
    p.add_argument("--format", choices=["safetensors", "pth", "hf", "onnx"], default=None,
                   help="default: onnx for a .onnx OUTPUT, else safetensors")
    p.add_argument("--image-size", type=image_size, nargs=2, metavar=("H", "W"), default=None,
                   help="onnx: the input size the graph takes (multiples of 14; default: the model's default_image_size)")
    p.add_argument("--any-size", action="store_true",
                   help="onnx: a graph for any multiple of 14, the position resize as an ONNX Resize (--image-size "
                   "is then the size traced)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("download", help="fetch official weights into the cache (resumable)")
    p.add_argument("names", nargs="+", help="hub names, e.g. dinov2_vits14 dinov2_vitb14_reg_lc")
    p.add_argument("--layers", type=int, choices=[1, 4], default=4, help="linear head variant for *_lc names")
    p.set_defaults(func=cmd_download)
