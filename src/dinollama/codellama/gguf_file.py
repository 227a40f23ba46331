"""GGUF in and out (the files of llama.cpp and Ollama), through the ``gguf`` package.

Read: the ``llama.*`` hyper-parameters, the tensors (GGUF keeps Meta's interleaved RoPE layout for
wq/wk, as ours), and the tokenizer rebuilt as a SentencePiece model from ``tokenizer.ggml.*``.
Q8_0, Q4_0 and Q4_1 tensors become :class:`QuantLinear` codes and scales as stored (no second
rounding); other types (F16, BF16, the K-quants of Q4_K_M files, ...) are dequantized by
``gguf.quants`` and kept in ``dtype``, or requantized to ``requantize``. Write: F32, F16, BF16,
Q8_0 and Q4_0; our int8/32 and symmetric int4/32 weights are written as their own codes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import CheckpointError
from .model import ModelArgs, Transformer
from .quant import QuantConfig, QuantLinear
from .tokenizer import Tokenizer

_LAYER = {"attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
          "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
          "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_BLOCK = {8: 34, 2: 18, 3: 20}  # bytes per 32 weights: Q8_0, Q4_0, Q4_1


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading and writing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def _ours(name: str) -> str:
    base, _, leaf = name.rpartition(".")
    if base.startswith("blk."):
        _, i, part = base.split(".", 2)
        return f"layers.{i}.{_LAYER[part]}.{leaf}"
    return f"{_TOP[base]}.{leaf}"


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def args_from_gguf(reader, **overrides) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r}: only llama-architecture files (Code Llama) load here")
    p = "llama."
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    args = ModelArgs(dim=_field(reader, p + "embedding_length"), n_layers=_field(reader, p + "block_count"),
                     n_heads=_field(reader, p + "attention.head_count"),
                     n_kv_heads=_field(reader, p + "attention.head_count_kv"),
                     vocab_size=_field(reader, p + "vocab_size", len(tokens)),
                     norm_eps=_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5),
                     rope_theta=_field(reader, p + "rope.freq_base", 1e4),
                     max_seq_len=_field(reader, p + "context_length", 4096),
                     ffn_hidden_dim=_field(reader, p + "feed_forward_length"))
    return ModelArgs(**{**args.to_dict(), **overrides})


def tokenizer_from_gguf(reader) -> Tokenizer | None:
    """The SentencePiece model behind ``tokenizer.ggml.*`` (Llama's BPE with byte fallback)."""
    if _field(reader, "tokenizer.ggml.model") != "llama":
        return None
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
    m.trainer_spec.bos_id = _field(reader, "tokenizer.ggml.bos_token_id", 1)
    m.trainer_spec.eos_id = _field(reader, "tokenizer.ggml.eos_token_id", 2)
    m.trainer_spec.pad_id = _field(reader, "tokenizer.ggml.padding_token_id", -1)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    m.trainer_spec.vocab_size = len(tokens)
    for piece, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, kind  # GGUF's token types are SentencePiece's enum values
    return Tokenizer.from_proto(m.SerializeToString())


def _blocks(t, qtype: int) -> np.ndarray:
    rows = int(t.shape[1]) if len(t.shape) > 1 else 1
    return np.asarray(t.data).reshape(rows, -1, _BLOCK[qtype])


def quant_from_gguf(t) -> QuantLinear:
    """A Q8_0/Q4_0/Q4_1 tensor as a :class:`QuantLinear` with the file's codes and scales."""
    qtype = int(t.tensor_type)
    raw = _blocks(t, qtype)
    out_f, in_f = int(t.shape[1]), int(t.shape[0])
    d = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0])
    if qtype == 8:
        q = QuantLinear(in_f, out_f, QuantConfig(8, 32))
        q.set_codes(torch.from_numpy(raw[..., 2:].copy().view(np.int8)).reshape(out_f, in_f), d)
        return q
    start = 2 if qtype == 2 else 4
    nib = raw[..., start:]
    codes = np.concatenate([nib & 15, nib >> 4], axis=-1).reshape(out_f, in_f)  # element j and j + 16 share a byte
    q = QuantLinear(in_f, out_f, QuantConfig(4, 32, symmetric=qtype == 2))
    mins = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0]) if qtype == 3 else None
    q.set_codes(torch.from_numpy(codes.astype(np.uint8)), d, mins)
    return q


