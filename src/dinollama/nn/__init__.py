"""Transformer parts shared by the DINOv2 and Code Llama families."""

from .attention import Attention, sdpa, self_attention
from .fast import DecodeLinear, PackedLinear, bmm_attention, decode_linears, onednn_available, pack_linears
from .layers import DropPath, LayerScale, Mlp, RMSNorm, SwiGLU, SwiGLUFused, swiglu_hidden_dim
from .rope import apply_rotary_emb, precompute_freqs_cis

__all__ = [
    "Attention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "DecodeLinear",
    "PackedLinear",
    "RMSNorm",
    "SwiGLU",
    "SwiGLUFused",
    "apply_rotary_emb",
    "bmm_attention",
    "onednn_available",
    "decode_linears",
    "pack_linears",
    "precompute_freqs_cis",
    "sdpa",
    "self_attention",
    "swiglu_hidden_dim",
]
