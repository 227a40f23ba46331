"""Continuous batching: the one decoding loop under the Generator, the CLI, the evaluations and the server.

Each sequence owns a slot, a row of the KV cache. One :meth:`Engine.step` prefills one chunk of one
prompt (so a long prompt never stalls the others) and then decodes one token for every sequence
past its prompt in one batched forward, each row at its own position (per-row RoPE and key mask).
Requests added between steps join at the next one; a finished or cancelled request frees its slot
at once. A slot remembers the tokens its cache holds, so a prompt that shares a prefix with them (an
editor resending the file at every keystroke) prefills only the part that changed.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .model import Transformer
from .sampling import SamplingParams, sample

_REPLACEMENT = "\ufffd"  # what a token that ends inside a UTF-8 character decodes to


@dataclass(eq=False)
class Request:
    """One sequence to decode and, as it runs, its state: tokens, log-probabilities, timings."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    decode: Callable[[list[int]], str] | None = None  # tokens -> text, for stop strings
    prompt_logprobs: bool = False  # log-probabilities of the prompt's tokens too (``echo`` with ``logprobs``)
    top_logprobs: int = 0  # the most likely alternatives per generated token
    cache_prompt: bool = True  # reuse a slot's cached prefix
    deadline: float | None = None  # time.monotonic() after which decoding stops ("length")
    predict_ms: float | None = None  # decoding time limit from the first token (llama.cpp's t_max_predict_ms)
    on_update: Callable[[Request], None] | None = None  # after each token and at the end, on the engine's thread

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    prompt_lp: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    stop_word: str = ""
    slot: int | None = None
    cached: int = 0  # prompt tokens found in the slot's cache
    filled: int = 0  # prompt tokens in the cache so far
    cancelled: bool = False
    t_added: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def cancel(self) -> None:
        """Stop at the next step and free the slot (a client that went away)."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.prompt)

    def text(self) -> str:
        """The generated text, cut before the first stop string."""
        text = self.decode(self.tokens) if self.decode else ""
        cuts = [text.index(s) for s in self.params.stop_strings if s in text]
        return text[: min(cuts)] if cuts else text

    def visible_text(self) -> str:
        """What may be shown while streaming: holds back a tail that could still become a stop string
        and a character still incomplete in UTF-8."""
        text = self.text()
        if self.finished:
            return text
        hold = max((n for s in self.params.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        text = text[: len(text) - hold]
        return text.rstrip(_REPLACEMENT)


def check_fits_context(prompt_len: int, max_gen_len: int, ctx: int) -> int:
    """Prompt + ``max_gen_len`` tokens, or a ``ValueError`` with the counts when over ``ctx``."""
    if prompt_len == 0:
        raise ValueError("the prompt needs at least one token")
    total = prompt_len + max_gen_len
    if total > ctx:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_gen_len ({max_gen_len}) = {total} exceeds the context "
                         f"of {ctx} tokens; shorten the prompt or lower max_gen_len")
    return total


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    """Slots over one model's KV cache, stepped by one thread; :meth:`add` may be called from others."""

    def __init__(self, model: Transformer, slots: int = 1, ctx: int | None = None, kv_dtype: torch.dtype | None = None,
                 prefill_chunk: int = 512, decode_chunk: int = 2048) -> None:
        """``prefill_chunk``: prompt tokens per step when nothing decodes (bounds a step's activations);
        ``decode_chunk``: per step while others decode, across the waiting prompts, as llama-server's batch
        of 2,048 tokens (bounds the delay a new prompt adds to their next token). Few large mixed steps set
        the p99 inter-token latency lower than many small ones: at 16 streams (bench/serve_load.py, Zen 4)
        one request's 48 tokens a step read bf16 p99 83 ms at 302 tok/s, 2,048 across them 30.5 ms at 445."""
        self.model, self.slots, self.prefill_chunk, self.decode_chunk = model, slots, prefill_chunk, decode_chunk
        self.ctx = ctx or model.params.max_seq_len
        model.setup_cache(slots, self.ctx, kv_dtype)
        self.device = model.tok_embeddings.weight.device
        self.held: list[list[int]] = [[] for _ in range(slots)]  # the tokens whose K/V each slot holds
        self.active: list[Request | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self.counters = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "steps": 0}

    def check(self, req: Request) -> None:
        """``ValueError`` with the token counts when ``req`` cannot fit in a slot."""
        check_fits_context(len(req.prompt), req.params.max_gen_len, self.ctx)

    def add(self, req: Request) -> Request:
        self.check(req)
        req.t_added = time.monotonic()
        with self._lock:
            self.waiting.append(req)
        return req

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.active)

    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def run(self, reqs: Sequence[Request]) -> list[Request]:
        """Add ``reqs`` and step until all are finished."""
        for r in reqs:
            self.add(r)
        while not all(r.finished for r in reqs):
            self.step()
        return list(reqs)

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests, prefill one chunk, decode one token per running sequence; returns
        the requests that finished."""
        done: list[Request] = []
        for r in list(self.active):
            if r is not None and r.cancelled:
                self._finish(r, "cancelled", done)
        self._admit(done)
        prefilling = sorted((r for r in self.active if r is not None and r.prefilling), key=lambda r: r.t_added)
        decoding = [r for r in self.active if r is not None and not r.prefilling]
        if prefilling and prefilling[0].prompt_logprobs:  # all its logits: a forward of its own
            self._prefill_with_logprobs(prefilling[0], done)
            prefilling = []
        if prefilling or decoding:
            self._forward(prefilling, decoding, done)
        self.counters["steps"] += 1
        return done

    def abort(self) -> list[Request]:
        """End every running request with ``finish_reason == "error"`` and forget what the slots held
        (after a failed step their caches are in an unknown state)."""
        failed = [r for r in self.active if r is not None]
        for r in failed:
            self._finish(r, "error", [])
        self.held = [[] for _ in range(self.slots)]
        return failed

    def _admit(self, done: list[Request]) -> None:
        with self._lock:
            while self.waiting and (self.waiting[0].cancelled or None in self.active):
                req = self.waiting.popleft()
                if req.cancelled:
                    self._finish(req, "cancelled", done)
                    continue
                free = [s for s, r in enumerate(self.active) if r is None]
                # the longest cached prefix; among equals the lowest slot, which keeps the decoded rows few
                slot = max(free, key=lambda s: (common_prefix(self.held[s], req.prompt) if req.cache_prompt else 0, -s))
                reuse = common_prefix(self.held[slot], req.prompt) if req.cache_prompt else 0
                reuse = min(reuse, len(req.prompt) - 1)  # the last prompt token is run for its logits
                self.held[slot] = self.held[slot][:reuse]
                req.slot, req.cached, req.filled = slot, reuse, reuse
                self.active[slot] = req
                self.counters["cached_tokens"] += reuse

    def _prefill_with_logprobs(self, req: Request, done: list[Request]) -> None:
        """One chunk of a prompt whose tokens' log-probabilities are wanted (``echo`` with ``logprobs``)."""
        lo = req.filled
        hi = min(len(req.prompt), lo + self.prefill_chunk)
        logits = self.model(torch.tensor([req.prompt[lo:hi]], device=self.device), lo, row=req.slot)[0]
        if lo == 0:
            req.prompt_lp.append(0.0)
        targets = torch.tensor(req.prompt[lo + 1 : hi], device=self.device)
        req.prompt_lp.extend(logits[: hi - lo - 1].log_softmax(-1).gather(-1, targets[:, None])[:, 0].tolist())
        self._prefilled(req, lo, hi, logits[-1], done)

    def _prefilled(self, req: Request, lo: int, hi: int, last: torch.Tensor, done: list[Request]) -> None:
        self.held[req.slot].extend(req.prompt[lo:hi])
        req.filled = hi
        self.counters["prompt_tokens"] += hi - lo
        if hi == len(req.prompt):
            req.t_first = time.monotonic()
            self._accept(req, last, done)

    def _forward(self, prefilling: list[Request], reqs: list[Request], done: list[Request]) -> None:
        """Prompt chunks and the decoding sequences in one forward (:meth:`Transformer.step`): the
        weights are read once for all of them: the oldest requests' chunks, up to ``decode_chunk`` tokens in
        all while others decode, else ``prefill_chunk``."""
        budget = self.decode_chunk if reqs else self.prefill_chunk
        parts = []
        for r in prefilling:
            if budget <= 0 or r.prompt_logprobs:
                break
            lo = r.filled
            hi = min(len(r.prompt), lo + budget)
            parts.append((r, lo, hi))
            budget -= hi - lo
        tokens, positions = self._decode_inputs(reqs)
        chunks = [(torch.tensor(r.prompt[lo:hi], device=self.device), lo, r.slot) for r, lo, hi in parts]
        logits, lasts = self.model.step(tokens.to(self.device), positions.to(self.device), chunks)
        for (r, lo, hi), last in zip(parts, lasts):
            self._prefilled(r, lo, hi, last, done)
        self._decoded(reqs, logits, done)

    def _decode_inputs(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last token and position of each decode row ``0..max slot``."""
        rows = max((r.slot + 1 for r in reqs), default=0)
        tokens = torch.zeros(rows, dtype=torch.long)
        # rows without a decoding sequence write to position ctx-1, which no sequence ever reaches:
        # prompt + max_gen_len <= ctx, and the last sampled token is never fed back
        positions = torch.full((rows,), self.ctx - 1, dtype=torch.long)
        for r in reqs:
            tokens[r.slot] = r.tokens[-1]
            positions[r.slot] = len(r.prompt) + len(r.tokens) - 1
        return tokens, positions

    def _decoded(self, reqs: list[Request], logits: torch.Tensor, done: list[Request]) -> None:
        for r in reqs:
            self.held[r.slot].append(r.tokens[-1])
            self._accept(r, logits[r.slot], done)

    def _accept(self, req: Request, logits: torch.Tensor, done: list[Request]) -> None:
        """Sample the next token of ``req`` from its logits and decide whether it is finished."""
        p = req.params
        tok = int(sample(logits[None], p.temperature, p.top_p, p.top_k, req.gen)[0])
        if p.logprobs or req.top_logprobs:
            lp = logits.float().log_softmax(-1)
            req.logprobs.append(float(lp[tok]))
            if req.top_logprobs:
                vals, idx = lp.topk(req.top_logprobs)
                req.top.append(dict(zip(idx.tolist(), vals.tolist())))
        self.counters["generated_tokens"] += 1
        if tok in req.stop_ids:
            return self._finish(req, "stop", done)
        req.tokens.append(tok)
        now = time.monotonic()
        if p.stop_strings and req.decode is not None:
            text = req.decode(req.tokens)
            hit = [s for s in p.stop_strings if s in text]
            if hit:
                req.stop_word = min(hit, key=text.index)
                return self._finish(req, "stop", done)
        if len(req.tokens) >= p.max_gen_len or (req.deadline is not None and now > req.deadline) or (
                req.predict_ms is not None and (now - req.t_first) * 1000 > req.predict_ms):
            return self._finish(req, "length", done)
        if req.on_update is not None:
            req.on_update(req)

    def _finish(self, req: Request, reason: str, done: list[Request]) -> None:
        req.finish_reason, req.t_end = reason, time.monotonic()
        if req.slot is not None and self.active[req.slot] is req:
            self.active[req.slot] = None
        done.append(req)
        if req.on_update is not None:
            req.on_update(req)


def timings(req: Request) -> dict[str, float]:
    """llama.cpp's ``timings`` of a finished request."""
    prompt_n = len(req.prompt) - req.cached
    prompt_ms = max(req.t_first - req.t_added, 0.0) * 1000
    predicted_n = len(req.tokens)
    predicted_ms = max(req.t_end - req.t_first, 0.0) * 1000
    return {
        "cache_n": req.cached,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0,
    }


def finite(x: float) -> float | None:
    """JSON has no -inf: a log-probability of an impossible token becomes ``None``."""
    return x if math.isfinite(x) else None
