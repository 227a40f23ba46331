"""Training utilities shared by the DINOv2 and Code Llama recipes: schedules and resumable checkpoints."""

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .schedule import CosineSchedule

__all__ = ["CosineSchedule", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]
