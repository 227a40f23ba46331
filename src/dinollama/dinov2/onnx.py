"""ONNX export of DINOv2 backbones and ``_lc`` classifiers, exact for the export size or for any size.

By default the position embedding is interpolated here, by the model's own code, for the export
size and stored in the graph as a constant, so no shape is baked in by tracing a resize
(dinov2#216); the graph takes a batch of any size at that one (H, W), and another size is refused
by ONNX Runtime's shape check. ``dynamic_size=True`` instead exports the resize as one ONNX
``Resize`` (opset 18) whose attributes reproduce PyTorch's kernels: cubic with a = -0.75 and
replicated borders for the offset bicubic of the non-register models, and with ``antialias=1``,
a = -0.5 and ``exclude_outside=1`` (PIL's filter, the one PyTorch's antialiased bicubic uses) for
the register models (dinov2#288). That graph takes any multiple of the patch size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .hub import LinearClassifier
from .model import DinoVisionTransformer, resize_positions

OPSET = 18


@torch.library.custom_op("dinollama::resize_positions", mutates_args=())
def _resize_op(grid: Tensor, h0: int, w0: int, offset: float, antialias: bool) -> Tensor:
    """The model's resize as one op, so the exporter emits it as one ``Resize`` (see below)."""
    if (h0, w0) == tuple(grid.shape[-2:]):  # the model keeps its own grid at its own size
        return grid.clone()
    return resize_positions(grid, h0, w0, offset, antialias)


@_resize_op.register_fake
def _(grid: Tensor, h0: int, w0: int, offset: float, antialias: bool) -> Tensor:
    return grid.new_empty(grid.shape[0], grid.shape[1], h0, w0)


def _resize_onnx(grid, h0, w0, offset: float, antialias: bool):
    """ONNX form of :func:`_resize_op`; ``tests/test_onnx.py`` checks it against PyTorch's kernels."""
    from onnxscript import opset18 as op
    from onnxscript.onnx_types import BOOL, FLOAT

    kw = dict(mode="cubic", cubic_coeff_a=-0.5 if antialias else -0.75, exclude_outside=int(antialias),
              antialias=int(antialias), coordinate_transformation_mode="half_pixel")
    hw = op.Concat(op.Reshape(h0, op.Constant(value_ints=[1])), op.Reshape(w0, op.Constant(value_ints=[1])), axis=0)
    side = op.Shape(grid, start=2)
    if not offset:  # sizes: same size is the identity by itself
        return op.Resize(grid, None, None, op.Concat(op.Shape(grid, end=2), hw, axis=0), **kw)
    # PyTorch samples at the scale factor it is given, (n + offset) / side, and copies at the same size.
    scale = op.Div(op.Add(op.Cast(hw, to=FLOAT.dtype), op.Constant(value_float=offset)), op.Cast(side, to=FLOAT.dtype))
    same = op.Cast(op.ReduceMin(op.Cast(op.Equal(hw, side), to=FLOAT.dtype), keepdims=1), to=BOOL.dtype)
    scale = op.Where(same, op.Constant(value_floats=[1.0, 1.0]), scale)
    return op.Resize(grid, None, op.Concat(op.Constant(value_floats=[1.0, 1.0]), scale, axis=0), **kw)


class _AnySize(nn.Module):
    """The backbone (or classifier) with its position resize as one exportable op."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.backbone: DinoVisionTransformer = model.backbone if isinstance(model, LinearClassifier) else model
        pos = self.backbone.pos_embed.detach().float()
        side = int(round((pos.shape[1] - 1) ** 0.5))
        self.register_buffer("cls_pos", pos[:, :1].clone(), persistent=False)
        self.register_buffer("grid", pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).contiguous(),
                             persistent=False)

    def _positions(self, n_patches: int, h: int, w: int) -> Tensor:
        p, cfg = self.backbone.patch_size, self.backbone.cfg
        grid = _resize_op(self.grid, h // p, w // p, float(cfg.interpolate_offset), bool(cfg.interpolate_antialias))
        return torch.cat((self.cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])), dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        n, c, h, w = x.shape
        p = self.backbone.patch_size
        # A size that is no multiple of the patch size fails this reshape in ONNX Runtime (no silent crop).
        x = x.reshape(n, c, h // p, p, w // p, p).reshape(n, c, h, w)
        return _run(self.model, self.backbone, self._positions, x)


def _run(model: nn.Module, bb: DinoVisionTransformer, positions, x: Tensor) -> tuple[Tensor, ...]:
    """``model``'s outputs with ``positions`` in place of its ``interpolate_pos_encoding``."""
    bb.interpolate_pos_encoding = positions
    try:
        if isinstance(model, LinearClassifier):
            return (model(x),)
        out = bb.forward_features(x)
    finally:
        del bb.interpolate_pos_encoding
    first = (out["x_norm_clstoken"], out["x_norm_patchtokens"])
    return first + ((out["x_norm_regtokens"],) if bb.num_register_tokens else ())


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
        return _run(self.model, self.backbone, self._positions, x)


def output_names(model: nn.Module) -> list[str]:
    """The graph's outputs: ``logits`` for a classifier, else ``forward_features``' token names."""
    if isinstance(model, LinearClassifier):
        return ["logits"]
    names = ["x_norm_clstoken", "x_norm_patchtokens"]
    return names + (["x_norm_regtokens"] if model.num_register_tokens else [])


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: tuple[int, int] | int = (224, 224),
                dynamic_batch: bool = True, dynamic_size: bool = False) -> Path:
    """Write ``model`` (a backbone or a ``_lc`` classifier) as ONNX (opset 18) for ``image_size``.

    Input ``image``: float32 ``(N, 3, H, W)`` (``N`` free when ``dynamic_batch``; ``H`` and ``W`` any
    multiples of the patch size when ``dynamic_size``, with ``image_size`` the size traced). Outputs:
    for a backbone ``x_norm_clstoken`` (what ``model(x)`` returns), ``x_norm_patchtokens`` and, with
    registers, ``x_norm_regtokens``; for a classifier ``logits``.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    backbone = model.backbone if isinstance(model, LinearClassifier) else model
    p = backbone.patch_size
    if h % p or w % p or h < p or w < p:
        raise ValueError(f"image_size {h}x{w}: export sizes must be positive multiples of the patch size {p} "
                         f"(e.g. {max(p, h // p * p)}x{max(p, w // p * p)})")
    model = model.float().eval()
    wrapper = (_AnySize(model) if dynamic_size else _FixedPositions(model, (h, w))).eval()
    x = torch.zeros(2, 3, h, w)
    dims: dict = {0: torch.export.Dim("batch", min=1)} if dynamic_batch else {}
    if dynamic_size:
        dims |= {2: p * torch.export.Dim("rows", min=1), 3: p * torch.export.Dim("cols", min=1)}
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (x,), dynamo=True, input_names=["image"], output_names=output_names(model),
                                    dynamic_shapes=(dims,) if dims else None, opset_version=OPSET, verbose=False,
                                    custom_translation_table={torch.ops.dinollama.resize_positions.default: _resize_onnx})
    program.save(str(path))
    return path
