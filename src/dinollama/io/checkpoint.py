"""Read state dicts from ``.pth``/``.bin``/``.safetensors`` files and Hugging Face folders, safely."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


def _torch_load(path: Path) -> dict:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (non-zip) checkpoints cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors are reported with the file name, not as a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch checkpoint ({first}). Only tensors and plain containers are "
            "loaded (weights_only=True); a file from another tool may need converting to safetensors first."
        ) from None


def _hf_folder_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pth")) or sorted(folder.glob("*.bin"))
    if not found:
        raise CheckpointError(f"{folder}: no model.safetensors, pytorch_model.bin or *.pth file in this folder")
    return found


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or folder, memory-mapped where the format allows.

    Pickled files are read with ``weights_only=True``: a checkpoint cannot run code.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        out: dict[str, torch.Tensor] = {}
        for f in _hf_folder_files(path):
            out.update(read_state_dict(f))
        return out
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write contiguous, unshared copies (safetensors refuses aliased storage) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
