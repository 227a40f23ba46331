"""Load and export Code Llama checkpoints: official (model-parallel shards), Hugging Face, safetensors.

Key map, Hugging Face -> Meta: ``model.embed_tokens`` -> ``tok_embeddings``,
``model.layers.N.self_attn.{q,k,v,o}_proj`` -> ``layers.N.attention.w{q,k,v,o}`` (q and k
un-permuted from HF's half-split rotary layout back to Meta's interleaved pairs),
``mlp.{gate,down,up}_proj`` -> ``feed_forward.w{1,2,3}``, ``input_layernorm`` ->
``attention_norm``, ``post_attention_layernorm`` -> ``ffn_norm``, ``model.norm`` -> ``norm``,
``lm_head`` -> ``output``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..io import CheckpointError, read_state_dict, save_safetensors
from .model import ModelArgs, Transformer
from .quant import quantized_skeleton
from .tokenizer import Tokenizer

# Official model-parallel layout (fairscale): which dim each weight is split along.
_CAT_DIM0 = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
_CAT_DIM1 = ("tok_embeddings", "attention.wo", "feed_forward.w2")
_ARG_FIELDS = {f for f in ModelArgs.__dataclass_fields__}
QUANT_BUFFERS = (".qweight", ".scales", ".mins")  # quantized weights keep their own dtypes


def shard_dim(key: str) -> int | None:
    """0 or 1 for split weights, None for replicated ones (norms)."""
    name = key.rsplit(".weight", 1)[0]
    if name.endswith(_CAT_DIM0):
        return 0
    if name.endswith(_CAT_DIM1):
        return 1
    return None


def merge_shards(shards: list[dict[str, Tensor]], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One state dict from fairscale model-parallel shards, one tensor at a time."""
    out = {}
    for key in shards[0]:
        if key == "rope.freqs":
            continue
        dim = shard_dim(key)
        parts = [s[key] for s in shards]
        target = parts[0].dtype if dtype is None or key.endswith(QUANT_BUFFERS) else dtype
        if dim is None or len(parts) == 1:
            out[key] = parts[0].to(target)
            continue
        # Copy each shard straight into a tensor of the target dtype: no full-size temporaries.
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        merged, offset = torch.empty(shape, dtype=target), 0
        for part in parts:
            merged.narrow(dim, offset, part.shape[dim]).copy_(part)
            offset += part.shape[dim]
        out[key] = merged
    return out


def split_shards(sd: dict[str, Tensor], n: int) -> list[dict[str, Tensor]]:
    """The inverse of :func:`merge_shards` (to write an official MP=n folder)."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for key, t in sd.items():
        dim = shard_dim(key)
        pieces = [t] * n if dim is None else list(t.chunk(n, dim=dim))
        for s, piece in zip(shards, pieces):
            s[key] = piece.clone()
    return shards


def _args_from_params(params: dict, vocab: int, **overrides) -> ModelArgs:
    known = {k: v for k, v in params.items() if k in _ARG_FIELDS and v is not None}
    known["vocab_size"] = vocab if params.get("vocab_size", -1) in (-1, None) else params["vocab_size"]
    known.setdefault("rope_theta", 1e4)  # Llama 2 params.json omit it; Code Llama's set 1e6
    return ModelArgs(**{**known, **overrides})


def _build_and_fill(args: ModelArgs, sd: dict[str, Tensor], source: Path, dtype, device,
                    quantization: dict | None = None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
        if quantization:
            quantized_skeleton(model, quantization)
    missing, unexpected = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the Code Llama architecture in its config; missing: "
            f"{sorted(missing)[:6]}, unexpected: {sorted(unexpected)[:6]}"
        )
    sd = {k: v.to(device=device, dtype=v.dtype if k.endswith(QUANT_BUFFERS) or dtype is None else dtype)
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.freqs_cis = model._freqs(args.max_seq_len).to(device)
    return model.eval()


def load_official(folder: Path, dtype=None, device=None, **overrides) -> Transformer:
    """``params.json`` + ``consolidated.NN.pth`` (any model-parallel degree) or Meta-named safetensors."""
    params = json.loads((folder / "params.json").read_text())
    files = sorted(folder.glob("consolidated.*.pth")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth or *.safetensors weights")
    shards = [read_state_dict(f) for f in files]
    sd = merge_shards(shards, dtype)
    args = _args_from_params(params, sd["tok_embeddings.weight"].shape[0], **overrides)
    return _build_and_fill(args, sd, folder, dtype, device, params.get("quantization"))


def _unpermute(w: Tensor, n_heads: int) -> Tensor:
    """HF's rotary layout (first half / second half) -> Meta's interleaved pairs."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def _permute(w: Tensor, n_heads: int) -> Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


