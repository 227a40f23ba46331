"""DINOv2 vision backbones: models, official weights, preprocessing, feature extraction."""

from .convert import detect_format, infer_config, to_hf, to_official
from .fast import optimize_for_inference
from .hub import BACKBONES, CLASSIFIERS, LinearClassifier, build, imagenet_classes, load, load_weights, save, weight_url
from .model import ARCHS, DinoVisionTransformer, ViTConfig, build_vit, fit_to_patches
from .onnx import export_onnx
from .transforms import EvalTransform, default_transform, make_eval_transform

__all__ = [
    "ARCHS",
    "BACKBONES",
    "CLASSIFIERS",
    "DinoVisionTransformer",
    "EvalTransform",
    "LinearClassifier",
    "ViTConfig",
    "build",
    "build_vit",
    "default_transform",
    "detect_format",
    "export_onnx",
    "fit_to_patches",
    "imagenet_classes",
    "infer_config",
    "load",
    "load_weights",
    "make_eval_transform",
    "optimize_for_inference",
    "save",
    "to_hf",
    "to_official",
    "weight_url",
]
