"""Training data: image sources, multi-crop samples and a resumable, shard-invariant sampler.

A run's sample order is a fixed stream (one seeded permutation per epoch, concatenated); iteration
``it`` takes the global batch ``stream[it * B : (it + 1) * B]`` and rank ``r`` its ``r``-th slice.
Augmentation and masks are seeded by ``(seed, epoch, index)`` and ``(seed, it)``, so resuming at
an iteration, or splitting the batch over more processes, reproduces the same inputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...data.images import list_images, load_image
from ...data.mnist import load_fashion_mnist
from .augment import MultiCrop
from .masking import BlockMasking, batch_masks
from .ssl import Batch


class ImageSource:
    """Images by index as float ``(3, H, W)`` in [0, 1], with integer labels when known."""

    labels: Tensor | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Tensor:
        raise NotImplementedError

    def pil(self, i: int):
        from PIL import Image

        arr = (self.image(i).expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr)


class ArraySource(ImageSource):
    """uint8 images ``(N, H, W)`` or ``(N, H, W, 3)`` held in memory (Fashion-MNIST, MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, classes: list[str] | None = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels) if labels is not None else None
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Tensor:
        """``(3, H, W)``, or ``(1, H, W)`` for grayscale data (the augmentations treat it as gray RGB)."""
        x = torch.tensor(self.images[i], dtype=torch.float32).div_(255)
        return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


class FileSource(ImageSource):
    """Image files; labels from the class folder when the tree is ``root/<class>/<image>``."""

    def __init__(self, paths: list[Path], root: Path | None = None) -> None:
        self.paths = paths
        if root is not None and paths and all(p.parent.parent == root for p in paths):
            self.classes = sorted({p.parent.name for p in paths})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = torch.tensor([index[p.parent.name] for p in paths])

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Tensor:
        arr = np.asarray(load_image(self.paths[i]), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def open_source(spec: str, split: str = "train") -> ImageSource:
    """``fashion-mnist`` (Debian package or ``fashion-mnist:/folder``), ``fashion-mnist:mini`` (the
    committed subset), an image folder, or a file list (txt/csv/jsonl)."""
    from ...data.mnist import FASHION_CLASSES

    if spec.split(":")[0] in ("fashion-mnist", "fmnist"):
        root = spec.split(":", 1)[1] if ":" in spec else None
        images, labels = load_fashion_mnist(split, root)
        return ArraySource(images, labels, FASHION_CLASSES)
    path = Path(spec)
    paths = list_images(path)
    if not paths:
        raise ValueError(f"{spec}: no images found (give a folder of images, a file list, or fashion-mnist)")
    return FileSource(paths, path if path.is_dir() else None)


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
