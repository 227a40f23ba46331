"""Frozen features of a labelled dataset, computed once and cached for every classification protocol.

One forward per image gives what k-NN, logistic regression and the 52-head linear grid need: the
final-norm class tokens of the last ``n_blocks`` blocks (the last one is the usual ``x_norm_clstoken``)
and the mean of the last block's patch tokens. Under ``torchrun`` each rank embeds every
``world``-th image and the features are all-gathered, so every rank ends with the full set.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...data.datasets import ImageSource, Transformed, collate_skipping_errors
from ...distributed import rank_world


@dataclass
class FeatureSet:
    """``blocks``: ``(N, n_blocks, D)`` class tokens of the last blocks (last = final-norm cls);
    ``patch_mean``: ``(N, D)`` or None; ``labels``: ``(N,)`` class indices into ``classes``."""

    blocks: Tensor
    patch_mean: Tensor | None
    labels: Tensor
    classes: list[str]
    failed: dict[str, str] | None = None

    @property
    def cls(self) -> Tensor:
        return self.blocks[:, -1]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Tensor) -> FeatureSet:
        pm = self.patch_mean[idx] if self.patch_mean is not None else None
        return FeatureSet(self.blocks[idx], pm, self.labels[idx], self.classes)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic safetensors file (classes in the metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"blocks": self.blocks.contiguous(), "labels": self.labels.contiguous()}
        if self.patch_mean is not None:
            tensors["patch_mean"] = self.patch_mean.contiguous()
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"classes": json.dumps(self.classes), "failed": json.dumps(self.failed or {})})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        if "blocks" not in t or "labels" not in t:
            raise ValueError(f"{path}: not a feature cache (no 'blocks'/'labels'; feature files of 'dinollama embed' "
                             "are read with labels from their paths)")
        return cls(t["blocks"], t.get("patch_mean"), t["labels"], json.loads(meta.get("classes", "[]")),
                   json.loads(meta.get("failed", "{}")))


def _all_gather_rows(x: Tensor, world: int) -> list[Tensor]:
    """Every rank's ``x`` on the CPU (row counts may differ by rank; NCCL needs the transfer on the GPU)."""
    nccl = torch.distributed.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    n = torch.tensor([len(x)], device=dev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: len(x)] = x.to(dev)
    out = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return [o[: int(c.item())].cpu() for o, c in zip(out, counts)]


@torch.inference_mode()
def extract_features(model, source: ImageSource, transform: Callable, *, n_blocks: int = 4, patch_mean: bool = True,
                     batch_size: int = 64, workers: int = 2, dtype: torch.dtype = torch.float32,
                     progress: bool = True, desc: str = "features") -> FeatureSet:
    """Features of every labelled image of ``source`` (unreadable images are reported and left out)."""
    if source.labels is None:
        raise ValueError("the dataset has no labels: use a class-folder tree, a labelled csv/jsonl list, "
                         "fashion-mnist or imagenet:ROOT")
    rank, world = rank_world()
    device = next(model.parameters()).device
    n_blocks = min(n_blocks, len(model.blocks))
    mine = list(range(rank, len(source), world))
    loader = DataLoader(Transformed(source, mine, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_skipping_errors)
    idx, blocks, means, failed = [], [], [], {}
    bar = tqdm(total=len(mine), unit="img", desc=desc, disable=not progress or rank != 0, file=sys.stderr)
    model.eval()
    for index, images, errors in loader:
        for i, msg in errors:
            tqdm.write(f"skipping {msg}", file=sys.stderr)
            failed[source.name(i)] = msg
        if images is not None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model.get_intermediate_layers(images.to(device), n=n_blocks, return_class_token=True)
            idx.append(index)
            blocks.append(torch.stack([c for _, c in out], 1).float().cpu())
            if patch_mean:
                means.append(out[-1][0].float().mean(1).cpu())
        bar.update(len(index) + len(errors))
    bar.close()
    d = model.embed_dim
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    block = torch.cat(blocks) if blocks else torch.zeros(0, n_blocks, d)
    mean = (torch.cat(means) if means else torch.zeros(0, d)) if patch_mean else None
    if world > 1:
        index = torch.cat(_all_gather_rows(index, world))
        block = torch.cat(_all_gather_rows(block, world))
        mean = torch.cat(_all_gather_rows(mean, world)) if mean is not None else None
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, failed)
        failed = {k: v for g in gathered for k, v in g.items()}
    order = torch.argsort(index)
    return FeatureSet(block[order], mean[order] if mean is not None else None, source.labels[index[order]],
                      list(source.classes or []), failed)


def cache_key(*parts) -> str:
    """A short stable name for a (model, weights, data, split, transform) combination."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def cached_features(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], FeatureSet]) -> FeatureSet:
    """``compute()`` once per key: later runs (and other protocols) read ``cache_dir/<key>.safetensors``."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        return FeatureSet.load(path)
    feats = compute()
    rank, _ = rank_world()
    if rank == 0:
        feats.save(path)
    return feats
