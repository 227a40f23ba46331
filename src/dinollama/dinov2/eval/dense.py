"""Linear dense probes on frozen patch features, without mmcv: monocular depth and semantic segmentation.

Depth follows the official linear depther (``hub/depthers.py``): patch maps of the chosen blocks
(un-normed) each concatenated with their class token broadcast over the map, resized to the first
map's size x ``upsample`` (4), one 1x1 conv to 256 bins uniform in ``[min_depth, max_depth]``,
"linear" normalisation (``relu + 0.1`` then divide by the sum) and the expected depth; SigLoss
(with its 100-step warm-up). Despite the official name ``BNHead`` it has no BatchNorm (commented out
there); segmentation's head does: BatchNorm then a 1x1 conv over the (resized, concatenated) patch
maps, cross-entropy with ignore index 255, sliding-window inference. ``max_depth`` comes from the
training targets unless given (the official hub head hard-codes 80 m).

Datasets are folder pairs: ``images/<name>.<ext>`` with ``targets/<name>.png|.npy|.tif`` (depth as
16-bit PNG divided by ``depth_scale`` or float .npy in metres; segmentation as label PNGs).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...data.images import IMAGE_EXTENSIONS, load_image
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, resize_short_side, to_tensor

IGNORE_INDEX = 255
TARGET_EXTENSIONS = (".png", ".npy", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------- data


def pair_files(images: str | Path, targets: str | Path) -> list[tuple[Path, Path]]:
    """(image, target) pairs matched by file stem; an image without a target is an error that names it."""
    images, targets = Path(images), Path(targets)
    for folder in (images, targets):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (give --images DIR and --targets DIR)")
    by_stem = {p.stem: p for p in sorted(targets.iterdir()) if p.suffix.lower() in TARGET_EXTENSIONS}
    imgs = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = [p.name for p in imgs if p.stem not in by_stem]
    if missing:
        raise ValueError(f"{targets}: no target for {missing[:3]} ({len(missing)} of {len(imgs)} images)")
    if not imgs:
        raise ValueError(f"{images}: no images")
    return [(p, by_stem[p.stem]) for p in imgs]


def load_target(path: Path, task: str, depth_scale: float = 1000.0, reduce_zero_label: bool = False) -> Tensor:
    """Depth in metres (float, 0 = invalid) or class indices (long, 255 = ignore), ``(H, W)``."""
    if path.suffix == ".npy":
        arr = np.load(path)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: a target must be a single-channel map, got shape {arr.shape}")
    if task == "depth":  # integer maps (16-bit PNG) are scaled, float maps are metres already
        scaled = arr.dtype.kind in "ui"
        arr = arr.astype(np.float32)
        return torch.from_numpy(arr / np.float32(depth_scale) if scaled else arr)
    labels = torch.from_numpy(arr.astype(np.int64))
    if reduce_zero_label:  # ADE20k: 0 is "other", classes 1..150 become 0..149
        labels = torch.where(labels == 0, IGNORE_INDEX, labels - 1)
        labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
    return labels


class DenseDataset(torch.utils.data.Dataset):
    """Image normalised with its short side resized to ``size``; training samples are random
    ``size x size`` crops with a random flip, the target resized alike (nearest)."""

    def __init__(self, pairs, task: str, size: int, train: bool, depth_scale: float = 1000.0,
                 reduce_zero_label: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0) -> None:
        self.pairs, self.task, self.size, self.train = pairs, task, size, train
        self.depth_scale, self.reduce_zero_label, self.mean, self.std, self.seed = depth_scale, reduce_zero_label, mean, std, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img_path, tgt_path = self.pairs[i]
        img = load_image(img_path)
        tgt = load_target(tgt_path, self.task, self.depth_scale, self.reduce_zero_label)
        if tgt.shape != (img.height, img.width):
            raise ValueError(f"{tgt_path}: target {tuple(tgt.shape)} does not match image {img.height}x{img.width}")
        x = to_tensor(resize_short_side(img, self.size), self.mean, self.std)
        if not self.train:
            return x, tgt
        t = F.interpolate(tgt[None, None].float(), size=x.shape[1:], mode="nearest")[0, 0]
        top = int(torch.randint(x.shape[1] - self.size + 1, (1,)))
        left = int(torch.randint(x.shape[2] - self.size + 1, (1,)))
        x, t = x[:, top : top + self.size, left : left + self.size], t[top : top + self.size, left : left + self.size]
        if torch.rand(1).item() < 0.5:
            x, t = x.flip(-1), t.flip(-1)
        return x, t if self.task == "depth" else t.long()


# ---------------------------------------------------------------------------------------- heads


OFFICIAL_FOUR = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}  # S/B, L, g (hub/depthers.py)


def official_layers(depth: int, n: int) -> list[int]:
    """The blocks the official dense heads read: the last one, or the hub's four (evenly spaced otherwise)."""
    if n == 1:
        return [depth - 1]
    if n == 4 and depth in OFFICIAL_FOUR:
        return OFFICIAL_FOUR[depth]
    return [round((i + 1) * depth / n) - 1 for i in range(n)]


