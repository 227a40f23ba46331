"""torch.hub entry points with the official names: ``torch.hub.load(PATH_TO_CLONE, 'dinov2_vits14', source='local')``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from dinollama.dinov2 import load as _load  # noqa: E402

dependencies = ["torch", "numpy", "PIL", "safetensors", "tqdm"]


def _entry(name: str):
    def entry(*, pretrained: bool = True, **kwargs):
        return _load(name, weights="official" if pretrained else None,
                     **({"head_weights": None} if name.endswith("_lc") and not pretrained else {}), **kwargs)

    entry.__name__ = name
    entry.__doc__ = f"DINOv2 {name} (official weights when pretrained=True)."
    return entry


for _name in [f"dinov2_vit{s}14{r}{lc}" for s in "sblg" for r in ("", "_reg") for lc in ("", "_lc")]:
    globals()[_name] = _entry(_name)