_HF_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def args_from_hf_config(cfg: dict, **overrides) -> ModelArgs:
    args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                     n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
                     norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 1e4),
                     max_seq_len=cfg.get("max_position_embeddings", 16384), ffn_hidden_dim=cfg["intermediate_size"])
    return ModelArgs(**{**args.to_dict(), **overrides})


def load_hf(folder: Path, dtype=None, device=None, **overrides) -> Transformer:
    cfg = json.loads((folder / "config.json").read_text())
    args = args_from_hf_config(cfg, **overrides)
    sd_hf = read_state_dict(folder)
    sd = {}
    for k, v in sd_hf.items():
        if k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            sd[{"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}[k]] = v
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", k)
        if not m or m.group(2) not in _HF_NAMES:
            if "rotary_emb" in k:
                continue
            sd[k] = v  # reported as unexpected
            continue
        name = _HF_NAMES[m.group(2)]
        v = v.to(dtype) if dtype is not None else v  # cast first: the un-permute copy is then smaller
        if name == "attention.wq":
            v = _unpermute(v, args.n_heads)
        elif name == "attention.wk":
            v = _unpermute(v, args.kv_heads)
        sd[f"layers.{m.group(1)}.{name}.weight"] = v
    if "output.weight" not in sd and cfg.get("tie_word_embeddings"):
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return _build_and_fill(args, sd, folder, dtype, device)


def save_hf(model: Transformer, folder: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """A folder ``LlamaForCausalLM.from_pretrained`` reads: config.json, model.safetensors, tokenizer.model."""
    folder = Path(folder)
    a = model.params
    names = {v: k for k, v in _HF_NAMES.items()}
    out = {}
    for k, v in model.state_dict().items():
        if k in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            out[{"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}[k]] = v
            continue
        i, name = re.match(r"layers\.(\d+)\.(.+)\.weight$", k).groups()
        if name == "attention.wq":
            v = _permute(v, a.n_heads)
        elif name == "attention.wk":
            v = _permute(v, a.kv_heads)
        out[f"model.layers.{i}.{names[name]}.weight"] = v
    save_safetensors(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
        "intermediate_size": a.ffn_hidden, "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta, "max_position_embeddings": a.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": str(
            model.tok_embeddings.weight.dtype).replace("torch.", ""),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.model")
    return folder


def save_native(model: Transformer, folder: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Our format: Meta's key names in ``model.safetensors`` + ``params.json`` (+ ``tokenizer.model``)."""
    folder = Path(folder)
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    params = {**model.params.to_dict(), **({"quantization": model.quantization} if hasattr(model, "quantization") else {})}
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.model")
    return folder


def default_model_dir() -> Path:
    """The shipped default code model (``weights/default``: model.safetensors, params.json, tokenizer.model)."""
    from importlib import resources

    folder = Path(str(resources.files(__package__).joinpath("weights", "default")))
    if not (folder / "params.json").exists():
        raise CheckpointError(f"{folder}: the shipped default code model is missing from this installation; "
                              "reinstall dinollama or pass a model folder")
    return folder


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, **overrides) -> tuple[Transformer, Tokenizer | None]:
    """``(model, tokenizer)`` from an official folder, a Hugging Face folder, one of ours, or a GGUF file
    (quantized types stay low-bit in memory); ``"default"`` is the small model shipped with the package
    (trained here on CPython's stdlib)."""
    folder = default_model_dir() if str(path) == "default" else Path(path).expanduser()
    if folder.is_file() and folder.suffix == ".gguf":
        from .gguf_file import load_gguf

        return load_gguf(folder, dtype, device, **overrides)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such model folder (give an official, Hugging Face or dinollama model "
                                "folder, or 'default')")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a model folder (params.json or config.json with weights)")
    if (folder / "params.json").exists():
        model = load_official(folder, dtype, device, **overrides)
    elif (folder / "config.json").exists():
        model = load_hf(folder, dtype, device, **overrides)
    else:
        raise CheckpointError(f"{folder}: neither params.json (official layout) nor config.json (Hugging Face) found")
    tok_file = folder / "tokenizer.model"
    tokenizer = Tokenizer(tok_file) if tok_file.exists() else None
    if tokenizer is not None and tokenizer.n_words > model.params.vocab_size:
        raise CheckpointError(f"{tok_file}: {tokenizer.n_words} pieces but the model has {model.params.vocab_size} embeddings")
    return model, tokenizer