def backbone_maps(backbone, x: Tensor, layers: Sequence[int], norm: bool) -> list[tuple[Tensor, Tensor]]:
    """(patch map ``(B, D, h, w)``, class token ``(B, D)``) per block, image padded to whole patches
    (centred, as the official dense heads)."""
    p = backbone.patch_size
    h, w = x.shape[-2:]
    ph, pw = (-h) % p, (-w) % p
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    with torch.no_grad():
        return list(backbone.get_intermediate_layers(x, n=list(layers), reshape=True, return_class_token=True, norm=norm))


def _resize_concat(maps: list[Tensor], scale: int = 1) -> Tensor:
    size = [s * scale for s in maps[0].shape[-2:]]
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)


class DepthHead(nn.Module):
    """The official linear depth head (``decode_head.conv_depth`` in its checkpoints)."""

    def __init__(self, embed_dim: int, n_layers: int, min_depth: float, max_depth: float, n_bins: int = 256,
                 upsample: int = 4) -> None:
        super().__init__()
        self.min_depth, self.max_depth, self.n_bins, self.upsample = min_depth, max_depth, n_bins, upsample
        self.conv_depth = nn.Conv2d(2 * embed_dim * n_layers, n_bins, kernel_size=1)

    def forward(self, feats: list[tuple[Tensor, Tensor]]) -> Tensor:
        maps = [torch.cat([m, c[:, :, None, None].expand_as(m)], 1) for m, c in feats]
        logit = torch.relu(self.conv_depth(_resize_concat(maps, self.upsample))) + 0.1
        prob = logit / logit.sum(1, keepdim=True)
        bins = torch.linspace(self.min_depth, self.max_depth, self.n_bins, device=logit.device)
        return torch.einsum("bkhw,k->bhw", prob, bins)[:, None]


class SegHead(nn.Module):
    """BatchNorm + 1x1 conv over patch maps (``decode_head.bn`` / ``decode_head.conv_seg``)."""

    def __init__(self, embed_dim: int, n_layers: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim * n_layers)
        self.conv_seg = nn.Conv2d(embed_dim * n_layers, num_classes, kernel_size=1)

    def forward(self, feats: list[tuple[Tensor, Tensor]]) -> Tensor:
        return self.conv_seg(self.bn(_resize_concat([m for m, _ in feats])))


def sigloss(pred: Tensor, target: Tensor, warm_up: bool = False, max_depth: float | None = None) -> Tensor:
    """Scale-invariant log loss (AdaBins/official): ``sqrt(var(g) + 0.15 mean(g)^2)``, ``g = log(p+e) - log(t+e)``
    over valid pixels (``0 < t <= max_depth``); the warm-up variant drops the variance term."""
    valid = target > 0 if max_depth is None else (target > 0) & (target <= max_depth)
    g = torch.log(pred[valid] + 1e-3) - torch.log(target[valid] + 1e-3)
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


# -------------------------------------------------------------------------------------- metrics


