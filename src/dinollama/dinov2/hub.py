"""Named DINOv2 models (the official torch.hub entry points), official weights and loading."""

from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io import CheckpointError, fetch, read_metadata, read_state_dict
from .convert import infer_config, to_official
from .model import ARCHS, DinoVisionTransformer, ViTConfig

BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
_ARCH_OF = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
BACKBONES = [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")]
# The shipped default backbone: trained here with ``dinollama train ssl --preset fmnist-tiny`` (README).
DEFAULT_WEIGHTS = "weights/default.safetensors"
CLASSIFIERS = [f"{b}_lc" for b in BACKBONES]


CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _parse(name: str) -> tuple[str, str, int, bool]:
    """``dinov2_vitb14_reg_lc`` -> (base name, arch, registers, linear classifier)."""
    lc = name.endswith("_lc")
    core = name[: -len("_lc")] if lc else name
    if core not in BACKBONES:
        if "/" in name or os.sep in name or Path(name).suffix in CHECKPOINT_SUFFIXES:
            raise FileNotFoundError(f"{name}: no such checkpoint file or folder")
        raise ValueError(f"unknown model {name!r}; choose from default, {', '.join(BACKBONES + CLASSIFIERS)}, "
                         "or give a checkpoint path")
    size = core[len("dinov2_vit")]
    return f"dinov2_vit{size}14", _ARCH_OF[size], 4 if core.endswith("_reg") else 0, lc


def model_config(name: str, **overrides) -> ViTConfig:
    """The hub configuration of a named backbone: img_size 518, LayerScale, official interpolation."""
    _, arch, regs, _ = _parse(name)
    cfg = replace(
        ARCHS[arch],
        num_register_tokens=regs,
        interpolate_antialias=bool(regs),
        interpolate_offset=0.0 if regs else 0.1,
    )
    return replace(cfg, **overrides)


def weight_url(name: str, head_layers: int | None = None) -> str:
    """Official URL of a backbone (``head_layers=None``) or of its ImageNet linear head (1 or 4 layers)."""
    base, _, regs, _ = _parse(name)
    full = base + ("_reg4" if regs else "")
    if head_layers is None:
        return f"{BASE_URL}/{base}/{full}_pretrain.pth"
    if head_layers not in (1, 4):
        raise ValueError(f"official linear heads use 1 or 4 layers, not {head_layers}")
    return f"{BASE_URL}/{base}/{full}_linear{'4' if head_layers == 4 else ''}_head.pth"


def build(name: str, **overrides) -> DinoVisionTransformer:
    """A randomly initialised backbone whose ``state_dict()`` keys equal the official file's."""
    _, _, _, lc = _parse(name)
    if lc:
        raise ValueError(f"build() makes backbones; use load({name!r}) for the linear classifier")
    return DinoVisionTransformer(model_config(name, **overrides))


def describe_mismatch(missing: list[str], unexpected: list[str], path: str | os.PathLike, looks_like: str) -> str:
    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "") if keys else "none"

    return (
        f"{path}: weights do not fit this model (the file looks like {looks_like}); "
        f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}"
    )


def load_weights(model: DinoVisionTransformer, source: str | os.PathLike | dict, strict: bool = True) -> str:
    """Load any supported checkpoint into ``model``; returns the detected format.

    Loading is strict: a mismatch names the missing and unexpected keys and the architecture the
    file was made for.
    """
    obj = read_state_dict(source) if not isinstance(source, dict) else source
    sd, fmt = to_official(obj)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: a different architecture
        raise CheckpointError(f"{source}: {_looks_like(sd, fmt)} does not fit this model: {e}") from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(describe_mismatch(result.missing_keys, result.unexpected_keys, str(source), _looks_like(sd, fmt)))
    return fmt


def _looks_like(sd: dict, fmt: str) -> str:
    try:
        arch = infer_config(sd)
    except CheckpointError:
        return f"a {fmt} checkpoint of an unknown architecture"
    return f"a {fmt} checkpoint of a {arch.embed_dim}-dim, {arch.depth}-block model with {arch.num_register_tokens} registers"


def default_weights_path() -> Path:
    path = Path(str(resources.files(__package__).joinpath(DEFAULT_WEIGHTS)))
    if not path.exists():
        raise CheckpointError(f"{path}: the shipped default backbone is missing from this installation; reinstall dinollama")
    return path


