"""The Llama 2 architecture as Code Llama uses it, with Meta's parameter names.

``load_state_dict(strict=True)`` takes a merged official checkpoint (``rope.freqs`` dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..nn import RMSNorm, SwiGLU, apply_rotary_emb, native, precompute_freqs_cis
from ..nn import DecodeLinear
from ..nn.kernels import native_dtype_support
from .kvcache import KVCache, cached_attention, check_fits, plan_memory
from .quant import QuantLinear


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


LONG_CONTEXT = 100_000  # "support up to 100K tokens at inference time" (model card), for rope_theta 1e6


def max_context(args: ModelArgs) -> int:
    """The longest context a model addresses with RoPE as trained: 100,000 tokens for Code Llama's
    rope_theta 1e6 (fine-tuned at 16K, extrapolating to 100K), else its own trained context."""
    return max(args.max_seq_len, LONG_CONTEXT) if args.rope_theta >= 1e6 else args.max_seq_len


PRESETS: dict[str, ModelArgs] = {
    f"codellama-{size}{'' if v == 'base' else '-' + v}": _preset(size, v)
    for size in _SIZES
    for v in ("base", "python", "instruct")
}


@dataclass
class Step:
    """One serving step in one forward: ``n`` decode rows (cache rows ``0..n-1``, one token each at
    ``positions``, keys past each masked; ``n`` may be 0), then prompt chunks, each ``(start, row,
    length)``. The projections and the MLP run once over all the tokens: the weights are read once."""

    positions: Tensor
    mask: Tensor | None
    chunks: list[tuple[int, int, int]]


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, gqa: bool) -> Tensor:
    """SDPA over a prompt with no past; f16 on a CPU without f16 products runs it in fp32, where torch's
    f16 kernel is emulated (64 tokens x 12 heads: 0.40 ms against 0.22 ms with the casts, on a Zen 3)."""
    if q.dtype == torch.float16 and q.device.type == "cpu" and not native_dtype_support(torch.float16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


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

    def forward(self, x: Tensor, freqs_cis: Tensor, start_pos: int | Step, row: int = 0) -> Tensor:
        b, t, _ = x.shape
        if self.wqkv is not None:  # fused by optimize_for_inference: one projection instead of three
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim] + [self.n_kv * self.head_dim] * 2, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        if isinstance(start_pos, Step):
            return self.wo(self._step_attention(q, k, v, start_pos))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.cache is not None:
            self.cache.update(start_pos, k, v, row)
        if self.cache is not None and t == 1 and start_pos > 0 and not self.cache.quantized:
            out = self._decode_attention(q, *self.cache.read(b, 0, start_pos + 1, q.dtype, row))  # views: no copy
        elif self.cache is not None and start_pos > 0:  # a chunk after the cached past: fused kernels, no mask
            out = cached_attention(q, k, v, self.cache, start_pos, row)
        else:
            out = prompt_attention(q, k, v, t > 1, self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def _step_attention(self, q: Tensor, k: Tensor, v: Tensor, plan: Step) -> Tensor:
        """``(1, n + sum(lengths), H, hd)`` tokens of a :class:`Step`: the decode rows against their own
        cache rows, each chunk against its row's past and, causally, itself."""
        n = plan.positions.shape[0]
        outs = []
        if n:
            qd, kd, vd = (x[0, :n, None].transpose(1, 2) for x in (q, k, v))
            self.cache.update_at(plan.positions, kd, vd)
            if native.runs(q) and not self.cache.quantized:  # each row's own cache length, no mask, fp32 inside
                outs.append(native.decode_attention(q[0, :n], self.cache.k, self.cache.v, plan.positions + 1))
            else:
                outs.append(self._decode_attention(qd, *self.cache.read(n, 0, plan.mask.shape[-1], q.dtype),
                                                   plan.mask).reshape(n, -1))
        lo = n
        for start, row, t in plan.chunks:
            qc, kc, vc = (x[:, lo : lo + t].transpose(1, 2) for x in (q, k, v))
            self.cache.update(start, kc, vc, row)
            if start:
                chunk = cached_attention(qc, kc, vc, self.cache, start, row)
            else:
                chunk = prompt_attention(qc, kc, vc, True, self.n_kv != self.n_heads)
            outs.append(chunk[0].transpose(0, 1).reshape(t, -1))
            lo += t
        return torch.cat(outs)[None]

    def _decode_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """One query per sequence: grouped matmuls against the cache, no K/V repetition for GQA.

        Faster than the fused CPU kernels for a single query (2x in bf16), softmax in fp32. ``mask``
        (``(B, 1, 1, L)``, -inf past each row's own position) serves rows at different positions.
        """
        b, h, _, d = q.shape
        qg = q.view(b, self.n_kv, h // self.n_kv, d)
        scores = (qg @ k.transpose(-1, -2)) * d**-0.5
        if mask is not None:
            scores = scores + mask
        return (scores.float().softmax(-1).to(v.dtype) @ v).view(b, h, 1, d)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = SwiGLU(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, start_pos: int | Step, row: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, row)
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
        self.freqs_cis = self._freqs(args.max_seq_len)
        self.max_batch = self.cache_len = 0
        self._native_memo: tuple | None = None  # (dtype, decode_layers' tensors and kinds); see invalidate
        self.activation_checkpointing = False  # recompute each block in backward: memory for time

    def _freqs(self, n: int) -> Tensor:
        return precompute_freqs_cis(self.params.head_dim, n, self.params.rope_theta)

    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache for up to ``max_batch`` sequences of ``max_seq_len`` tokens.

        ``dtype`` defaults to the weights'; ``torch.int8`` (or ``torch.float8_e4m3fn``) stores it
        quantized, half the bytes of bf16. The memory it needs is checked first: ``MemoryError`` with
        the numbers and the options, before anything is allocated.
        """
        if max_seq_len > self.params.max_seq_len:
            raise ValueError(f"a {max_seq_len:,}-token cache exceeds the model's context of {self.params.max_seq_len:,} "
                             "tokens; build or load it with max_seq_len (the CLI's --ctx)")
        weight = self.tok_embeddings.weight
        dtype = dtype or weight.dtype
        self.clear_cache()  # the old cache's memory is free for the new one
        self.check_memory(max_batch, max_seq_len, dtype)
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch, max_seq_len, attn.n_kv, attn.head_dim, dtype, weight.device)
        if self.freqs_cis.shape[0] < max_seq_len:
            self.freqs_cis = self._freqs(max_seq_len).to(weight.device)
        self.max_batch, self.cache_len = max_batch, max_seq_len

    def check_memory(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """``MemoryError`` with the numbers and the options when a cache of this size would not fit next
        to the loaded weights (and any cache already held)."""
        weight = self.tok_embeddings.weight
        resident = sum(p.nbytes for p in self.parameters()) + sum(b.nbytes for b in self.buffers())
        plan = plan_memory(self.params, max_batch, max_seq_len, weight.dtype, dtype or weight.dtype, weight_bytes=resident)
        check_fits(plan, weight.device, max_seq_len, dtype or weight.dtype, resident=resident)

    def set_context(self, max_seq_len: int) -> Transformer:
        """Serve up to ``max_seq_len`` tokens (the CLI's ``--ctx``), refusing more than :func:`max_context`;
        RoPE stays as trained (no scaling). Returns the model."""
        limit = max_context(self.params)
        if max_seq_len > limit:
            theta = f"{self.params.rope_theta:g}"
            raise ValueError(f"--ctx {max_seq_len:,}: this model (rope_theta {theta}, trained context "
                             f"{self.params.max_seq_len:,}) addresses at most {limit:,} tokens; Code Llama's "
                             f"rope_theta 1e6 models go to {LONG_CONTEXT:,}")
        self.params = replace(self.params, max_seq_len=max_seq_len)
        return self

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
        self.max_batch = self.cache_len = 0
        self.invalidate()

    def _apply(self, fn, recurse: bool = True):
        self.invalidate()  # moves and casts make new tensors
        return super()._apply(fn, recurse)

    def invalidate(self) -> None:
        """Forget what was gathered from the modules for the native decode step: the in-place rewrites
        (``optimize_for_inference``, ``quantize``) and every new cache call it."""
        self._native_memo = None

    def _native_weights(self, dtype: torch.dtype) -> tuple[list[Tensor], list[int]] | None:
        """The layers' tensors as :func:`dinollama.nn.native.decode_layers` takes them, or ``None`` when a
        layer is not in that form (not optimized, an int8 cache, asymmetric int4, the torch kernels).
        Gathered once per cache and dtype: walking the modules cost 0.4 ms a token (at 17 ms a token)."""
        if self._native_memo is None or self._native_memo[0] != dtype:
            self._native_memo = (dtype, self._gather_native(dtype))
        return self._native_memo[1]

    def _gather_native(self, dtype: torch.dtype) -> tuple[list[Tensor], list[int]] | None:
        tensors, kinds = [], []
        for layer in self.layers:
            att, ff = layer.attention, layer.feed_forward
            if att.wqkv is None or ff.w13 is None or att.cache is None or att.cache.quantized:
                return None
            if layer.attention_norm.weight.dtype != dtype or layer.ffn_norm.weight.dtype != dtype:
                return None
            lins = [_native_linear(m) for m in (att.wqkv, att.wo, ff.w13, ff.w2)]
            if None in lins:
                return None
            (qkv, qkv_s, k0), (wo, wo_s, k1), (w13, w13_s, k2), (w2, w2_s, k3) = lins
            tensors += [layer.attention_norm.weight, qkv, qkv_s, wo, wo_s, layer.ffn_norm.weight, w13, w13_s, w2, w2_s,
                        att.cache.k, att.cache.v]
            kinds += [k0, k1, k2, k3]
        return tensors, kinds

    def _native_decode(self, h: Tensor, freqs: Tensor, positions: Tensor, row: int) -> Tensor | None:
        """One token per row (``h`` ``(n, dim)``) through every layer in one native call, or ``None``."""
        if not native.fusable(h):
            return None
        packed = self._native_weights(h.dtype)
        if packed is None:
            return None
        p = self.params
        return native.decode_layers(h.contiguous(), *packed, positions, row, freqs, p.n_heads, p.kv_heads, p.norm_eps)

    def _hidden(self, tokens: Tensor, start_pos: int, row: int = 0) -> Tensor:
        h = self.tok_embeddings(tokens)
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        freqs = self.freqs_cis[start_pos : start_pos + tokens.shape[1]]
        if tokens.shape[1] == 1 and start_pos > 0:  # decoding: the native layer stack where it runs
            b = tokens.shape[0]
            out = self._native_decode(h[:, 0], freqs, torch.full((b,), start_pos), row)  # one RoPE row for all
            if out is not None:
                return out[:, None]
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, freqs, start_pos, use_reentrant=False)
            else:
                h = layer(h, freqs, start_pos, row)
        return h

    def _row_mask(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """``(B, 1, 1, L)``: 0 for the keys up to each row's position, -inf past it."""
        keys = torch.arange(int(positions.max()) + 1, device=positions.device)
        mask = torch.zeros(keys.shape, device=positions.device).masked_fill(keys > positions[:, None], float("-inf"))
        return mask[:, None, None].to(dtype)

    @torch.inference_mode()
    def step(self, tokens: Tensor, positions: Tensor, chunks: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor]:
        """Decode ``tokens`` (cache row ``i`` at ``positions[i]``; may be empty) and prefill each chunk
        ``(tokens, start, row)`` into its cache row, in one forward. Returns the decode rows' logits
        ``(B, vocab)`` and each chunk's last logits ``(chunks, vocab)``: the serving engine's step, the
        same results as separate calls."""
        n = tokens.shape[0]
        fits = all(start + c.shape[0] <= self.cache_len and row < self.max_batch for c, start, row in chunks)
        if n > self.max_batch or (n and int(positions.max()) >= self.cache_len) or not fits:
            raise ValueError("a step must fit the KV cache; call setup_cache first")
        h = self.tok_embeddings(torch.cat([tokens] + [c for c, _, _ in chunks]))[None]
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        freqs = torch.cat([self.freqs_cis[positions]] + [self.freqs_cis[s : s + c.shape[0]] for c, s, _ in chunks])
        fused = self._native_decode(h[0], freqs, positions, 0) if n and not chunks else None
        if fused is not None:
            h = fused[None]
        else:
            plan = Step(positions, self._row_mask(positions, h.dtype) if n else None,
                        [(s, row, c.shape[0]) for c, s, row in chunks])
            for layer in self.layers:
                h = layer(h, freqs, plan)
        ends = torch.tensor([c.shape[0] for c, _, _ in chunks], dtype=torch.long, device=h.device).cumsum(0) + n - 1
        logits = self.output(self.norm(torch.cat([h[0, :n], h[0, ends]]))).float()
        return logits[:n], logits[n:]

    def forward(self, tokens: Tensor, start_pos: int = 0, *, train: bool = False, last_only: bool = False,
                row: int = 0) -> Tensor:
        """Logits for ``tokens`` placed at ``start_pos`` of the cached sequence (float32, as the reference).

        Any chunk at any ``start_pos`` is exact (prefill a long prompt chunk by chunk); ``last_only``
        computes the logits of the last position only, so a long prefill never holds chunk x vocab
        floats. ``row`` places a batch at cache rows ``row..`` (a slot of the serving engine; rows at
        different positions decode together through :meth:`step`). ``train=True`` is ``forward_train``
        through ``__call__``, so DDP/FSDP wrappers see the call.
        """
        if train:
            return self.forward_train(tokens)
        b, t = tokens.shape
        if self.max_batch < row + b or start_pos + t > self.cache_len:
            if start_pos or row:
                raise ValueError(f"no KV cache holds positions {start_pos}..{start_pos + t}; call setup_cache first")
            # An implicit cache covers the prompt and room to continue, not the whole context.
            self.setup_cache(b, min(self.params.max_seq_len, max(t, 2048)))
        h = self._hidden(tokens, start_pos, row)
        return self.output(self.norm(h[:, -1:] if last_only else h)).float()

    def forward_train(self, tokens: Tensor) -> Tensor:
        """Cache-free causal forward for training; logits in the compute dtype."""
        if any(layer.attention.cache is not None for layer in self.layers):
            self.clear_cache()
        t = tokens.shape[1]
        if t > self.freqs_cis.shape[0]:
            self.freqs_cis = self._freqs(t).to(tokens.device)
        return self.output(self.norm(self._hidden(tokens, 0)))


def _native_linear(module: nn.Module) -> tuple[Tensor, Tensor, int] | None:
    """``(weight, scales, kind)`` of a linear the native kernels take: float (:class:`DecodeLinear`),
    or int8 / symmetric int4 in groups."""
    if isinstance(module, DecodeLinear):
        return module.weight, native.NO_SCALES, 0
    if isinstance(module, QuantLinear) and module.config.symmetric:
        return module.qweight, module.scales, 3 if module.config.bits == 8 else 4
    return None


def build(name_or_args: str | ModelArgs, **overrides) -> Transformer:
    """A randomly initialised model from a preset name (``codellama-7b-instruct``) or ``ModelArgs``."""
    if isinstance(name_or_args, str):
        if name_or_args not in PRESETS:
            raise ValueError(f"unknown preset {name_or_args!r}; choose from {', '.join(PRESETS)}")
        name_or_args = PRESETS[name_or_args]
    return Transformer(replace(name_or_args, **overrides))
