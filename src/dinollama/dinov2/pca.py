"""The patch-feature PCA picture of the DINOv2 demo: 3 principal components as RGB on the foreground."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor


def _pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """Projections of ``x`` (N, D) on its first ``k`` principal axes (SVD of the centred data)."""
    centred = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:k].T


@torch.no_grad()
def patch_pca(model, images: list[Image.Image], size: int = 448, threshold: float = 0.0,
              mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list[np.ndarray]:
    """Per image an ``(h, w, 3)`` float array in [0, 1]: background black, foreground coloured.

    As in the official demo: a first PCA over the patches of all images separates foreground
    from background (component 1 above ``threshold``, its sign chosen so that the image borders
    are background); a second PCA over the foreground patches gives the three colour channels.
    """
    side = size // model.patch_size * model.patch_size
    batch = torch.stack([to_tensor(img.convert("RGB").resize((side, side), Image.BICUBIC), mean, std) for img in images])
    device = next(model.parameters()).device
    feats = model.forward_features(batch.to(device))["x_norm_patchtokens"].float().cpu()
    b, n, d = feats.shape
    g = side // model.patch_size
    flat = feats.reshape(b * n, d)
    first = _pca(flat, 1)[:, 0].reshape(b, g, g)
    border = torch.cat([first[:, 0], first[:, -1], first[:, :, 0], first[:, :, -1]], dim=1)
    if (border > threshold).float().mean() > 0.5:
        first = -first
    fg = (first > threshold).reshape(b * n)
    if fg.sum() < 3:  # nothing stands out: colour every patch
        fg = torch.ones_like(fg)
    colours = torch.zeros(b * n, 3)
    comps = _pca(flat[fg], 3)
    lo, hi = comps.min(0).values, comps.max(0).values
    colours[fg] = (comps - lo) / (hi - lo).clamp_min(1e-6)
    return [c.numpy() for c in colours.reshape(b, g, g, 3)]


def pca_figure(images: list[Image.Image], maps: list[np.ndarray], cell: int = 224) -> Image.Image:
    """A grid: input images on the top row, their PCA maps (nearest-upsampled) below."""
    canvas = Image.new("RGB", (cell * len(images), 2 * cell), "white")
    for i, (img, m) in enumerate(zip(images, maps)):
        canvas.paste(img.convert("RGB").resize((cell, cell), Image.BICUBIC), (i * cell, 0))
        pic = Image.fromarray((m * 255).round().astype(np.uint8)).resize((cell, cell), Image.NEAREST)
        canvas.paste(pic, (i * cell, cell))
    return canvas
