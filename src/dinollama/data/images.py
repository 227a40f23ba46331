"""Decode any image users have into RGB, reporting bad files by name instead of crashing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


class ImageLoadError(ValueError):
    """An unreadable image; ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def _full_scale(img: Image.Image, arr: np.ndarray) -> float:
    """The value that means white: the type's range for 16-bit images, 1.0 for float images in [0, 1]."""
    hi = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "F" and hi <= 1.0:
        return 1.0
    if hi <= 255:
        return 255.0
    return 65535.0 if hi <= 65535 else hi  # 16-bit data in a 32-bit container (PNG "I"), else its own maximum


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB from any mode, as users expect of an image library: alpha composited onto ``background``,
    palettes and CMYK converted, 16-bit images scaled by their type's range and float images in
    [0, 1] by 255."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr) * (255.0 / _full_scale(img, arr))
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode (so truncation is found now), apply EXIF orientation, convert to RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageLoadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(path, f"cannot decode ({e})") from None


def list_images(source: str | os.PathLike) -> list[Path]:
    """Image paths under a folder (recursive, sorted) or listed one per line in a text file.

    A list file may hold relative paths, resolved against the list's folder; blank lines and
    ``#`` comments are skipped. For CSV/JSONL lists the first column/``path`` field is used.
    """
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or file list")
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source]
    out = []
    for line in source.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if source.suffix == ".jsonl":
            line = json.loads(line)["path"]
        elif source.suffix == ".csv":
            line = line.split(",")[0]
            if line in ("path", "filename", "file"):
                continue
        p = Path(line)
        out.append(p if p.is_absolute() else source.parent / p)
    return out
