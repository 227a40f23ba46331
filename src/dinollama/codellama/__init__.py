"""Code Llama: the Llama 2 architecture, official/HF checkpoints, tokenizer, generation, infilling, chat."""

from .checkpoint import load, merge_shards, save_hf, save_native, split_shards
from .fast import optimize_for_inference
from .generation import Generator, SamplingParams, generate, sample
from .gguf_file import load_gguf, save_gguf
from .model import PRESETS, ModelArgs, Transformer, build
from .prompts import chat_prompt_tokens, fit_dialog, infilling_prompt_tokens
from .quant import QuantConfig, QuantLinear, quantize
from .tokenizer import InfillingNotSupported, Tokenizer

__all__ = [
    "PRESETS",
    "QuantConfig",
    "QuantLinear",
    "Generator",
    "InfillingNotSupported",
    "ModelArgs",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "build",
    "chat_prompt_tokens",
    "fit_dialog",
    "generate",
    "infilling_prompt_tokens",
    "load",
    "load_gguf",
    "optimize_for_inference",
    "merge_shards",
    "quantize",
    "sample",
    "save_gguf",
    "save_hf",
    "save_native",
    "split_shards",
]
