"""The DINOv2 linear probe: a grid of linear heads trained together on cached frozen features.

As the official ``eval/linear.py``: inputs are the class tokens of the last {1, 4} blocks, with or
without the mean of the last block's patch tokens appended; 13 learning rates scaled by
``batch / 256``; SGD momentum 0.9, no weight decay, cosine annealing to 0; weights N(0, 0.01),
bias 0; the loss is the sum of every head's cross-entropy. 4 inputs x 13 rates = 52 heads, kept as
one ``(heads, classes, in)`` tensor per input kind so a step is four batched matmuls.

Unlike the official code, the head is chosen on a held-out part of train by default (``select_on=
"holdout"``) and then refit on all of train; ``select_on="test"`` picks on the reporting split
as the published numbers do.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .features import FeatureSet

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@dataclass(frozen=True)
class InputKind:
    """Which features a head reads: the last ``n_blocks`` class tokens (+ mean patch token)."""

    n_blocks: int
    avgpool: bool

    def features(self, feats: FeatureSet) -> Tensor:
        if self.n_blocks > feats.blocks.shape[1]:
            raise ValueError(f"a head on {self.n_blocks} blocks needs features of {self.n_blocks} blocks "
                             f"(these have {feats.blocks.shape[1]})")
        x = feats.blocks[:, -self.n_blocks :].flatten(1)
        if self.avgpool:
            if feats.patch_mean is None:
                raise ValueError("an avgpool head needs the mean patch token, which these features lack")
            x = torch.cat([x, feats.patch_mean], 1)
        return x.float()

    def name(self, lr: float | None = None) -> str:
        base = f"blocks{self.n_blocks}_avgpool{self.avgpool}"
        return base if lr is None else f"{base}_lr{lr:g}"


@dataclass
class LinearProbe:
    """One trained head: ``logits = linear(kind.features(feats))``."""

    kind: InputKind
    linear: nn.Linear
    classes: list[str]
    lr: float | None = None

    @torch.no_grad()
    def logits(self, feats: FeatureSet) -> Tensor:
        return self.linear(self.kind.features(feats))

    def accuracy(self, feats: FeatureSet) -> float:
        return float((self.logits(feats).argmax(1) == feats.labels).float().mean())

    def save(self, path: str | os.PathLike) -> None:
        meta = {"n_blocks": str(self.kind.n_blocks), "avgpool": str(self.kind.avgpool),
                "classes": json.dumps(self.classes), "lr": str(self.lr)}
        save_file({"weight": self.linear.weight.detach().contiguous(), "bias": self.linear.bias.detach().contiguous()},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, embed_dim: int | None = None) -> LinearProbe:
        """A head saved by :meth:`save`, or an official ``*_linear_head.pth``/``*_linear4_head.pth`` (these read
        1 or 4 class tokens plus the mean patch token over the 1000 ImageNet classes)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                w, b = f.get_tensor("weight"), f.get_tensor("bias")
            kind = InputKind(int(meta["n_blocks"]), meta["avgpool"] == "True")
            lr = None if meta.get("lr") in (None, "None") else float(meta["lr"])
            classes = json.loads(meta["classes"])
        else:
            from ..hub import imagenet_classes

            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
            if set(sd) != {"weight", "bias"}:
                raise ValueError(f"{path}: expected a linear head with 'weight' and 'bias', found {sorted(sd)[:6]}")
            w, b = sd["weight"], sd["bias"]
            if embed_dim is None or w.shape[1] % embed_dim:
                raise ValueError(f"{path}: in_features {w.shape[1]} is not (1 + layers) x embed_dim {embed_dim}")
            kind, lr = InputKind(w.shape[1] // embed_dim - 1, True), None
            classes = imagenet_classes() if w.shape[0] == 1000 else [str(i) for i in range(w.shape[0])]
        linear = nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w.float(), "bias": b.float()})
        return cls(kind, linear, classes, lr)


@dataclass
class GridResult:
    """Selection-split accuracy of every head, the chosen head, and where it was chosen."""

    accuracy: dict[str, float]
    best: LinearProbe
    select_on: str


class HeadGrid(nn.Module):
    """``len(lrs)`` linear heads per input kind, stored stacked."""

    def __init__(self, kinds: list[InputKind], in_dims: list[int], n_classes: int, n_heads: int, g: torch.Generator):
        super().__init__()
        self.kinds = kinds
        self.weight = nn.ParameterList(
            [nn.Parameter(torch.randn(n_heads, n_classes, d, generator=g) * 0.01) for d in in_dims])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(n_heads, n_classes)) for _ in in_dims])

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """Logits ``(heads, B, classes)`` per kind."""
        return [torch.baddbmm(b[:, None], x.expand(len(w), -1, -1), w.transpose(1, 2))
                for x, w, b in zip(inputs, self.weight, self.bias)]

    def probe(self, k: int, h: int, classes: list[str], lr: float) -> LinearProbe:
        w = self.weight[k][h].detach()
        linear = nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w.clone(), "bias": self.bias[k][h].detach().clone()})
        return LinearProbe(self.kinds[k], linear, classes, lr)


