"""The Llama 2 architecture as Code Llama uses it, with Meta's parameter names.

``load_state_dict(strict=True)`` takes a merged official checkpoint (``rope.freqs`` dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..nn import RMSNorm, SwiGLU, apply_rotary_emb, precompute_freqs_cis


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32016
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 16384
    ffn_hidden_dim: int | None = None  # explicit FFN width (Hugging Face configs); else Meta's rule

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to ``multiple_of``."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)


_SIZES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32),
    "13b": dict(dim=5120, n_layers=40, n_heads=40),
    "34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
}


def _preset(size: str, variant: str) -> ModelArgs:
    args = ModelArgs(**_SIZES[size])
    if variant == "python" or size == "34b":
        args = replace(args, vocab_size=32000)
    if size == "70b" and variant in ("python", "instruct"):
        args = replace(args, rope_theta=1e4, max_seq_len=4096)
    return args


PRESETS: dict[str, ModelArgs] = {
    f"codellama-{size}{'' if v == 'base' else '-' + v}": _preset(size, v)
    for size in _SIZES
    for v in ("base", "python", "instruct")
}


class KVCache(nn.Module):
    """Preallocated keys/values ``(B, kv_heads, max_seq_len, head_dim)``, written in place."""

    def __init__(self, batch: int, seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        shape = (batch, kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, _, t, _ = k.shape
        self.k[:b, :, start : start + t] = k
        self.v[:b, :, start : start + t] = v
        return self.k[:b, :, : start + t], self.v[:b, :, : start + t]


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings (``wq, wk, wv, wo``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None
        self.wqkv: nn.Module | None = None

    def forward(self, x: Tensor, freqs_cis: Tensor, start_pos: int, mask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        if self.wqkv is not None:  # fused by optimize_for_inference: one projection instead of three
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        if t == 1:
            out = self._decode_attention(q, k, v)
        else:
            causal = mask is None and k.shape[2] == t
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def _decode_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One query per sequence: grouped matmuls against the cache, no K/V repetition for GQA.

        Faster than the fused CPU kernels for a single query (2x in bf16), softmax in fp32.
        """
        b, h, _, d = q.shape
        qg = q.view(b, self.n_kv, h // self.n_kv, d)
        scores = (qg @ k.transpose(-1, -2)) * d**-0.5
        return (scores.float().softmax(-1).to(v.dtype) @ v).view(b, h, 1, d)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = SwiGLU(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, start_pos: int, mask: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Code Llama: ``model(tokens, start_pos)`` -> float32 logits ``(B, T, vocab)`` over a KV cache."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.params = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Complex fp32 rotations kept out of the buffers: Module.to(dtype) would cast them to real.
        self.freqs_cis = self._freqs(args.max_seq_len * 2)
        self.max_batch = self.cache_len = 0
        self.activation_checkpointing = False  # recompute each block in backward: memory for time

    def _freqs(self, n: int) -> Tensor:
        return precompute_freqs_cis(self.params.head_dim, n, self.params.rope_theta)

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache for up to ``max_batch`` sequences of ``max_seq_len`` tokens."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch, max_seq_len, attn.n_kv, attn.head_dim, dtype, device)
        if self.freqs_cis.shape[0] < max_seq_len:
            self.freqs_cis = self._freqs(max_seq_len).to(device)
        self.max_batch, self.cache_len = max_batch, max_seq_len

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
        self.max_batch = self.cache_len = 0

    def _hidden(self, tokens: Tensor, start_pos: int, mask: Tensor | None) -> Tensor:
        h = self.tok_embeddings(tokens)
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        freqs = self.freqs_cis[start_pos : start_pos + tokens.shape[1]]
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, freqs, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, freqs, start_pos, mask)
        return self.norm(h)

    def forward(self, tokens: Tensor, start_pos: int = 0, *, train: bool = False) -> Tensor:
        """Logits for ``tokens`` placed at ``start_pos`` of the cached sequence (float32, as the reference).

        ``train=True`` is ``forward_train`` through ``__call__``, so DDP/FSDP wrappers see the call.
        """
        if train:
            return self.forward_train(tokens)
        b, t = tokens.shape
        if self.max_batch < b or start_pos + t > self.cache_len:
            if start_pos:
                raise ValueError(f"no KV cache holds positions {start_pos}..{start_pos + t}; call setup_cache first")
            # An implicit cache covers the prompt and room to continue, not the whole context.
            self.setup_cache(b, max(t, min(self.params.max_seq_len, 2048)))
        mask = None
        if t > 1 and start_pos > 0:  # chunked prefill: query i sees keys 0 .. start_pos + i
            mask = torch.ones(t, start_pos + t, dtype=torch.bool, device=tokens.device).tril(start_pos)
        return self.output(self._hidden(tokens, start_pos, mask)).float()

    def forward_train(self, tokens: Tensor) -> Tensor:
        """Cache-free causal forward for training; logits in the compute dtype."""
        if any(layer.attention.cache is not None for layer in self.layers):
            self.clear_cache()
        t = tokens.shape[1]
        if t > self.freqs_cis.shape[0]:
            self.freqs_cis = self._freqs(t).to(tokens.device)
        return self.output(self._hidden(tokens, 0, None))


def build(name_or_args: str | ModelArgs, **overrides) -> Transformer:
    """A randomly initialised model from a preset name (``codellama-7b-instruct``) or ``ModelArgs``."""
    if isinstance(name_or_args, str):
        if name_or_args not in PRESETS:
            raise ValueError(f"unknown preset {name_or_args!r}; choose from {', '.join(PRESETS)}")
        name_or_args = PRESETS[name_or_args]
    return Transformer(replace(name_or_args, **overrides))
