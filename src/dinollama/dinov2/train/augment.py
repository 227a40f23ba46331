"""DINOv2 multi-crop augmentation on tensors, without torchvision.

Each op takes a float image ``(3, H, W)`` in [0, 1] and an explicit ``torch.Generator``: the crops of
a sample depend only on ``(seed, epoch, index)``, so a resumed or differently sharded run sees the
same pixels. The ops follow torchvision's definitions (RandomResizedCrop's 10 attempts and centre
fallback, ColorJitter's random op order and blend formulas, the 9-tap Gaussian blur with reflect
padding, solarize at 128/255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms import IMAGENET_MEAN, IMAGENET_STD

_GRAY = (0.299, 0.587, 0.114)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=g).item() < p


def crop_params(g: torch.Generator, h: int, w: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(top, left, height, width)``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(img: Tensor, size: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
    top, left, ch, cw = crop_params(g, img.shape[-2], img.shape[-1], scale)
    patch = img[None, :, top : top + ch, left : left + cw]
    out = F.interpolate(patch, size=(size, size), mode="bicubic", align_corners=False, antialias=ch > size or cw > size)
    return out[0].clamp_(0, 1)


def grayscale(img: Tensor) -> Tensor:
    if img.shape[0] == 1:
        return img
    r, g, b = img[0], img[1], img[2]
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(0)


def _blend(a: Tensor, b: Tensor | float, factor: float) -> Tensor:
    return (factor * a + (1 - factor) * b).clamp_(0, 1)


def _rgb_to_hsv(img: Tensor) -> Tensor:
    r, g, b = img
    maxc, minc = img.max(0).values, img.min(0).values
    v, cr = maxc, maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, v))


def _hsv_to_rgb(img: Tensor) -> Tensor:
    h, s, v = img
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack((torch.stack((v, q, p, p, t, v)), torch.stack((t, v, v, q, p, p)), torch.stack((p, p, t, v, v, q))))
    return table.gather(1, i.expand(3, 1, *i.shape)).squeeze(1)


def adjust_hue(img: Tensor, factor: float) -> Tensor:
    hsv = _rgb_to_hsv(img)
    hsv[0] = torch.fmod(hsv[0] + factor + 1.0, 1.0)
    return _hsv_to_rgb(hsv)


def color_jitter(img: Tensor, g: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) -> Tensor:
    """torchvision ColorJitter: the four adjustments in a random order with random factors.

    A one-channel (grayscale) image skips saturation and hue, which leave gray pixels unchanged;
    their factors are still drawn so the random stream is the same as for colour images.
    """
    gray = img.shape[0] == 1
    for op in torch.randperm(4, generator=g).tolist():
        if op == 0 and brightness:
            img = _blend(img, 0.0, _uniform(g, max(0, 1 - brightness), 1 + brightness))
        elif op == 1 and contrast:
            img = _blend(img, grayscale(img).mean(), _uniform(g, max(0, 1 - contrast), 1 + contrast))
        elif op == 2 and saturation:
            factor = _uniform(g, max(0, 1 - saturation), 1 + saturation)
            img = img if gray else _blend(img, grayscale(img), factor)
        elif op == 3 and hue:
            factor = _uniform(g, -hue, hue)
            img = img if gray else adjust_hue(img, factor)
    return img


def gaussian_blur(img: Tensor, sigma: float, kernel_size: int = 9) -> Tensor:
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(img.dtype)
    c = img.shape[0]
    pad = kernel_size // 2
    out = F.pad(img[None], (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def solarize(img: Tensor, threshold: float = 128 / 255) -> Tensor:
    return torch.where(img >= threshold, 1.0 - img, img)


@dataclass
class MultiCropConfig:
    """Crop sizes and probabilities; defaults are the official ``ssl_default_config.yaml`` values."""

    global_crops_size: int = 224
    local_crops_size: int = 98
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    solarize_p: float = 0.2
    # Blur probabilities of global crop 1, global crop 2 and the local crops. The paper's values are
    # 1.0/0.1/0.5; the released code passes them through torchvision's RandomApply inverted, so the
    # released models were trained with 0.0/0.9/0.5 (``official_blur_bug=True`` reproduces that).
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    official_blur_bug: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The exported backbone's evaluation crop (``ViTConfig.crop_pct``): 0.875 is the official 256 -> 224;
    # 1.0 keeps the whole frame (small, tightly framed images such as Fashion-MNIST).
    eval_crop_pct: float = 0.875

    POSITIVE = ("global_crops_size", "local_crops_size", "eval_crop_pct")


class MultiCrop:
    """Image ``(3, H, W)`` in [0, 1] -> ``{"global_crops": [2 x (3, G, G)], "local_crops": [n x (3, L, L)]}``."""

    def __init__(self, cfg: MultiCropConfig) -> None:
        self.cfg = cfg
        self.blur_p = tuple(1 - p for p in cfg.blur_p) if cfg.official_blur_bug else tuple(cfg.blur_p)
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def _view(self, img: Tensor, size: int, scale, blur_p: float, solarize_p: float, g: torch.Generator) -> Tensor:
        x = random_resized_crop(img, size, scale, g)
        if _coin(g, 0.5):
            x = x.flip(-1)
        if _coin(g, self.cfg.jitter_p):
            x = color_jitter(x, g)
        if _coin(g, self.cfg.grayscale_p):
            x = grayscale(x)
        if _coin(g, blur_p):
            x = gaussian_blur(x, _uniform(g, 0.1, 2.0))
        if _coin(g, solarize_p):
            x = solarize(x)
        return (x.expand(3, -1, -1) - self.mean) / self.std

    def __call__(self, img: Tensor, g: torch.Generator) -> dict[str, list[Tensor]]:
        """Views of ``img`` (3 channels, or 1 for a grayscale image: same result, less work)."""
        c = self.cfg
        b1, b2, bl = self.blur_p
        glob = [
            self._view(img, c.global_crops_size, c.global_crops_scale, b1, 0.0, g),
            self._view(img, c.global_crops_size, c.global_crops_scale, b2, c.solarize_p, g),
        ]
        local = [self._view(img, c.local_crops_size, c.local_crops_scale, bl, 0.0, g) for _ in range(c.local_crops_number)]
        return {"global_crops": glob, "local_crops": local}