def depth_metrics(pred: Tensor, gt: Tensor, min_depth: float = 1e-3, max_depth: float | None = None) -> dict[str, float]:
    """The standard monocular-depth metrics of one image over valid pixels (``min_depth < gt < max_depth``)."""
    valid = gt > min_depth
    if max_depth is not None:
        valid &= gt < max_depth
    p, g = pred[valid].double().clamp_min(min_depth), gt[valid].double()
    ratio = torch.maximum(p / g, g / p)
    return {
        "abs_rel": float(((p - g).abs() / g).mean()),
        "sq_rel": float(((p - g) ** 2 / g).mean()),
        "rmse": float(((p - g) ** 2).mean().sqrt()),
        "rmse_log": float(((p.log() - g.log()) ** 2).mean().sqrt()),
        "log10": float((p.log10() - g.log10()).abs().mean()),
        "delta1": float((ratio < 1.25).double().mean()),
        "delta2": float((ratio < 1.25**2).double().mean()),
        "delta3": float((ratio < 1.25**3).double().mean()),
    }


class SegMeter:
    """Per-class intersection and union areas summed over a dataset (mmseg's ``mean_iou``)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.intersect = torch.zeros(num_classes, dtype=torch.float64)
        self.union = torch.zeros(num_classes, dtype=torch.float64)
        self.label = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: Tensor, gt: Tensor) -> None:
        keep = gt != IGNORE_INDEX
        p, g = pred[keep], gt[keep]
        n = self.num_classes
        inter = torch.bincount(p[p == g], minlength=n)[:n]
        area_p, area_g = torch.bincount(p, minlength=n)[:n], torch.bincount(g, minlength=n)[:n]
        self.intersect += inter
        self.union += area_p + area_g - inter
        self.label += area_g

    def summary(self) -> dict:
        iou = self.intersect / self.union
        acc = self.intersect / self.label
        return {"mIoU": float(np.nanmean(iou.numpy())), "mAcc": float(np.nanmean(acc.numpy())),
                "aAcc": float(self.intersect.sum() / self.label.sum()), "IoU": [float(v) for v in iou]}


def slide_logits(fn, img: Tensor, crop: int, stride: int, num_classes: int) -> Tensor:
    """mmseg's ``slide`` inference: overlapping ``crop`` windows every ``stride`` pixels, logits averaged."""
    b, _, h, w = img.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = img.new_zeros(b, num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out[:, :, y1:y2, x1:x2] += fn(img[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


# ------------------------------------------------------------------------------------ the probe


@dataclass
class DenseConfig:
    """Defaults after the official linear configs (iterations, batch 16 in total, AdamW)."""

    task: str = "seg"  # "seg" or "depth"
    n_layers: int = 1  # 1: the last block ("linear"), 4: four evenly spaced blocks ("linear4")
    size: int = 512  # training crop / inference short side
    iters: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int | None = None  # None: 3.75% of iters (1,500 of the official 40,000)
    num_classes: int | None = None
    min_depth: float = 1e-3
    max_depth: float | None = None  # None: the largest training depth
    depth_scale: float = 1000.0
    reduce_zero_label: bool = False
    stride: int | None = None  # sliding-window stride; None: 2/3 of size
    workers: int = 2
    seed: int = 0

    @classmethod
    def for_task(cls, task: str, **overrides) -> DenseConfig:
        base = {"seg": {}, "depth": {"iters": 38400, "lr": 1e-4, "weight_decay": 1e-2, "size": 416, "warmup_iters": 0}}
        if task not in base:
            raise ValueError(f"task must be 'seg' or 'depth', not {task!r}")
        return cls(task=task, **{**base[task], **{k: v for k, v in overrides.items() if v is not None}})


def scan_targets(pairs, cfg: DenseConfig) -> float:
    """Largest valid depth (for ``max_depth``) or number of classes (largest label + 1) over the targets."""
    most = 0.0
    for _, t in pairs:
        tgt = load_target(t, cfg.task, cfg.depth_scale, cfg.reduce_zero_label)
        vals = tgt[tgt != IGNORE_INDEX] if cfg.task == "seg" else tgt[tgt > 0]
        if len(vals):
            most = max(most, float(vals.max()))
    return most


def _lr_factor(step: int, cfg: DenseConfig) -> float:
    """Linear warm-up then poly(1.0) decay to 0 (mmseg's schedule of the official configs)."""
    warmup = round(cfg.iters * 0.0375) if cfg.warmup_iters is None else cfg.warmup_iters
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * (1 - step / cfg.iters)


def build_head(backbone, cfg: DenseConfig) -> nn.Module:
    if cfg.task == "depth":
        return DepthHead(backbone.embed_dim, cfg.n_layers, cfg.min_depth, cfg.max_depth)
    return SegHead(backbone.embed_dim, cfg.n_layers, cfg.num_classes)


def _loss(head: nn.Module, pred: Tensor, target: Tensor, step: int) -> Tensor:
    pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
    if isinstance(head, DepthHead):
        return sigloss(pred[:, 0], target, warm_up=step < 100, max_depth=head.max_depth)
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)


def train_dense(backbone, train_pairs, cfg: DenseConfig, progress: bool = True) -> nn.Module:
    """Fit the probe head on frozen features of random crops; ``cfg`` is completed from the targets."""
    if cfg.task == "depth" and cfg.max_depth is None:
        cfg.max_depth = scan_targets(train_pairs, cfg)
    if cfg.task == "seg" and cfg.num_classes is None:
        cfg.num_classes = int(scan_targets(train_pairs, cfg)) + 1
    torch.manual_seed(cfg.seed)
    layers = official_layers(len(backbone.blocks), cfg.n_layers)
    device = next(backbone.parameters()).device
    head = build_head(backbone, cfg).to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = DenseDataset(train_pairs, cfg.task, cfg.size, True, cfg.depth_scale, cfg.reduce_zero_label)
    sampler = torch.utils.data.RandomSampler(data, replacement=True, num_samples=cfg.iters * cfg.batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers)
    backbone.eval()
    bar = tqdm(total=cfg.iters, desc=f"{cfg.task} probe", unit="it", disable=not progress, file=sys.stderr)
    for step, (x, t) in enumerate(loader):
        feats = backbone_maps(backbone, x.to(device), layers, norm=cfg.task != "depth")
        loss = _loss(head, head(feats), t.to(device), step)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.update()
    bar.close()
    return head.eval()


@torch.no_grad()
def predict_dense(backbone, head: nn.Module, image: Tensor, cfg: DenseConfig) -> Tensor:
    """Depth ``(B, 1, H, W)`` or class logits ``(B, K, H, W)`` at the resolution of ``image``."""
    layers = official_layers(len(backbone.blocks), cfg.n_layers)
    h, w = image.shape[-2:]

    def run(x: Tensor) -> Tensor:
        p = backbone.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        out = head(backbone_maps(backbone, x, layers, norm=cfg.task != "depth"))
        out = F.interpolate(out, size=(x.shape[-2] + ph, x.shape[-1] + pw), mode="bilinear", align_corners=False)
        return out[..., ph // 2 : ph // 2 + x.shape[-2], pw // 2 : pw // 2 + x.shape[-1]]

    if cfg.task == "depth":
        return run(image)
    stride = cfg.stride or max(1, math.ceil(cfg.size * 2 / 3))
    return slide_logits(run, image, cfg.size, stride, cfg.num_classes)[..., :h, :w]


def evaluate_dense(backbone, head: nn.Module, pairs, cfg: DenseConfig, progress: bool = True) -> dict:
    """Metrics at each target's own resolution: mean over images for depth, dataset mIoU for segmentation."""
    data = DenseDataset(pairs, cfg.task, cfg.size, False, cfg.depth_scale, cfg.reduce_zero_label)
    device = next(backbone.parameters()).device
    meter = SegMeter(cfg.num_classes) if cfg.task == "seg" else None
    per_image = []
    for x, t in tqdm(data, desc=f"{cfg.task} eval", unit="img", disable=not progress, file=sys.stderr):
        out = F.interpolate(predict_dense(backbone, head, x[None].to(device), cfg), size=t.shape, mode="bilinear",
                            align_corners=False)[0].cpu()
        if meter is not None:
            meter.update(out.argmax(0), t)
        else:
            per_image.append(depth_metrics(out[0], t, cfg.min_depth, cfg.max_depth))
    if meter is not None:
        return {"n_images": len(data), **meter.summary()}
    return {"n_images": len(data), **{k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}}
