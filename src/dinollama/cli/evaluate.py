"""``dinollama eval knn|logreg``: classification protocols on frozen features."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .vision import add_model_args


def labelled_features(source: str, args, classes: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features, labels, class names) from a feature file written by ``embed`` or an image folder
    ``root/<class>/<image>`` (embedded here with ``--model``); the label is the parent folder name."""
    from ..dinov2.embed import FORMATS, read_features
    from .main import main as cli

    path = Path(source)
    if path.suffix not in FORMATS:
        out = Path(tempfile.mkdtemp()) / "features.safetensors"
        cmd = ["embed", str(path), "-o", str(out), "--model", args.model, "--weights", str(args.weights),
               "--dtype", args.dtype, "--workers", str(args.workers), "--quiet"]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        if cli(cmd) != 0:
            raise ValueError(f"{source}: embedding failed")
        path = out
    feats = read_features(path)
    if not feats.paths:
        raise ValueError(f"{path}: no paths stored with the features, so no labels (write it with dinollama embed)")
    names = [Path(p).parent.name for p in feats.paths]
    classes = classes or sorted(set(names))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{source}: classes {unknown[:5]} do not occur in the training set")
    index = {c: i for i, c in enumerate(classes)}
    return feats.cls.float(), torch.tensor([index[n] for n in names]), classes


def _report(args, result: dict) -> int:
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))
    rows = result["top1"]
    width = max(len(str(k)) for k in rows)
    print(f"{result['protocol']} on {result['n_test']} test / {result['n_train']} train images, {result['n_classes']} classes")
    for k, acc in rows.items():
        top5 = f"  top-5 {result['top5'][k]:.4f}" if "top5" in result else ""
        print(f"  {str(k):<{width}}  top-1 {acc:.4f}{top5}")
    return 0


def cmd_knn(args) -> int:
    from ..dinov2.eval import few_shot_indices, knn_votes, topk_accuracy

    xtr, ytr, classes = labelled_features(args.train, args)
    xte, yte, _ = labelled_features(args.test, args, classes)
    tries = [None] if args.n_per_class is None else [few_shot_indices(ytr, args.n_per_class, s) for s in range(args.n_tries)]
    top1: dict[str, list[float]] = {}
    top5: dict[str, list[float]] = {}
    for subset in tries:
        xs, ys = (xtr, ytr) if subset is None else (xtr[subset], ytr[subset])
        votes = knn_votes(xs, ys, xte, ks=tuple(args.ks), temperature=args.temperature, num_classes=len(classes))
        for k, v in votes.items():
            top1.setdefault(f"{k}-NN", []).append(topk_accuracy(v, yte, 1))
            top5.setdefault(f"{k}-NN", []).append(topk_accuracy(v, yte, 5))
    mean = lambda d: {k: sum(v) / len(v) for k, v in d.items()}  # noqa: E731
    result = {"protocol": "knn", "temperature": args.temperature, "n_train": len(xtr), "n_test": len(xte),
              "n_classes": len(classes), "top1": mean(top1), "top5": mean(top5)}
    if args.n_per_class is not None:
        result.update(n_per_class=args.n_per_class, n_tries=args.n_tries, top1_per_try=top1)
    return _report(args, result)


def cmd_logreg(args) -> int:
    from ..dinov2.eval import train_logreg

    xtr, ytr, classes = labelled_features(args.train, args)
    xte, yte, _ = labelled_features(args.test, args, classes)
    res = train_logreg(xtr.numpy(), ytr.numpy(), max_iter=args.max_iter)
    acc = float((res.predict(xte.numpy()) == yte.numpy()).mean())
    return _report(args, {"protocol": "logreg", "C": res.C, "n_train": len(xtr), "n_test": len(xte),
                          "n_classes": len(classes), "top1": {f"logreg (C={res.C:.3g})": acc},
                          "holdout_accuracy": {str(c): a for c, a in res.holdout_accuracy.items()}})


def register(sub) -> None:
    from . import code_eval

    p = sub.add_parser("eval", help="evaluation: DINOv2 protocols on frozen features, Code Llama benchmarks")
    protocols = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    code_eval.register(protocols)
    for name, func, helptext in (("knn", cmd_knn, "weighted k-NN on L2-normalised class tokens"),
                                 ("logreg", cmd_logreg, "L2 logistic regression with C chosen on a train holdout")):
        q = protocols.add_parser(name, help=helptext, description=helptext)
        q.add_argument("--train", required=True, help="feature file from 'dinollama embed' or an image folder root/<class>/...")
        q.add_argument("--test", required=True, help="same kinds as --train")
        add_model_args(q)
        q.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
        q.add_argument("--workers", type=int, default=2)
        q.add_argument("--image-size", type=int, default=None)
        q.add_argument("--report", help="write the JSON report here")
        if name == "knn":
            q.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
            q.add_argument("--temperature", type=float, default=0.07)
            q.add_argument("--n-per-class", type=int, default=None, help="few-shot: training images per class")
            q.add_argument("--n-tries", type=int, default=1, help="few-shot: random draws averaged (seeds 0..n-1)")
        else:
            q.add_argument("--max-iter", type=int, default=1000)
        q.set_defaults(func=func)
