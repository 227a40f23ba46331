"""Batched sampling over the KV cache: the reference ``generate`` plus top-k, seeds, stop strings, streaming."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .model import Transformer
from .prompts import Message, chat_prompt_tokens, infilling_prompt_tokens
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """How to decode; checked on creation, so the CLI, the Python API and the server refuse the same
    values with the same one-line ``ValueError``."""

    max_gen_len: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False
    echo: bool = False
    stop_strings: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_int("max_gen_len", self.max_gen_len, low=1)
        _check_int("top_k", self.top_k, low=0, note=" (0 = no top-k cut)")
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        _check_float("temperature", self.temperature, 0.0, None, "0 (greedy) or more")
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]")
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0; use temperature 0 for greedy decoding")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop_strings)!r}")


def _check_int(name: str, value, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{note}, got {value}")


def _check_float(name: str, value, low: float, high: float | None, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {what}, got {value}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy when ``temperature == 0``; else top-k, then nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep tokens until the mass before them exceeds top_p
    sorted_p = sorted_p.masked_fill(cut, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return idx.gather(-1, choice).squeeze(-1)


class Generator:
    """Text completion, infilling and chat over one model and tokenizer."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prefill_chunk: int = 2048,
                 kv_dtype: torch.dtype | None = None) -> None:
        """``prefill_chunk``: prompt tokens per forward pass (bounds activation memory at long context);
        ``kv_dtype``: the KV cache's dtype (default the model's; ``torch.int8`` halves it)."""
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk, self.kv_dtype = prefill_chunk, kv_dtype

    def _forward(self, tokens: torch.Tensor, start: int, end: int, all_logits: bool) -> torch.Tensor:
        """Logits of positions ``start..end-1`` (only the last unless ``all_logits``), in chunks."""
        outs = []
        for lo in range(start, end, self.prefill_chunk):
            hi = min(end, lo + self.prefill_chunk)
            outs.append(self.model(tokens[:, lo:hi], lo, last_only=not all_logits))
        return torch.cat(outs, 1) if all_logits else outs[-1]

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def check_length(self, prompts: list[list[int]], max_gen_len: int) -> int:
        """Prompt + ``max_gen_len`` tokens, or a ``ValueError`` with the counts when over the context."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        total = max(len(p) for p in prompts) + max_gen_len
        if total > self.model.params.max_seq_len:
            raise ValueError(
                f"prompt ({max(len(p) for p in prompts)} tokens) + max_gen_len ({max_gen_len}) = {total} exceeds the "
                f"context of {self.model.params.max_seq_len} tokens; shorten the prompt or lower max_gen_len"
            )
        return total

    @torch.inference_mode()
    def steps(self, prompts: list[list[int]], p: SamplingParams, stop_token: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(tokens, logprobs)`` after each decoding position (the reference's loop)."""
        total = self.check_length(prompts, p.max_gen_len)
        bsz, pad = len(prompts), -1
        self.model.setup_cache(bsz, total, self.kv_dtype)
        tokens = torch.full((bsz, total), pad, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompts):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
        logprobs = torch.zeros(bsz, total, device=self.device)
        is_prompt = tokens != pad
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
        prev = 0
        for cur in range(min(len(t) for t in prompts), total):
            logits = self._forward(tokens, prev, cur, p.logprobs)
            if p.logprobs:
                target = tokens[:, prev + 1 : cur + 1]
                logprobs[:, prev + 1 : cur + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), target.clamp_min(0), reduction="none") * (target != pad)
            nxt = sample(logits[:, -1], p.temperature, p.top_p, p.top_k, gen)
            nxt = torch.where(is_prompt[:, cur], tokens[:, cur], nxt)
            tokens[:, cur] = nxt
            if p.logprobs:
                logprobs[:, cur] = torch.where(is_prompt[:, cur], logprobs[:, cur],
                                               logits[:, -1].log_softmax(-1).gather(-1, nxt[:, None])[:, 0])
            done |= ~is_prompt[:, cur] & (nxt == stop_token)
            prev = cur
            yield tokens, logprobs
            if done.all():
                break

    def generate(self, prompts: list[list[int]], p: SamplingParams, stop_token: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Generated tokens per prompt (the prompt too with ``echo``), cut at the stop token."""
        stop = self.tokenizer.eos_id if stop_token is None else stop_token
        tokens = logprobs = None
        for tokens, logprobs in self.steps(prompts, p, stop):
            if p.stop_strings and all(self._hit_stop_string(tokens[k], len(t), p.stop_strings) for k, t in enumerate(prompts)):
                break
        out_tokens, out_logprobs = [], []
        for k, prompt in enumerate(prompts):
            start = 0 if p.echo else len(prompt)
            toks = [t for t in tokens[k, start : len(prompt) + p.max_gen_len].tolist() if t != -1]
            probs = logprobs[k, start : start + len(toks)].tolist()
            if stop in toks[len(prompt) - start :]:
                cut = toks.index(stop, len(prompt) - start)
                toks, probs = toks[:cut], probs[:cut]
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, out_logprobs

    def _hit_stop_string(self, row: torch.Tensor, prompt_len: int, stops: Sequence[str]) -> bool:
        text = self.tokenizer.decode([t for t in row[prompt_len:].tolist() if t != -1])
        return any(s in text for s in stops)

    def _cut(self, text: str, stops: Sequence[str]) -> str:
        cuts = [text.index(s) for s in stops if s in text]
        return text[: min(cuts)] if cuts else text

    def text_completion(self, prompts: list[str], p: SamplingParams | None = None) -> list[str]:
        p = p or SamplingParams()
        toks, _ = self.generate([self.tokenizer.encode(s, bos=True, eos=False) for s in prompts], p)
        return [self._cut(self.tokenizer.decode(t), p.stop_strings) for t in toks]

    def text_infilling(self, prefixes: list[str], suffixes: list[str], p: SamplingParams | None = None,
                       suffix_first: bool = False) -> list[str]:
        """Middles for each (prefix, suffix), stopping at ``<EOT>``."""
        p = p or SamplingParams()
        prompts = [infilling_prompt_tokens(self.tokenizer, a, b, suffix_first) for a, b in zip(prefixes, suffixes)]
        toks, _ = self.generate(prompts, SamplingParams(**{**p.__dict__, "echo": False}), stop_token=self.tokenizer.eot_id)
        return [self._cut(self.tokenizer.decode_infilling(t), p.stop_strings) for t in toks]

    def chat_completion(self, dialogs: list[list[Message]], p: SamplingParams | None = None) -> list[str]:
        p = p or SamplingParams()
        stop = self.tokenizer.step_id if self.tokenizer.step_id is not None else self.tokenizer.eos_id
        toks, _ = self.generate([chat_prompt_tokens(self.tokenizer, d) for d in dialogs], p, stop_token=stop)
        return [self._cut(self.tokenizer.decode(t), p.stop_strings).strip() for t in toks]

    def stream(self, prompt: list[int], p: SamplingParams | None = None, stop_token: int | None = None,
               infilling: bool = False) -> Iterator[str]:
        """Yield text pieces of one generation as they are decoded."""
        p = p or SamplingParams()
        stop = self.tokenizer.eos_id if stop_token is None else stop_token
        decode = self.tokenizer.decode_infilling if infilling else self.tokenizer.decode
        shown = ""
        for tokens, _ in self.steps([prompt], p, stop):
            new = [t for t in tokens[0, len(prompt) :].tolist() if t != -1]
            if new and new[-1] == stop:
                break
            text = self._cut(decode(new), p.stop_strings)
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
            if p.stop_strings and any(s in decode(new) for s in p.stop_strings):
                break


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """One-call text completion: ``generate(model, tok, ["def fib(n):"], max_gen_len=64)``."""
    return Generator(model, tokenizer).text_completion(prompts, SamplingParams(**kwargs))