def dequantized(t) -> Tensor:
    """Any GGUF tensor as float32 in our (out, in) order, by ``gguf.quants``."""
    gguf = _gguf()
    arr = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(int(t.tensor_type)))
    return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(*reversed([int(s) for s in t.shape]))


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, requantize: str | None = None,
              **overrides) -> tuple[Transformer, Tokenizer | None]:
    """``(model, tokenizer)`` of a llama-architecture GGUF file (see the module doc)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    args = args_from_gguf(reader, **overrides)
    with torch.device("meta"):
        model = Transformer(args)
    quantized: dict[str, QuantLinear] = {}
    sd: dict[str, Tensor] = {}
    for t in reader.tensors:
        name = _ours(t.name)
        if int(t.tensor_type) in _BLOCK and name.endswith(".weight") and "tok_embeddings" not in name:
            quantized[name.removesuffix(".weight")] = quant_from_gguf(t)
        else:
            sd[name] = dequantized(t).to(dtype or torch.float32)
    if requantize:
        from .quant import parse_scheme

        config = parse_scheme(requantize)
        for name in [k for k in sd if k.startswith("layers.") and k.rsplit(".", 2)[-2].startswith("w")]:
            quantized[name.removesuffix(".weight")] = QuantLinear.from_float(sd.pop(name), config)
    for name, q in quantized.items():
        parent, _, attr = name.rpartition(".")
        (model.get_submodule(parent) if parent else model).register_module(attr, q if device is None else q.to(device))
    missing = set(model.state_dict()) - set(sd) - {k for k in model.state_dict() if k.rsplit(".", 1)[0] in quantized}
    unexpected = set(sd) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit the llama architecture of its metadata; missing: "
                              f"{sorted(missing)[:6]}, unexpected: {sorted(unexpected)[:6]}")
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=False, assign=True)
    if quantized:
        configs = {(q.config.bits, q.config.group_size, q.config.symmetric) for q in quantized.values()}
        if len(configs) == 1:  # one scheme throughout: it saves and loads as a quantized model of ours
            bits, g, sym = configs.pop()
            model.quantization = {"bits": bits, "group_size": g, "symmetric": sym, "head": "output" in quantized}
    model.freqs_cis = model._freqs(args.max_seq_len).to(device)
    return model.eval(), tokenizer_from_gguf(reader)


# -- writing ------------------------------------------------------------------------------------


def _q8_0(codes: Tensor, d: Tensor) -> np.ndarray:
    out_f, in_f = codes.shape
    blocks = np.empty((out_f, in_f // 32, 34), dtype=np.uint8)
    blocks[..., :2] = d.to(torch.float16).numpy().reshape(out_f, -1, 1).view(np.uint8)
    blocks[..., 2:] = codes.reshape(out_f, -1, 32).numpy().view(np.uint8)
    return blocks.reshape(out_f, -1)


def _q4_0(codes: Tensor, d: Tensor) -> np.ndarray:
    out_f, in_f = codes.shape
    c = codes.reshape(out_f, -1, 32).numpy().astype(np.uint8)
    blocks = np.empty((out_f, in_f // 32, 18), dtype=np.uint8)
    blocks[..., :2] = d.to(torch.float16).numpy().reshape(out_f, -1, 1).view(np.uint8)
    blocks[..., 2:] = c[..., :16] | (c[..., 16:] << 4)
    return blocks.reshape(out_f, -1)


def _tensor_payload(gguf, module_or_tensor, qtype: str):
    """``(array, raw_dtype)`` of one tensor for ``qtype``; norms stay float32 as llama.cpp expects."""
    Q = gguf.GGMLQuantizationType
    if isinstance(module_or_tensor, QuantLinear):
        q = module_or_tensor
        c = q.config
        if c.group_size == 32 and c.bits == 8 and qtype == "q8_0":
            return _q8_0(q.codes(), q.scales.float()), Q.Q8_0
        if c.group_size == 32 and c.bits == 4 and c.symmetric and qtype == "q4_0":
            return _q4_0(q.codes(), q.scales.float()), Q.Q4_0
        w = q.dequantize(torch.float32)
    else:
        w = module_or_tensor.detach().float()
    if w.dim() == 1:
        return w.numpy(), Q.F32
    arr = w.numpy()
    if qtype == "f32":
        return arr, Q.F32
    if qtype == "f16":
        return arr.astype(np.float16), Q.F16
    kind = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    return gguf.quants.quantize(arr, kind), kind


def _write_tokenizer(writer, tok: Tokenizer) -> None:
    sp = tok.sp_model
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
             for i in range(sp.vocab_size())]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for key, tid in (("prefix", tok.prefix_id), ("suffix", tok.suffix_id), ("middle", tok.middle_id), ("eot", tok.eot_id)):
        if tid is not None:  # llama.cpp's names for the infilling pieces
            writer.add_uint32({"prefix": "tokenizer.ggml.fim_pre_token_id", "suffix": "tokenizer.ggml.fim_suf_token_id",
                               "middle": "tokenizer.ggml.fim_mid_token_id", "eot": "tokenizer.ggml.eot_token_id"}[key], tid)


def save_gguf(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike, qtype: str = "f16") -> Path:
    """Write ``model`` as a llama-architecture GGUF file that llama.cpp and Ollama run."""
    gguf = _gguf()
    if qtype not in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        raise ValueError(f"qtype must be f32, f16, bf16, q8_0 or q4_0, got {qtype!r}")
    if tokenizer is None:
        raise ValueError("a GGUF file needs the tokenizer (llama.cpp reads it from the file)")
    if any(getattr(layer.attention, "wqkv", None) is not None for layer in model.layers):
        raise ValueError("save the model before optimize_for_inference (its fused projections have no GGUF names)")
    a = model.params
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(a.max_seq_len)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.n_layers)
    writer.add_feed_forward_length(a.ffn_hidden)
    writer.add_rope_dimension_count(a.head_dim)
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.kv_heads)
    writer.add_layer_norm_rms_eps(a.norm_eps)
    writer.add_rope_freq_base(a.rope_theta)
    writer.add_vocab_size(a.vocab_size)
    file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[qtype]
    writer.add_file_type(file_type)
    _write_tokenizer(writer, tokenizer)
    names = {v: k for k, v in _TOP.items()}
    layer_names = {v: k for k, v in _LAYER.items()}
    entries = [(f"{names['tok_embeddings']}.weight", model.tok_embeddings.weight)]
    for i, layer in enumerate(model.layers):
        for ours, theirs in layer_names.items():
            mod = layer.get_submodule(ours)
            entries.append((f"blk.{i}.{theirs}.weight", mod if isinstance(mod, QuantLinear) else mod.weight))
    entries += [(f"{names['norm']}.weight", model.norm.weight),
                (f"{names['output']}.weight", model.output if isinstance(model.output, QuantLinear) else model.output.weight)]
    for name, item in entries:
        arr, raw = _tensor_payload(gguf, item, qtype)
        writer.add_tensor(name, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
