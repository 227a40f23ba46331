"""Training utilities shared by the DINOv2 and Code Llama recipes: schedules and resumable checkpoints."""

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .options import autocast_dtype, overrides_to_dict
from .schedule import CosineSchedule

__all__ = [
    "CosineSchedule", "autocast_dtype", "load_checkpoint", "overrides_to_dict", "rng_state", "save_checkpoint",
    "set_rng_state",
]
