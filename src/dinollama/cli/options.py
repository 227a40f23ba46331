"""Options shared by the commands: dtypes, devices, checked numbers and paths.

Every check here turns a user mistake into one line (argparse's ``error:`` or a ``ValueError``
that ``main`` prints) before any model is loaded or any file is written.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bf16 where the device computes it natively (AVX512-BF16/AMX CPUs, recent GPUs), else fp32 "
                        "(fp16 on GPUs without bf16)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_arg, default=default_device())


def device_arg(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch build sees no CUDA GPU; use --device cpu")
    return text


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value; ``auto`` asks :mod:`dinollama.nn.kernels`."""
    from ..nn.kernels import auto_dtype

    return auto_dtype(device) if name == "auto" else DTYPES[name]


def _number(kind, low: float | None, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 0, True, "a positive whole number")
nonneg_int = _number(int, 0, False, "0 or more")
positive_float = _number(float, 0, True, "a positive number")
nonneg_float = _number(float, 0, False, "0 or more")
finite_float = _number(float, None, False, "a finite number")
image_size = _number(int, 14, False, "at least 14 pixels (one patch)")


def unit_interval(text: str) -> float:
    value = nonneg_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return value


def _can_write_in(folder: Path) -> bool:
    """Try it: permission bits say nothing to root, and a read-only mount says no to everyone."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def writable_file(path: str | os.PathLike, flag: str, parents: bool = False) -> Path:
    """``path`` as a file this process can create or replace (``parents``: in folders it may create);
    else a ``ValueError`` naming the option and the fix."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        if not parents:
            raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it first")
        folder = next(p for p in folder.parents if p.exists())
        if not folder.is_dir():
            raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not _can_write_in(folder) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: {folder} is not writable; choose another place")
    return path


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a folder this process can create or write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file; give a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not _can_write_in(existing):
        raise ValueError(f"{flag} {path}: {existing} is not writable; choose another place")
    return path


def _as_type(check, **kw):
    """An argparse ``type`` from a check: the mistake is reported while parsing, before any work."""
    def parse(text: str) -> str:
        try:
            check(text, "", **kw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None
        return text

    return parse


output_file = _as_type(writable_file, parents=True)  # a file; missing folders are created by the command
new_file = _as_type(writable_file)  # a file in a folder that exists
output_folder = _as_type(writable_folder)
