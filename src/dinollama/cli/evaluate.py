"""``dinollama eval knn|logreg``: classification protocols on frozen features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .options import add_dtype_arg, image_size, new_file, nonneg_int, output_file, positive_float, positive_int
from .vision import add_model_args


class _Backbone:
    """The ``--model`` backbone and its transform, loaded once and only if a dataset must be embedded."""

    def __init__(self, args) -> None:
        self.args, self.model, self.transform = args, None, None

    def get(self):
        if self.model is None:
            from ..dinov2 import default_transform, optimize_for_inference
            from .vision import _transform, dtype_of, load_model

            model = load_model(self.args)
            self.model = optimize_for_inference(model, dtype=dtype_of(self.args))
            self.transform = default_transform(model) if self.args.image_size is None else _transform(self.args.image_size)
        return self.model, self.transform


def _from_feature_file(path: Path, classes: list[str] | None):
    """Features of ``dinollama embed`` (labels from the parent folders) or a feature cache."""
    from ..dinov2.embed import read_features
    from ..dinov2.eval.features import FeatureSet

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if "blocks" in f.keys():
                return FeatureSet.load(path)
    feats = read_features(path)
    if not feats.paths:
        raise ValueError(f"{path}: no paths stored with the features, so no labels (write it with dinollama embed)")
    names = [Path(p).parent.name for p in feats.paths]
    classes = classes or sorted(set(names))
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"{path}: classes {unknown[:5]} do not occur in the training set")
    index = {c: i for i, c in enumerate(classes)}
    patch_mean = feats.patch.float().mean(1) if feats.patch is not None else None
    return FeatureSet(feats.cls.float()[:, None], patch_mean, torch.tensor([index[n] for n in names]), classes)


def labelled_features(source: str, args, split: str, classes: list[str] | None = None):
    """A :class:`FeatureSet` from a feature file or a dataset spec (image folder ``root/<class>/<image>``,
    labelled csv/jsonl list, ``fashion-mnist[:FOLDER|:mini]``, ``imagenet:ROOT``) embedded with ``--model``
    (cached under ``--cache`` when given)."""
    from ..data.datasets import open_source
    from ..dinov2.embed import FORMATS
    from ..dinov2.eval.features import cache_key, cached_features, extract_features
    from .vision import dtype_of

    path = Path(source)
    if path.suffix in FORMATS and path.is_file():
        return _from_feature_file(path, classes)
    data = open_source(str(source), split, classes)

    n_blocks = 4 if args.cache else args.n_blocks  # a cache serves every protocol

    def compute():
        model, transform = args.backbone.get()
        return extract_features(model, data, transform, n_blocks=n_blocks, batch_size=args.batch_size,
                                workers=args.workers, dtype=dtype_of(args), progress=not args.quiet,
                                desc=f"features ({split})")

    key = cache_key(args.model, args.weights, Path(source).resolve() if path.exists() else source, split,
                    args.image_size, str(dtype_of(args)), len(data))
    feats = cached_features(args.cache, key, compute)
    for name, msg in (feats.failed or {}).items():
        print(f"  skipped {name}: {msg}", file=sys.stderr)
    return feats


def train_test(args):
    """Train and test features (the test split mapped onto the training classes)."""
    from ..distributed import setup

    _, world, device = setup()
    if world > 1 and device.type == "cuda":
        args.device = str(device)
    args.backbone = _Backbone(args)
    if not args.train:
        raise ValueError("--train is required (or --head to evaluate a trained head)")
    train = labelled_features(args.train, args, "train")
    test = labelled_features(args.test, args, "test", train.classes)
    return train, test


def _rank0() -> bool:
    from ..distributed import rank_world

    return rank_world()[0] == 0


def _write(args, result: dict, lines: list[str]) -> int:
    """The JSON report (``--report``) and the table, from rank 0 only."""
    if _rank0():
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(json.dumps(result, indent=2))
        print("\n".join(lines))
    return 0


def _report(args, result: dict) -> int:
    rows = result["top1"]
    width = max(len(str(k)) for k in rows)
    lines = [f"{result['protocol']} on {result['n_test']} test / {result['n_train']} train images, "
             f"{result['n_classes']} classes"]
    for k, acc in rows.items():
        top5 = f"  top-5 {result['top5'][k]:.4f}" if "top5" in result else ""
        lines.append(f"  {k!s:<{width}}  top-1 {acc:.4f}{top5}")
    return _write(args, result, lines)


def _sizes(train, test) -> dict:
    return {"n_train": len(train), "n_test": len(test), "n_classes": len(train.classes)}


def cmd_knn(args) -> int:
    from ..dinov2.eval import few_shot_indices, knn_votes, topk_accuracy

    train, test = train_test(args)
    xtr, ytr, xte, yte = train.cls, train.labels, test.cls, test.labels
    tries = [None] if args.n_per_class is None else [few_shot_indices(ytr, args.n_per_class, s) for s in range(args.n_tries)]
    top1: dict[str, list[float]] = {}
    top5: dict[str, list[float]] = {}
    n_index = len(xtr) if tries[0] is None else len(tries[0])
    ks = sorted({min(k, n_index) for k in args.ks})
    if max(args.ks) > n_index:
        print(f"note: k above the {n_index} training images is capped: reported as {n_index}-NN", file=sys.stderr)
    for subset in tries:
        xs, ys = (xtr, ytr) if subset is None else (xtr[subset], ytr[subset])
        votes = knn_votes(xs, ys, xte, ks=tuple(ks), temperature=args.temperature, num_classes=len(train.classes))
        for k, v in votes.items():
            top1.setdefault(f"{k}-NN", []).append(topk_accuracy(v, yte, 1))
            top5.setdefault(f"{k}-NN", []).append(topk_accuracy(v, yte, 5))
    mean = lambda d: {k: sum(v) / len(v) for k, v in d.items()}
    result = {"protocol": "knn", "temperature": args.temperature, **_sizes(train, test), "top1": mean(top1),
              "top5": mean(top5)}
    if args.n_per_class is not None:
        result.update(n_per_class=args.n_per_class, n_tries=args.n_tries, top1_per_try=top1)
    return _report(args, result)


def cmd_logreg(args) -> int:
    from ..dinov2.eval import train_logreg

    train, test = train_test(args)
    res = train_logreg(train.cls.numpy(), train.labels.numpy(), max_iter=args.max_iter, backend=args.backend,
                       device=args.device)
    acc = float((res.predict(test.cls.numpy()) == test.labels.numpy()).mean())
    return _report(args, {"protocol": "logreg", "C": res.C, **_sizes(train, test),
                          "top1": {f"logreg (C={res.C:.3g})": acc},
                          "holdout_accuracy": {str(c): a for c, a in res.holdout_accuracy.items()}})


def cmd_linear(args) -> int:
    from ..dinov2.eval.linear import LinearProbe, linear_probe

    if args.head:
        args.backbone = _Backbone(args)
        test = labelled_features(args.test, args, "test")
        probe = LinearProbe.load(args.head, embed_dim=test.blocks.shape[-1])
        if len(probe.classes) != len(test.classes):
            print(f"note: the head has {len(probe.classes)} classes, the test set {len(test.classes)}", file=sys.stderr)
        acc = probe.accuracy(test)
        return _report(args, {"protocol": "linear", "head": str(args.head), "n_test": len(test), "n_train": 0,
                              "n_classes": len(probe.classes), "top1": {probe.kind.name(probe.lr): acc}})
    train, test = train_test(args)
    result = linear_probe(train, test, select_on=args.select_on, epochs=args.epochs, batch_size=args.batch_size_heads,
                          progress=not args.quiet and _rank0())
    best = result.best
    if args.save_head and _rank0():
        best.save(args.save_head)
    acc = best.accuracy(test)
    ranked = sorted(result.accuracy.items(), key=lambda kv: -kv[1])
    return _report(args, {"protocol": "linear", **_sizes(train, test), "select_on": args.select_on,
                          "best_head": best.kind.name(best.lr), "top1": {f"linear {best.kind.name(best.lr)}": acc},
                          f"{args.select_on}_accuracy": dict(ranked)})


def _image_list(spec: str) -> list[Path]:
    from ..data import list_images

    paths = list_images(spec)
    if not paths:
        raise ValueError(f"{spec}: no images")
    return paths


def cmd_retrieval(args) -> int:
    from ..data.datasets import FileSource
    from ..dinov2.eval import retrieval_map
    from ..dinov2.eval.features import extract_features
    from ..dinov2.eval.retrieval import load_ground_truth, rank_database
    from ..distributed import setup
    from .vision import dtype_of

    setup()
    gnd = load_ground_truth(args.gnd, args.queries, args.database)
    backbone = _Backbone(args)
    model, transform = backbone.get()
    feats = {}
    for name, paths in (("queries", gnd.query_paths), ("database", gnd.db_paths)):
        src = FileSource(paths, ["0"] * len(paths))
        if name == "queries" and gnd.boxes is not None:
            src = _Cropped(src, gnd.boxes)
        fs = extract_features(model, src, transform, n_blocks=1, patch_mean=False, batch_size=args.batch_size,
                              workers=args.workers, dtype=dtype_of(args), progress=not args.quiet, desc=name)
        if fs.failed:
            raise ValueError(f"unreadable images: {list(fs.failed)[:3]}")
        feats[name] = torch.nn.functional.normalize(fs.cls, dim=1)
    ranks = rank_database(feats["queries"], feats["database"], args.topk, args.backend)
    report = retrieval_map(ranks, gnd.entries, kappas=tuple(args.kappas))
    lines = [f"retrieval: {len(gnd.query_paths)} queries, {len(gnd.db_paths)} database images"]
    for setup_name, r in report.items():
        prs = "  ".join(f"mP@{k} {r[f'mP@{k}']:.4f}" for k in args.kappas)
        lines.append(f"  {setup_name:<7} mAP {r['mAP']:.4f}  {prs}  ({r['queries']} queries)")
    return _write(args, {"protocol": "retrieval", **report}, lines)


class _Cropped:
    """Query images cropped to their ground-truth box (the revisited protocol)."""

    def __init__(self, source, boxes) -> None:
        self.source, self.boxes, self.labels, self.classes = source, boxes, source.labels, source.classes

    def __len__(self) -> int:
        return len(self.source)

    def pil(self, i: int):
        return self.source.pil(i).crop(tuple(round(v) for v in self.boxes[i]))

    def name(self, i: int) -> str:
        return self.source.name(i)


def cmd_dense(args) -> int:
    from ..dinov2.eval.dense import DenseConfig, evaluate_dense, pair_files, train_dense
    from ..distributed import setup
    from .vision import load_model

    setup()
    cfg = DenseConfig.for_task(args.protocol, n_layers=args.layers, size=args.size, iters=args.iters,
                               batch_size=args.batch_size, lr=args.lr, num_classes=getattr(args, "num_classes", None),
                               max_depth=getattr(args, "max_depth", None),
                               depth_scale=getattr(args, "depth_scale", None),
                               reduce_zero_label=getattr(args, "reduce_zero_label", None), workers=args.workers)
    backbone = load_model(args).eval().requires_grad_(False)
    head = train_dense(backbone, pair_files(args.train_images, args.train_targets), cfg, progress=not args.quiet)
    if args.save_head and _rank0():
        torch.save({"config": vars(cfg), "state_dict": head.state_dict()}, args.save_head)
    result = evaluate_dense(backbone, head, pair_files(args.test_images, args.test_targets), cfg,
                            progress=not args.quiet)
    result = {"protocol": args.protocol, **result, "config": vars(cfg)}
    keys = ["mIoU", "mAcc", "aAcc"] if args.protocol == "seg" else ["rmse", "abs_rel", "delta1", "delta2", "delta3"]
    lines = [f"{args.protocol} probe on {result['n_images']} test images ({cfg.n_layers} block(s), {cfg.iters} iterations)",
             "  " + "  ".join(f"{k} {result[k]:.4f}" for k in keys)]
    return _write(args, result, lines)


def _common(q, batch_size: int = 64) -> None:
    add_model_args(q)
    add_dtype_arg(q)
    q.add_argument("--workers", type=nonneg_int, default=2, help="image decoding processes")
    q.add_argument("--image-size", type=image_size, default=None, help="input size (default: the model's own)")
    q.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per forward pass")
    q.add_argument("--report", type=output_file, help="write the JSON report here")
    q.add_argument("--quiet", action="store_true", help="no progress bars")


DATA_HELP = ("feature file from 'dinollama embed', a feature cache, an image folder root/<class>/..., a labelled "
             ".csv (path,label) or .jsonl ({path, label}) list, fashion-mnist[:FOLDER|:mini] or imagenet:ROOT")


def _classification(protocols, name: str, func, helptext: str):
    q = protocols.add_parser(name, help=helptext, description=helptext)
    q.add_argument("--train", required=name != "linear", help=DATA_HELP + " (the 'train' split)")
    q.add_argument("--test", required=True, help="same kinds as --train (the 'test'/'val' split)")
    q.add_argument("--cache", help="folder for feature caches: each (model, data, split) is embedded once")
    _common(q)
    q.set_defaults(func=func, n_blocks=4 if name == "linear" else 1)
    return q


def register(sub) -> None:
    from . import code_eval

    p = sub.add_parser("eval", help="evaluation: DINOv2 protocols on frozen features, Code Llama benchmarks")
    protocols = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    code_eval.register(protocols)
    q = _classification(protocols, "knn", cmd_knn, "weighted k-NN on L2-normalised class tokens")
    q.add_argument("--ks", type=positive_int, nargs="+", default=[10, 20, 100, 200])
    q.add_argument("--temperature", type=positive_float, default=0.07)
    q.add_argument("--n-per-class", type=positive_int, default=None, help="few-shot: training images per class")
    q.add_argument("--n-tries", type=positive_int, default=1, help="few-shot: random draws averaged (seeds 0..n-1)")
    q = _classification(protocols, "logreg", cmd_logreg, "L2 logistic regression with C chosen on a train holdout")
    q.add_argument("--max-iter", type=positive_int, default=1000)
    q.add_argument("--backend", choices=["auto", "sklearn", "torch"], default="auto",
                   help="L-BFGS solver: scikit-learn (CPU) or torch (auto: torch on a GPU)")
    q = _classification(protocols, "linear", cmd_linear,
                        "the 52-head linear probe grid on cached features (or one saved/official head with --head)")
    q.add_argument("--epochs", type=positive_float, default=10)
    q.add_argument("--batch-size-heads", type=positive_int, default=128, help="head training batch (lrs scale by batch/256)")
    q.add_argument("--select-on", choices=["holdout", "test"], default="holdout",
                   help="holdout: choose on 10%% of train, then refit; test: as the official code (published numbers)")
    q.add_argument("--save-head", type=new_file, help="write the chosen head (safetensors)")
    q.add_argument("--head", help="only evaluate this head: one saved by --save-head or an official *_linear[4]_head.pth")

    q = protocols.add_parser("retrieval", help="image retrieval, revisited Oxford/Paris mAP and mP@k")
    q.add_argument("--gnd", required=True, help="ground truth: revisited gnd_*.pkl, or JSON with qimlist/imlist/gnd")
    q.add_argument("--queries", required=True, help="folder of the query images (names from the gnd file)")
    q.add_argument("--database", required=True, help="folder of the database images")
    q.add_argument("--kappas", type=positive_int, nargs="+", default=[1, 5, 10])
    q.add_argument("--topk", type=positive_int, default=None, help="rank only the top k database images (default: all)")
    q.add_argument("--backend", choices=["auto", "torch", "faiss"], default="auto",
                   help="search: faiss (exact inner product) when installed and the database is >= 50k, else torch")
    _common(q)
    q.set_defaults(func=cmd_retrieval)

    for task, helptext in (("depth", "linear depth probe (official linear depther head, SigLoss)"),
                           ("seg", "linear segmentation probe (BatchNorm + 1x1 conv, sliding-window mIoU)")):
        q = protocols.add_parser(task, help=helptext, description=helptext)
        for split in ("train", "test"):
            q.add_argument(f"--{split}-images", required=True, help=f"{split} images folder")
            q.add_argument(f"--{split}-targets", required=True, help=f"{split} targets folder (same file stems)")
        q.add_argument("--layers", type=int, choices=[1, 4], default=1, help="1: last block; 4: four evenly spaced")
        q.add_argument("--size", type=image_size, default=None, help="crop / short side (default 512 seg, 416 depth)")
        q.add_argument("--iters", type=positive_int, default=None, help="training iterations (official: 40000 seg, 38400 depth)")
        q.add_argument("--lr", type=positive_float, default=None, help="AdamW lr (default 1e-3 seg, 1e-4 depth)")
        q.add_argument("--save-head", type=new_file, help="write the trained head (torch .pth, state_dict + config)")
        if task == "depth":
            q.add_argument("--max-depth", type=positive_float, default=None, help="default: the largest training depth")
            q.add_argument("--depth-scale", type=positive_float, default=None, help="integer PNG units per metre (default 1000)")
        else:
            q.add_argument("--num-classes", type=positive_int, default=None, help="default: largest training label + 1")
            q.add_argument("--reduce-zero-label", action="store_true", default=None, help="label 0 is ignored (ADE20k)")
        _common(q, batch_size=16)
        q.set_defaults(func=cmd_dense)
