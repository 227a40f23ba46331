"""ONNX export of DINOv2 backbones and ``_lc`` classifiers, exact for the export size.

The position embedding is interpolated here, by the model's own code, for the export size and
stored in the graph as a constant: the register models' antialiased bicubic resize (which has no
exact ONNX equivalent, dinov2#288) and the non-register models' offset bicubic are then the
official numbers bit for bit, and no shape is baked in by tracing a resize (dinov2#216). The graph
takes a batch of any size at that one (H, W); another size is refused by ONNX Runtime's shape check.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .hub import LinearClassifier
from .model import DinoVisionTransformer

OPSET = 18


class _FixedPositions(nn.Module):
    """The backbone (or classifier) with its position embedding precomputed for one input size."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.backbone: DinoVisionTransformer = model.backbone if isinstance(model, LinearClassifier) else model
        h, w = image_size
        p = self.backbone.patch_size
        with torch.no_grad():
            pos = self.backbone.interpolate_pos_encoding((h // p) * (w // p), h, w).detach().float().clone()
        self.register_buffer("pos", pos, persistent=False)

    def _positions(self, n_patches: int, h: int, w: int) -> Tensor:
        return self.pos

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        bb = self.backbone
        bb.interpolate_pos_encoding = self._positions  # the exported constant instead of the resize
        try:
            if isinstance(self.model, LinearClassifier):
                return (self.model(x),)
            out = bb.forward_features(x)
        finally:
            del bb.interpolate_pos_encoding
        first = (out["x_norm_clstoken"], out["x_norm_patchtokens"])
        return first + ((out["x_norm_regtokens"],) if bb.num_register_tokens else ())


def output_names(model: nn.Module) -> list[str]:
    """The graph's outputs: ``logits`` for a classifier, else ``forward_features``' token names."""
    if isinstance(model, LinearClassifier):
        return ["logits"]
    names = ["x_norm_clstoken", "x_norm_patchtokens"]
    return names + (["x_norm_regtokens"] if model.num_register_tokens else [])


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int] | int = (224, 224),
                dynamic_batch: bool = True) -> Path:
    """Write ``model`` (a backbone or a ``_lc`` classifier) as ONNX (opset 18) for ``image_size``.

    Input ``image``: float32 ``(N, 3, H, W)`` (``N`` free when ``dynamic_batch``). Outputs: for a
    backbone ``x_norm_clstoken`` (what ``model(x)`` returns), ``x_norm_patchtokens`` and, with
    registers, ``x_norm_regtokens``; for a classifier ``logits``.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    backbone = model.backbone if isinstance(model, LinearClassifier) else model
    p = backbone.patch_size
    if h % p or w % p or h < p or w < p:
        raise ValueError(f"image_size {h}x{w}: export sizes must be positive multiples of the patch size {p} "
                         f"(e.g. {max(p, h // p * p)}x{max(p, w // p * p)})")
    wrapper = _FixedPositions(model.float().eval(), (h, w)).eval()
    x = torch.zeros(2, 3, h, w)
    path = Path(path)
    dims = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (x,), dynamo=True, input_names=["image"], output_names=output_names(model),
                                    dynamic_shapes=dims, opset_version=OPSET, verbose=False)
    program.save(str(path))
    return path
