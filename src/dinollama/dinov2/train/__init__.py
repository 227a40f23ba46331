"""DINOv2 self-supervised training, distillation and fine-tuning (the official recipe, in plain PyTorch)."""

from .augment import MultiCrop, MultiCropConfig
from .config import PRESETS, SSLConfig, load_config
from .heads import DINOHead
from .losses import DINOLoss, iBOTPatchLoss, koleo_loss, sinkhorn_knopp
from .masking import BlockMasking, batch_masks
from .schedules import CosineSchedule, param_groups
from .ssl import SSLNetwork, SSLObjective, build_network
from .trainer import Trainer, TrainingError

__all__ = [
    "BlockMasking", "CosineSchedule", "DINOHead", "DINOLoss", "MultiCrop", "MultiCropConfig", "PRESETS", "SSLConfig",
    "SSLNetwork", "SSLObjective", "Trainer", "TrainingError", "batch_masks", "build_network", "iBOTPatchLoss",
    "koleo_loss", "load_config", "param_groups", "sinkhorn_knopp",
]
