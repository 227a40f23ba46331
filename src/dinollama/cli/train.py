"""``dinollama train ssl|distill|finetune``: the DINOv2 training recipes."""

from __future__ import annotations

import argparse
import json
import sys

from .options import image_size, nonneg_int, output_folder, positive_float, positive_int, unit_interval


def _config(args):
    from ..dinov2.train import load_config

    if args.config is None and args.preset is None:
        raise ValueError("give a CONFIG file (YAML/JSON, the official format) or --preset NAME")
    return load_config(args.config, args.preset, args.set)


def cmd_ssl(args) -> int:
    from ..dinov2.train import Trainer

    cfg = _config(args)
    path = Trainer(cfg, args.data, args.output, progress=not args.quiet).run()
    print(f"backbone: {path}", file=sys.stderr)
    return 0


def cmd_distill(args) -> int:
    from ..dinov2.train import Trainer
    from ..dinov2.train.distill import load_teacher

    teacher, teacher_cfg = load_teacher(args.teacher)
    cfg = _config(args)
    if cfg.dino.head_n_prototypes != teacher_cfg.dino.head_n_prototypes:
        raise ValueError(f"the student needs the teacher's prototype count: set dino.head_n_prototypes="
                         f"{teacher_cfg.dino.head_n_prototypes} (and ibot.head_n_prototypes)")
    path = Trainer(cfg, args.data, args.output, teacher=teacher, progress=not args.quiet).run()
    print(f"student backbone (EMA): {path}", file=sys.stderr)
    return 0


def cmd_finetune(args) -> int:
    from ..dinov2 import load
    from ..dinov2.train.data import open_source
    from ..dinov2.train.finetune import FinetuneConfig, finetune

    weights = None if args.weights == "random" else args.weights
    backbone = load(args.model, weights=weights)
    if args.image_size:
        backbone.default_image_size = args.image_size
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
                         holdout=args.holdout, precision=args.precision)
    result = finetune(backbone.train(), open_source(args.data), args.output, cfg, progress=not args.quiet)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    return 0


def _common(q: argparse.ArgumentParser, config: bool = True) -> None:
    q.add_argument("--data", required=True,
                   help="image folder (root/<class>/img for labels), file list, 'fashion-mnist[:FOLDER]' or 'fashion-mnist:mini'")
    q.add_argument("--output", required=True, type=output_folder, help="run folder: checkpoint.pth (resumed if present), log.jsonl, backbone.safetensors")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    if config:
        q.add_argument("config", nargs="?", help="YAML/JSON config (sections student, crops, dino, ibot, teacher, optim, train)")
        q.add_argument("--preset", help="named config: vits14, vitb14, vitl14 (official), fmnist-tiny (the shipped default), test-tiny")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override, e.g. --set optim.epochs=10 --set train.batch_size_per_gpu=32")


def register(sub) -> None:
    from . import train_code

    p = sub.add_parser("train", help="training: DINOv2 (ssl, distill, finetune), Code Llama (code, lcft, sft, tokenizer)")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    train_code.register(kinds)
    q = kinds.add_parser("ssl", help="DINO + iBOT + KoLeo self-supervised training (torchrun for several processes)")
    _common(q)
    q.set_defaults(func=cmd_ssl)
    q = kinds.add_parser("distill", help="train a student from a frozen teacher's checkpoint")
    q.add_argument("--teacher", required=True, help="checkpoint.pth of a 'train ssl' run (backbone + heads)")
    _common(q)
    q.set_defaults(func=cmd_distill)
    q = kinds.add_parser("finetune", help="supervised classification fine-tune with layer-wise lr decay")
    q.add_argument("--model", default="default", help="backbone: 'default', a hub name or a checkpoint path")
    q.add_argument("--weights", default="official", help="for hub names: 'official', 'random' or a path")
    q.add_argument("--epochs", type=positive_int, default=10)
    q.add_argument("--batch-size", type=positive_int, default=64)
    q.add_argument("--lr", type=positive_float, default=1e-3)
    q.add_argument("--layer-decay", type=unit_interval, default=0.75)
    q.add_argument("--holdout", type=nonneg_int, default=1000, help="labelled images held out for the reported accuracy")
    q.add_argument("--image-size", type=image_size, default=None, help="default: the model's default_image_size")
    q.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    _common(q, config=False)
    q.set_defaults(func=cmd_finetune)
