"""Command-line option helpers shared by the training commands."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

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


def _coerce(value, hint, name: str):
    """``value`` as the annotated type ``hint`` (int, float, bool, str, tuples, ``X | None``), else ValueError."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError(f"{name} must be a list of {len(args)} values like [0.3, 1.0], got {value!r}")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return tuple(_coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def checked(obj, where: str = ""):
    """A copy of dataclass ``obj`` whose fields have their annotated types, and whose numbers are >= 0
    (> 0 for the names in the class's ``POSITIVE``) and strings in its ``CHOICES``; nested sections
    are checked too. The message names the key (``optim.epochs``) and what it takes."""
    hints = typing.get_type_hints(type(obj))
    positive, choices = getattr(obj, "POSITIVE", ()), getattr(obj, "CHOICES", {})
    changes = {}
    for f in dataclasses.fields(obj):
        name, value = f"{where}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = checked(value, f"{name}.")
            continue
        value = _coerce(value, hints[f.name], name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if f.name in positive and v <= 0:
                    raise ValueError(f"{name} must be > 0, got {v}")
                if v < 0:
                    raise ValueError(f"{name} must be >= 0, got {v}")
        if f.name in choices and value not in choices[f.name]:
            raise ValueError(f"{name} must be one of {', '.join(choices[f.name])}, got {value!r}")
        changes[f.name] = value
    return dataclasses.replace(obj, **changes)