def available_kinds(feats: FeatureSet, n_blocks=(1, 4), avgpool=(False, True)) -> list[InputKind]:
    """The official four input kinds, less those the features cannot feed."""
    return [InputKind(n, a) for n in n_blocks for a in avgpool
            if n <= feats.blocks.shape[1] and (not a or feats.patch_mean is not None)]


def train_grid(train: FeatureSet, kinds: list[InputKind], lrs=LEARNING_RATES, *, epochs: float = 10,
               batch_size: int = 128, momentum: float = 0.9, seed: int = 0, progress: bool = True) -> HeadGrid:
    """Train every (kind, lr) head on ``train``: SGD with momentum (torch's rule: ``buf = m * buf + g``,
    ``p -= lr_t * buf``), per-head learning rate ``lr * batch / 256`` annealed by a cosine to 0."""
    g = torch.Generator().manual_seed(seed)
    inputs = [k.features(train) for k in kinds]
    grid = HeadGrid(kinds, [x.shape[1] for x in inputs], len(train.classes), len(lrs), g)
    base = torch.tensor(lrs, dtype=torch.float32) * batch_size / 256
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    bufs = [torch.zeros_like(p) for p in grid.parameters()]
    order = torch.zeros(0, dtype=torch.long)
    for step in tqdm(range(total), desc="linear heads", unit="it", disable=not progress, file=sys.stderr):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train), generator=g)
        idx = order[(step % steps_per_epoch) * batch_size :][:batch_size]
        logits = grid([x[idx] for x in inputs])
        y = train.labels[idx]
        loss = sum(F.cross_entropy(lg.flatten(0, 1), y.repeat(len(lrs)), reduction="sum") / len(idx) for lg in logits)
        grid.zero_grad(set_to_none=True)
        loss.backward()
        lr_t = base * 0.5 * (1 + math.cos(math.pi * step / total))
        with torch.no_grad():
            for p, buf in zip(grid.parameters(), bufs):
                buf.mul_(momentum).add_(p.grad)
                p.sub_(lr_t.view(-1, *([1] * (p.ndim - 1))) * buf)
    return grid


@torch.no_grad()
def grid_accuracy(grid: HeadGrid, feats: FeatureSet, lrs=LEARNING_RATES) -> dict[tuple[int, int], float]:
    """Top-1 of every head, keyed by (kind index, lr index)."""
    logits = grid([k.features(feats) for k in grid.kinds])
    return {(k, h): float((lg[h].argmax(1) == feats.labels).float().mean())
            for k, lg in enumerate(logits) for h in range(len(lrs))}


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit, holdout) indices of a seeded random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * n)))
    return perm[n_val:], perm[:n_val]


def linear_probe(train: FeatureSet, test: FeatureSet | None = None, *, select_on: str = "holdout",
                 holdout: float = 0.1, lrs=LEARNING_RATES, kinds: list[InputKind] | None = None, epochs: float = 10,
                 batch_size: int = 128, seed: int = 0, progress: bool = True) -> GridResult:
    """Train the grid, choose the best head on the holdout (then refit it on all of train) or on ``test``."""
    kinds = kinds or available_kinds(train)
    opts = dict(epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)
    if select_on == "test":
        if test is None:
            raise ValueError("select_on='test' needs the test features")
        grid = train_grid(train, kinds, lrs, **opts)
        acc = grid_accuracy(grid, test, lrs)
    elif select_on == "holdout":
        fit, val = holdout_split(len(train), holdout, seed)
        grid = train_grid(train.subset(fit), kinds, lrs, **opts)
        acc = grid_accuracy(grid, train.subset(val), lrs)
    else:
        raise ValueError(f"select_on must be 'holdout' or 'test', not {select_on!r}")
    k, h = max(acc, key=lambda kh: (acc[kh], -kh[0], -kh[1]))
    if select_on == "holdout":
        grid = train_grid(train, [kinds[k]], (lrs[h],), **opts)
        best = grid.probe(0, 0, train.classes, lrs[h])
    else:
        best = grid.probe(k, h, train.classes, lrs[h])
    named = {kinds[ki].name(lrs[hi]): a for (ki, hi), a in acc.items()}
    return GridResult(named, best, select_on)
