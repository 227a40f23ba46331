"""Teachers for distillation: a frozen backbone + heads from a ``dinollama train ssl`` checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...io import CheckpointError
from .config import SSLConfig, _merge
from .ssl import SSLNetwork, build_network


def load_teacher(path: str | os.PathLike) -> tuple[SSLNetwork, SSLConfig]:
    """The EMA teacher (backbone, DINO head, iBOT head) of a training checkpoint and its config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such training checkpoint (the checkpoint.pth a 'dinollama train ssl' run writes)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a dinollama training checkpoint (needs 'model' and 'config'); "
                              "a backbone alone has no DINO/iBOT heads to distill from")
    cfg = _merge(SSLConfig(), state["config"], "")
    net = build_network(cfg, drop_path=False)
    prefix = "teacher."
    sd = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: teacher weights do not fit its config (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return net.requires_grad_(False).eval(), cfg
