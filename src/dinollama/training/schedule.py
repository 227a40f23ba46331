"""Learning-rate style schedules shared by the training recipes."""

from __future__ import annotations

import math


class CosineSchedule:
    """``freeze`` iterations at 0, linear warm-up from ``start`` to ``base``, then cosine to ``final``;
    ``final`` after ``total`` iterations (the official ``CosineScheduler``)."""

    def __init__(self, base: float, final: float, total: int, warmup: int = 0, start: float = 0.0, freeze: int = 0) -> None:
        self.base, self.final, self.total = base, final, total
        self.warmup, self.start, self.freeze = warmup, start, freeze

    def __getitem__(self, it: int) -> float:
        if it >= self.total:
            return self.final
        if it < self.freeze:
            return 0.0
        it -= self.freeze
        if it < self.warmup:
            # np.linspace(start, base, warmup)[it]
            return self.start + (self.base - self.start) * (it / (self.warmup - 1) if self.warmup > 1 else 0.0)
        it -= self.warmup
        n = self.total - self.warmup - self.freeze
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * it / n))
