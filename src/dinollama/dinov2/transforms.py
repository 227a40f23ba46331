"""The official evaluation preprocessing without torchvision.

torchvision's ``Resize(256, BICUBIC)`` on a PIL image is Pillow's bicubic resize with the short
side set to 256 and the long side ``int(256 * long / short)``; ``CenterCrop`` rounds the offsets;
``ToTensor`` divides by 255. The same steps are done here with Pillow and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_short_side(img: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:  # torchvision pads with zeros before cropping
        canvas = Image.new(img.mode, (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side, center crop, normalise: PIL image of any mode (converted to RGB as
    :func:`dinollama.data.load_image` does) -> ``(3, crop, crop)`` float tensor."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from ..data.images import to_rgb

        img = center_crop(resize_short_side(to_rgb(img), self.resize_size), self.crop_size)
        return to_tensor(img, self.mean, self.std)


def make_eval_transform(resize_size: int = 256, crop_size: int = 224) -> EvalTransform:
    """The official ``make_classification_eval_transform``."""
    return EvalTransform(resize_size, crop_size)


def default_transform(model) -> EvalTransform:
    """Preprocessing for ``model`` at its ``default_image_size``: resize the short side to
    ``size / cfg.crop_pct`` and centre-crop (the official 256 -> 224 is ``crop_pct`` 0.875)."""
    crop = int(getattr(model, "default_image_size", 224))
    cfg = getattr(model, "cfg", None)
    mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN))
    std = tuple(getattr(cfg, "std", IMAGENET_STD))
    return EvalTransform(round(crop / getattr(cfg, "crop_pct", 0.875)), crop, mean, std)
