"""Image embeddings for ``/v1/embeddings``: data URLs decoded safely, embedded by a DINOv2 backbone."""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings

import torch
from PIL import Image, ImageOps

from ..data.images import to_rgb

MAX_PIXELS = 50_000_000  # above this an image is refused as a decompression bomb
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(?P<data>.*)", re.DOTALL)


class BadImage(ValueError):
    """An input that is not a decodable image (answered 422)."""


def decode_data_url(url: str, index: int) -> Image.Image:
    """RGB image of a ``data:image/...;base64,...`` URL; ``BadImage`` naming the input otherwise."""
    m = _DATA_URL.fullmatch(url.strip())
    if m is None:
        raise BadImage(f"input[{index}] must be a data:image/...;base64,... URL")
    try:
        raw = base64.b64decode(m["data"], validate=False)
    except (binascii.Error, ValueError):
        raise BadImage(f"input[{index}]: invalid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(f"input[{index}]: {img.width}x{img.height} pixels is over the limit of {MAX_PIXELS:,}")
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"input[{index}]: refused as a decompression bomb") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise BadImage(f"input[{index}]: not a decodable image ({type(e).__name__}: {e})") from None


class ImageEmbedder:
    """A backbone and its preprocessing; one batch at a time (the lock), off the event loop."""

    def __init__(self, name: str, device: str | torch.device | None = None) -> None:
        from ..dinov2 import default_transform, load

        self.name = str(name)
        self.model = load(name, device=device).eval()
        self.transform = default_transform(self.model)
        self.device = next(self.model.parameters()).device
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], patch_tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class tokens ``(N, dim)`` (what ``model(x)`` returns) and, on request, patch tokens."""
        x = torch.stack([self.transform(im) for im in images]).to(self.device)
        with self._lock:
            if not patch_tokens:
                return self.model(x).float(), None
            feats = self.model.forward_features(x)
        return feats["x_norm_clstoken"].float(), feats["x_norm_patchtokens"].float()
