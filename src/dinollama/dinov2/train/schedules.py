"""Schedules and per-parameter optimizer settings of the DINOv2 recipe."""

from __future__ import annotations

from torch import nn

from ...training.schedule import CosineSchedule

__all__ = ["CosineSchedule", "apply_schedules", "param_groups", "vit_layer_id"]


def vit_layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, ``i + 1`` for block ``i``, ``depth + 1`` for the final norm and heads."""
    if name.startswith("backbone."):
        if any(f".{k}" in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
            return 0
        if ".blocks." in name:
            return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return depth + 1


def param_groups(model: nn.Module, depth: int, layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """Optimizer groups by lr/wd multipliers: layer-wise lr decay, ``patch_embed`` lr scaled, no
    weight decay on biases, norms and LayerScale; ``last_layer`` flagged for the freeze. Parameters
    with equal settings share a group (fewer, larger foreach kernels)."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layer_decay ** (depth + 1 - vit_layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
        key = (lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                        "is_last_layer": key[2]})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
