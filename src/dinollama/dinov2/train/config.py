"""Training configuration: dataclasses whose sections and keys follow the official
``ssl_default_config.yaml`` (``student``, ``crops``, ``dino``, ``ibot``, ``teacher``, ``optim``,
``train``), plus named presets and ``key=value`` overrides."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

from ...nn.kernels import notice
from ...training.options import checked, overrides_to_dict
from .augment import MultiCropConfig


@dataclass
class StudentConfig:
    arch: str = "vit_large"
    patch_size: int = 14
    drop_path_rate: float = 0.3
    layerscale: float = 1.0e-5
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    embed_dim: int | None = None  # None: the arch's width; set for custom small models
    depth: int | None = None
    num_heads: int | None = None
    pretrained_weights: str = ""

    POSITIVE = ("patch_size", "embed_dim", "depth", "num_heads")
    CHOICES = {"arch": ("vit_small", "vit_base", "vit_large", "vit_giant2"), "ffn_layer": ("mlp", "swiglufused")}


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1

    POSITIVE = ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048

    POSITIVE = DinoConfig.POSITIVE


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30

    POSITIVE = ("warmup_teacher_temp", "teacher_temp")


@dataclass
class OptimConfig:
    epochs: float = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004
    warmup_epochs: float = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1
    scaling_rule: str = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    POSITIVE = ("epochs",)
    CHOICES = {"scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none")}


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    grad_accum: int = 1
    centering: str = "centering"  # or "sinkhorn_knopp"
    seed: int = 0
    num_workers: int = 2
    # None: an epoch is one pass over the data. The official code fixes it at 1250 iterations
    # (OFFICIAL_EPOCH_LENGTH) whatever the dataset; set 1250 to reproduce its schedules.
    epoch_length: int | None = None
    precision: str = "bf16"  # bf16 | fp16 | fp32
    parallel: str = "ddp"  # ddp | fsdp (only used under torchrun)
    saveckp_every: int = 500  # iterations
    log_every: int = 10
    knn_every: int = 0  # iterations between k-NN checks (0: only at the end)
    knn_holdout: int = 0  # labelled training images held out of training for the k-NN check
    knn_train: int = 5000  # training images in the k-NN index of the check
    max_iterations: int | None = None  # stop early (the schedules still span the full run)

    POSITIVE = ("batch_size_per_gpu", "grad_accum", "epoch_length", "saveckp_every", "log_every", "knn_train",
                "max_iterations")
    CHOICES = {"centering": ("centering", "sinkhorn_knopp"), "precision": ("bf16", "fp16", "fp32"),
               "parallel": ("ddp", "fsdp")}


@dataclass
class SSLConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled_lr(self, world_size: int) -> float:
        """``base_lr`` times the batch scaling rule (official default: sqrt(total batch / 1024))."""
        total = self.train.batch_size_per_gpu * self.train.grad_accum * world_size
        rule = self.optim.scaling_rule
        if rule == "sqrt_wrt_1024":
            return self.optim.base_lr * math.sqrt(total / 1024)
        if rule == "linear_wrt_256":
            return self.optim.base_lr * total / 256
        if rule == "none":
            return self.optim.base_lr
        raise ValueError(f"optim.scaling_rule must be sqrt_wrt_1024, linear_wrt_256 or none, not {rule!r}")


PRESETS: dict[str, dict] = {
    # The official ViT-L/14 recipe of ssl_default_config.yaml + vitl14.yaml (LVD-142M, 625k iterations).
    "vitl14": {},
    "vits14": {"student": {"arch": "vit_small", "drop_path_rate": 0.1}},
    "vitb14": {"student": {"arch": "vit_base", "drop_path_rate": 0.1}},
    # The shipped default: a 2.7M-parameter ViT/14 on Fashion-MNIST at 56 px, one hour on 2 CPU cores.
    # LayerScale starts at 0.1, not 1e-5: with 1e-5 the class token barely depends on the image for
    # the first few hundred iterations, the centred teacher is uniform and the DINO term gives no
    # signal for far longer than this short schedule (measured: flat DINO loss for 500 iterations).
    "fmnist-tiny": {
        "student": {"arch": "vit_small", "embed_dim": 192, "depth": 6, "num_heads": 3, "drop_path_rate": 0.0,
                    "layerscale": 0.1},
        "crops": {"global_crops_size": 56, "local_crops_size": 28, "local_crops_number": 4,
                  "global_crops_scale": [0.7, 1.0], "local_crops_scale": [0.25, 0.5], "eval_crop_pct": 1.0},
        "dino": {"head_n_prototypes": 4096, "head_hidden_dim": 1024, "head_bottleneck_dim": 256},
        "ibot": {"head_n_prototypes": 4096, "head_hidden_dim": 1024, "head_bottleneck_dim": 256},
        "teacher": {"momentum_teacher": 0.99, "warmup_teacher_temp_epochs": 2},
        "optim": {"epochs": 8, "warmup_epochs": 1, "base_lr": 0.004, "scaling_rule": "sqrt_wrt_1024",
                  "freeze_last_layer_epochs": 0.2, "weight_decay_end": 0.2},
        "train": {"batch_size_per_gpu": 128, "num_workers": 1, "knn_every": 500, "knn_holdout": 2000,
                  "knn_train": 5000, "saveckp_every": 200},
    },
    # A seconds-long configuration for tests and smoke runs.
    "test-tiny": {
        "student": {"arch": "vit_small", "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.0},
        "crops": {"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 2},
        "dino": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        "optim": {"epochs": 2, "warmup_epochs": 1},
        "train": {"batch_size_per_gpu": 4, "num_workers": 0, "log_every": 1, "saveckp_every": 1},
    },
}


# Keys of the official YAML files that have no meaning here (xFormers/FSDP-1 knobs, paths given on
# the command line, precision set by ``train.precision``); accepted and ignored.
OFFICIAL_IGNORED = {
    "block_chunks", "qkv_bias", "proj_bias", "ffn_bias", "drop_path_uniform", "interpolate_antialias",
    "interpolate_offset", "compute_precision", "evaluation", "dataset_path", "output_dir", "cache_dataset",
    "lr",
}
_RENAMED = {"OFFICIAL_EPOCH_LENGTH": "epoch_length"}


def _merge(obj, updates: dict, where: str, explicit: bool = False):
    """A copy of dataclass ``obj`` with ``updates`` applied; unknown keys name the section and choices.

    Official keys with no meaning here are skipped, with a note when the user set one (``explicit``)."""
    known = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in updates.items():
        key = _RENAMED.get(key, key)
        if key in OFFICIAL_IGNORED and key not in known:
            if explicit:
                hint = "; set optim.base_lr (scaled by optim.scaling_rule)" if key == "lr" else ""
                notice(f"{where}{key} is an official key with no effect here, ignored{hint}")
            continue
        if key not in known:
            raise ValueError(f"unknown config key {where}{key}; {where.rstrip('.') or 'top level'} has: {', '.join(known)}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config section {where}{key} must be a mapping, got {value!r}")
            value = _merge(current, value, f"{where}{key}.", explicit)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return replace(obj, **changes)


def load_config(source: str | Path | None = None, preset: str | None = None, overrides: list[str] | None = None) -> SSLConfig:
    """Defaults <- preset <- YAML/JSON file (the official format) <- ``key=value`` overrides."""
    cfg = SSLConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        cfg = _merge(cfg, PRESETS[preset], "")
    if source is not None:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such config file")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        data.pop("MODEL", None)  # official configs carry a MODEL.WEIGHTS entry for evaluation
        cfg = _merge(cfg, data, "")
    if overrides:
        cfg = _merge(cfg, overrides_to_dict(overrides), "", explicit=True)
    return checked(cfg)
