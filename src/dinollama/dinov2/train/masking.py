"""iBOT masks: BEiT-style block masking and the per-batch stratified mask ratios of DINOv2."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


class BlockMasking:
    """Masks of rectangular blocks on a ``grid x grid`` patch map (BEiT's generator).

    Blocks have at least ``min_patches`` patches, aspect ratio in ``[min_aspect, 1/min_aspect]`` and
    at most ``max_patches`` (default half the grid) each; blocks are added until the target count
    is reached or no block fits.
    """

    def __init__(self, grid: int, min_patches: int = 4, max_patches: int | None = None, min_aspect: float = 0.3) -> None:
        self.grid = grid
        self.min_patches = min_patches
        self.max_patches = max_patches if max_patches is not None else int(0.5 * grid * grid)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: Tensor, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < self.grid and h < self.grid:
                top, left = rng.randint(0, self.grid - h), rng.randint(0, self.grid - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, n_masked: int, rng: random.Random) -> Tensor:
        mask = torch.zeros(self.grid, self.grid, dtype=torch.bool)
        count = 0
        while count < n_masked:
            added = self._add_block(mask, min(n_masked - count, self.max_patches), rng)
            if added == 0:
                break
            count += added
        return mask


def batch_masks(n_images: int, n_tokens: int, generator: BlockMasking, rng: random.Random,
                mask_probability: float = 0.5, ratio: tuple[float, float] = (0.1, 0.5)) -> Tensor:
    """``(n_images, n_tokens)`` masks: ``int(n * p)`` images masked with ratios stratified over
    ``ratio`` (one draw per equal sub-interval), the rest unmasked, in shuffled order."""
    n_masked = int(n_images * mask_probability)
    edges = torch.linspace(ratio[0], ratio[1], n_masked + 1).tolist()
    masks = [generator(int(n_tokens * rng.uniform(edges[i], edges[i + 1])), rng) for i in range(n_masked)]
    masks += [generator(0, rng) for _ in range(n_images - n_masked)]
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1)
