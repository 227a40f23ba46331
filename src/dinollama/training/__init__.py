"""Training utilities shared by the DINOv2 and Code Llama recipes: schedules, resumable checkpoints, memory."""

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .memory import keep_freed_memory
from .options import autocast_dtype, overrides_to_dict
from .schedule import CosineSchedule

__all__ = [
    "CosineSchedule", "autocast_dtype", "keep_freed_memory", "load_checkpoint", "overrides_to_dict", "rng_state", "save_checkpoint",
    "set_rng_state",
]
