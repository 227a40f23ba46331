"""LoRA on the attention and feed-forward projections, and merging back into full weights.

``LoRALinear`` keeps the frozen base ``weight`` under its original name, so a LoRA model's state
dict is the base checkpoint plus ``lora_A``/``lora_B`` entries; ``merge_lora`` folds
``W + (alpha / r) B A`` into plain ``nn.Linear`` layers that load anywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (x @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _replace(model: nn.Module, fn) -> int:
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = fn(name, child)
            if new is not None:
                setattr(module, name, new)
                count += 1
    return count


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, targets=DEFAULT_TARGETS) -> nn.Module:
    """Freeze ``model`` and add trainable low-rank adapters to the named projections (in place)."""
    model.requires_grad_(False)
    n = _replace(model, lambda name, m: LoRALinear(m, rank, alpha) if name in targets and type(m) is nn.Linear else None)
    if n == 0:
        raise ValueError(f"no linear layers named {', '.join(targets)} in this model")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` with the adapter folded in (in place)."""
    _replace(model, lambda name, m: m.merged() if isinstance(m, LoRALinear) else None)
    return model.requires_grad_(True)
