"""Sampling settings and the sampler, shared by the engine, the Generator and the server."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to decode; checked on creation, so the CLI, the Python API and the server refuse the same
    values with the same one-line ``ValueError``."""

    max_gen_len: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False
    echo: bool = False
    stop_strings: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_int("max_gen_len", self.max_gen_len, low=1)
        _check_int("top_k", self.top_k, low=0, note=" (0 = no top-k cut)")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
            if self.seed >= 2**63:
                raise ValueError(f"seed must be below 2**63, got {self.seed}")
        _check_float("temperature", self.temperature, 0.0, None, "0 (greedy) or more")
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]")
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0; use temperature 0 for greedy decoding")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop_strings)!r}")


def _check_int(name: str, value, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{note}, got {value}")


def _check_float(name: str, value, low: float, high: float | None, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {what}, got {value}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy when ``temperature == 0``; else top-k, then nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    # shifted to max 0 and the temperature kept a float32 number: a tiny one leaves only the top tokens, never nan
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep tokens until the mass before them exceeds top_p
    sorted_p = sorted_p.masked_fill(cut, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return idx.gather(-1, choice).squeeze(-1)