def saved_config(path: str | os.PathLike) -> ViTConfig | None:
    """The exact config our ``save()`` stores in safetensors metadata (heads, image size...)."""
    import json

    text = read_metadata(path).get("config")
    if not text:
        return None
    known = set(ViTConfig.__dataclass_fields__)
    return ViTConfig(**{k: v for k, v in json.loads(text).items() if k in known})


def _resolve(weights: str | os.PathLike | None, url: str, progress: bool) -> Path | None:
    if weights is None:
        return None
    if str(weights) == "official":
        return fetch(url, progress=progress)
    return Path(weights)


def load(
    name: str,
    weights: str | os.PathLike | None = "official",
    *,
    head_weights: str | os.PathLike | None = "official",
    layers: int = 4,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    **overrides,
) -> nn.Module:
    """A named model with weights: ``None`` (random), ``"official"`` (download/cache) or a path.

    ``name`` may also be ``"default"`` (the shipped small backbone, trained on Fashion-MNIST) or a
    checkpoint path of any supported format, whose architecture is read from its metadata or inferred.
    ``*_lc`` names return a :class:`LinearClassifier` with the ImageNet head of ``layers`` (1 or 4).
    """
    if str(name) == "default":
        name = default_weights_path()
        if weights is None:  # the same architecture, randomly initialised (a baseline)
            return DinoVisionTransformer(replace(saved_config(name), **overrides)).eval().to(device=device, dtype=dtype)
    if Path(str(name)).exists():
        sd, _ = to_official(read_state_dict(name))
        model: nn.Module = DinoVisionTransformer(replace(saved_config(name) or infer_config(sd), **overrides))
        load_weights(model, name)
    else:
        _, _, _, lc = _parse(name)
        core = name[: -len("_lc")] if lc else name
        model = build(core, **overrides)
        path = _resolve(weights, weight_url(core), progress)
        if path is not None:
            load_weights(model, path)
        if lc:
            head = nn.Linear((1 + layers) * model.embed_dim, 1000)
            head_path = _resolve(head_weights, weight_url(core, layers), progress)
            if head_path is not None:
                head_sd = read_state_dict(head_path)
                result = head.load_state_dict(head_sd, strict=False)
                if result.missing_keys or result.unexpected_keys:
                    raise CheckpointError(describe_mismatch(result.missing_keys, result.unexpected_keys, head_path, "a linear head"))
            model = LinearClassifier(model, head, layers)
    model.eval()
    return model.to(device=device, dtype=dtype)


@lru_cache(maxsize=1)
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (first WordNet lemma of each synset)."""
    text = resources.files(__package__).joinpath("imagenet_classes.tsv").read_text()
    return [line.split("\t", 1)[1].split(",")[0] for line in text.splitlines()]


class LinearClassifier(nn.Module):
    """Backbone + the official ImageNet linear head over cls tokens and mean patch token."""

    def __init__(self, backbone: DinoVisionTransformer, linear_head: nn.Linear, layers: int = 4) -> None:
        super().__init__()
        if layers not in (1, 4):
            raise ValueError(f"layers must be 1 or 4, not {layers}")
        self.backbone, self.linear_head, self.layers = backbone, linear_head, layers

    def features(self, x: Tensor) -> Tensor:
        if self.layers == 1:
            out = self.backbone.forward_features(x)
            return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)
        outs = self.backbone.get_intermediate_layers(x, n=4, return_class_token=True)
        return torch.cat([cls for _, cls in outs] + [outs[-1][0].mean(dim=1)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, topk: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) per image."""
        probs = self(x).softmax(-1)
        p, idx = probs.topk(topk, dim=-1)
        names = imagenet_classes()
        return [[(names[i], float(v)) for v, i in zip(pr, ix)] for pr, ix in zip(p.tolist(), idx.tolist())]


def save(model: DinoVisionTransformer, path: str | os.PathLike, format: str = "safetensors") -> Path:
    """Export a backbone: ``safetensors`` (official key names, config in the metadata), ``pth``
    (the official file format) or ``hf`` (a Hugging Face folder: config.json + model.safetensors)."""
    import json

    from ..io import save_safetensors
    from .convert import to_hf

    path = Path(path)
    sd = model.state_dict()
    if format == "safetensors":
        save_safetensors(sd, path, metadata={"format": "dinov2-official", "config": json.dumps(model.cfg.to_dict())})
    elif format == "pth":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.contiguous() for k, v in sd.items()}, path)
    elif format == "hf":
        hf_sd, config = to_hf(sd, model.cfg)
        save_safetensors(hf_sd, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config, indent=2))
    else:
        raise ValueError(f"format must be 'safetensors', 'pth' or 'hf', not {format!r}")
    return path
