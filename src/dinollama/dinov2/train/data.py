"""Training data: multi-crop samples and a resumable, shard-invariant sampler (sources: ``dinollama.data.datasets``).

A run's sample order is a fixed stream (one seeded permutation per epoch, concatenated); iteration
``it`` takes the global batch ``stream[it * B : (it + 1) * B]`` and rank ``r`` its ``r``-th slice.
Augmentation and masks are seeded by ``(seed, epoch, index)`` and ``(seed, it)``, so resuming at
an iteration, or splitting the batch over more processes, reproduces the same inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ...data.datasets import ArraySource, FileSource, ImageSource, open_source
from .augment import MultiCrop
from .masking import BlockMasking, batch_masks
from .ssl import Batch

__all__ = ["ArraySource", "Collate", "FileSource", "ImageSource", "MultiCropDataset", "StreamSampler", "open_source"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 2_147_483_647 + index


class MultiCropDataset(torch.utils.data.Dataset):
    """``dataset[(epoch, index, iteration)]`` -> the multi-crop views of one image."""

    def __init__(self, source: ImageSource, multicrop: MultiCrop, seed: int) -> None:
        self.source, self.multicrop, self.seed = source, multicrop, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, index, it = key
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index) % (2**63))
        crops = self.multicrop(self.source.image(index), g)
        label = int(self.source.labels[index]) if self.source.labels is not None else -1
        return {**crops, "label": label, "iteration": it}


class StreamSampler:
    """Batch sampler over the sample stream, from ``start`` to ``stop`` (micro-)iterations."""

    def __init__(self, indices: list[int], global_batch: int, rank: int, world: int, seed: int, start: int, stop: int) -> None:
        if global_batch > len(indices):
            raise ValueError(f"the global batch ({global_batch}) is larger than the training set ({len(indices)} images)")
        self.indices, self.global_batch, self.rank, self.world = indices, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm_cache = {epoch: [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]}
        return self._perm_cache[epoch]

    def batch(self, it: int) -> list[tuple[int, int, int]]:
        b = self.global_batch // self.world
        n = len(self.indices)
        out = []
        for pos in range(it * self.global_batch + self.rank * b, it * self.global_batch + (self.rank + 1) * b):
            epoch, off = divmod(pos, n)
            out.append((epoch, self._perm(epoch)[off], it))
        return out

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for it in range(self.start, self.stop):
            yield self.batch(it)


@dataclass
class Collate:
    """Stacks one rank's samples crop-major and cuts its rows out of the global batch's masks."""

    grid: int
    global_batch: int
    rank: int
    world: int
    seed: int
    mask_probability: float
    mask_ratio: tuple[float, float]

    def __call__(self, samples: list[dict]) -> Batch:
        n_local = len(samples[0]["local_crops"])
        glob = torch.stack([s["global_crops"][i] for i in range(2) for s in samples])
        local = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples]) if n_local else torch.empty(0)
        rng = random.Random(self.seed * 1_000_003 + samples[0]["iteration"])
        masks = batch_masks(2 * self.global_batch, self.grid * self.grid, BlockMasking(self.grid), rng,
                            self.mask_probability, self.mask_ratio)
        b = len(samples)
        masks = masks.view(2, self.global_batch, -1)[:, self.rank * b : (self.rank + 1) * b].reshape(2 * b, -1)
        labels = torch.tensor([s["label"] for s in samples])
        return Batch(glob, local, masks, labels)
