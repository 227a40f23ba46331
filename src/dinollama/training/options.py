"""Command-line option helpers shared by the training commands."""

from __future__ import annotations

import json

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting (``None``: plain fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be bf16, fp16 or fp32, not {precision!r}")
    return PRECISIONS[precision]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def overrides_to_dict(pairs: list[str]) -> dict:
    """``["optim.epochs=10", "crops.global_crops_scale=[0.3,1]"]`` -> nested dict."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like section.key=value")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_value(value.strip())
    return out
