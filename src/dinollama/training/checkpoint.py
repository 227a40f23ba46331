"""Consolidated, atomic, exactly-resumable training checkpoints (plain, DDP or FSDP2 models)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng() -> list[dict]:
    if not dist.is_initialized():
        return [rng_state()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(path: Path, model: nn.Module, student: nn.Module, optimizer, extra: dict) -> None:
    """Gather full tensors on CPU (all ranks take part), then rank 0 writes ``path.tmp`` and renames
    it, so a kill at any moment leaves the previous checkpoint intact."""
    state = {
        "model": get_model_state_dict(model, options=_FULL),
        "optimizer": get_optimizer_state_dict(student, optimizer, options=_FULL),
        "rng": _gather_rng(),
        **extra,
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path, model: nn.Module, student: nn.Module, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG; returns the rest of the checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    set_model_state_dict(model, state.pop("model"), options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(student, optimizer, state.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
    rngs = state.pop("rng")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if len(rngs) == (dist.get_world_size() if dist.is_initialized() else 1):
        set_rng_state(rngs[rank])
    return state
