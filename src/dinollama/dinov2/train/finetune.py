"""Supervised fine-tuning of a backbone for classification with layer-wise lr decay.

The classifier reads the final-norm class token concatenated with the mean patch token (the
official linear-head input); backbone block ``i`` gets ``lr * decay ** (depth - i)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ...io import save_safetensors
from ...training import autocast_dtype
from ..hub import save as save_backbone
from ..model import DinoVisionTransformer
from .augment import random_resized_crop
from .data import ImageSource
from .schedules import CosineSchedule, param_groups
from .trainer import split_holdout


@dataclass
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # the head's lr; per block scaled by layer_decay
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    holdout: int = 1000  # labelled images held out to report accuracy
    crop_scale: tuple[float, float] = (0.35, 1.0)
    precision: str = "bf16"
    seed: int = 0


class Classifier(nn.Module):
    def __init__(self, backbone: DinoVisionTransformer, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(2 * backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone.forward_features(x)
        return self.head(torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=-1))


def _batch(source: ImageSource, ids: list[int], size: int, mean: Tensor, std: Tensor, train: bool, g: torch.Generator,
           scale: tuple[float, float] = (0.35, 1.0)) -> Tensor:
    out = []
    for i in ids:
        img = source.image(i)
        if train:
            img = random_resized_crop(img, size, scale, g)
            if torch.rand((), generator=g) < 0.5:
                img = img.flip(-1)
        else:
            img = F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True)[0].clamp(0, 1)
        out.append((img.expand(3, -1, -1) - mean) / std)
    return torch.stack(out)


@torch.no_grad()
def accuracy(model: Classifier, source: ImageSource, ids: list[int], size: int, device, amp) -> float:
    from ..transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    model.eval()
    correct = 0
    for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        x = _batch(source, chunk, size, mean, std, False, torch.Generator()).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = model(x).argmax(-1).cpu()
        correct += int((pred == source.labels[chunk]).sum())
    model.train()
    return correct / max(1, len(ids))


def finetune(backbone: DinoVisionTransformer, source: ImageSource, output_dir: str | Path, cfg: FinetuneConfig,
             device: torch.device | None = None, progress: bool = True) -> dict:
    """Fine-tune ``backbone`` + a linear head on ``source``'s labels; writes ``backbone.safetensors``,
    ``head.safetensors``, ``log.jsonl`` and returns the held-out accuracy before and after."""
    from ..transforms import IMAGENET_MEAN, IMAGENET_STD

    if source.labels is None:
        raise ValueError("fine-tuning needs labels: give a folder tree root/<class>/<image> or fashion-mnist")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    amp = autocast_dtype(cfg.precision)
    train_ids, held = split_holdout(source, cfg.holdout, cfg.seed)
    n_classes = int(source.labels.max()) + 1
    model = Classifier(backbone, n_classes).to(device)
    size = backbone.default_image_size
    groups = param_groups(model, len(backbone.blocks), cfg.layer_decay, patch_embed_lr_mult=1.0)
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = max(1, len(train_ids) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    lr = CosineSchedule(cfg.lr, cfg.lr * 1e-3, total, round(cfg.warmup_epochs * steps_per_epoch))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    g = torch.Generator().manual_seed(cfg.seed)
    before = accuracy(model, source, held, size, device, amp) if held else None
    bar = tqdm(total=total, disable=not progress, desc="finetune", unit="it")
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(train_ids), generator=g).tolist()
        for s in range(steps_per_epoch):
            ids = [train_ids[i] for i in perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
            x = _batch(source, ids, size, mean, std, True, g, cfg.crop_scale).to(device)
            y = source.labels[ids].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr[step] * group["lr_multiplier"]
                group["weight_decay"] = cfg.weight_decay * group["wd_multiplier"]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite loss at step {step}; lower the lr (now {lr[step]:.3g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
        acc = accuracy(model, source, held, size, device, amp) if held else None
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": float(loss), "holdout_top1": acc}) + "\n")
    bar.close()
    save_backbone(model.backbone, out / "backbone.safetensors")
    save_safetensors(model.head.state_dict(), out / "head.safetensors", metadata={"num_classes": n_classes})
    result = {"holdout_top1_before": before, "holdout_top1_after": acc, "config": asdict(cfg)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result
