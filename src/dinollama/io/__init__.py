"""Checkpoint files: reading every format users hold, writing safetensors, a download cache."""

from .checkpoint import CheckpointError, read_metadata, read_state_dict, save_safetensors
from .download import OfflineError, cache_dir, download, fetch

__all__ = ["CheckpointError", "OfflineError", "cache_dir", "download", "fetch", "read_metadata", "read_state_dict", "save_safetensors"]
