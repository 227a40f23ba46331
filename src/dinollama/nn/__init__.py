"""Transformer parts shared by the DINOv2 and Code Llama families."""

from .attention import Attention, sdpa
from .layers import DropPath, LayerScale, Mlp, RMSNorm, SwiGLU, SwiGLUFused, swiglu_hidden_dim
from .rope import apply_rotary_emb, precompute_freqs_cis

__all__ = [
    "Attention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "RMSNorm",
    "SwiGLU",
    "SwiGLUFused",
    "apply_rotary_emb",
    "precompute_freqs_cis",
    "sdpa",
    "swiglu_hidden_dim",
]
