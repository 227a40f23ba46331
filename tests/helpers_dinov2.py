"""Shared helpers for DINOv2 tests: small models with real widths, randomised parameters."""

import torch

from dinollama.dinov2 import build


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter non-trivial values (LayerScale, norms and tokens too)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if ("norm" in name or "gamma" in name) else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model.eval()


def small(name: str, depth: int = 2, **kw) -> torch.nn.Module:
    return randomize(build(name, depth=depth, **kw))
