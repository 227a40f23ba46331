"""What the server holds: the models, the engine's worker, the limits, the counters; and the helpers
every route shares to queue requests and wait for or stream their tokens."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request as HttpRequest

from ..codellama import Generator, SamplingParams
from ..codellama.engine import Request
from ..codellama.prompts import infilling_prompt_tokens
from .errors import ApiError
from .worker import Busy, EngineWorker, Progress

POLL_S = 0.25  # how often a waiting request checks that its client is still there
# continue.dev's and Tabby's Code Llama template, sent as a plain prompt: "<PRE> {prefix} <SUF>{suffix} <MID>"
FIM_TEMPLATE = re.compile(r"<PRE> (?P<prefix>.*) <SUF>(?P<suffix>.*) <MID>", re.DOTALL)


@dataclass
class ServeConfig:
    model: str = "default"
    vision_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 4
    ctx: int | None = None
    api_key: str | None = None
    dtype: str = "auto"
    device: str | None = None
    kv_dtype: str = "model"
    max_queue: int = 64
    timeout_s: float = 600.0
    max_body_mb: float = 20.0
    max_images: int = 16
    prefill_chunk: int = 512
    decode_chunk: int = 2048


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    ttft_sum: float = 0.0
    ttft_count: int = 0
    images: int = 0

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] = self.requests.get((route, status), 0) + 1
        self.latency_sum[route] = self.latency_sum.get(route, 0.0) + seconds


class State:
    """Filled in by the loader thread; ``ready`` turns ``/health`` from 503 to 200."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.ready = False
        self.load_error: str | None = None
        self.generator: Generator | None = None
        self.worker: EngineWorker | None = None
        self.vision = None
        self.model_name = config.model
        self.started = time.time()
        self.metrics = Metrics()

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    @property
    def ctx(self) -> int:
        return self.worker.engine.ctx

    def require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, self.load_error or "the model is loading; retry shortly", {"Retry-After": "2"})

    # -- building requests -------------------------------------------------------------------------------
    def sampling(self, *, max_tokens: int | None, prompt_len: int, temperature: float, top_p: float, top_k: int,
                 seed: int | None, stop: list[str], logprobs: bool = False, echo: bool = False) -> SamplingParams:
        """``SamplingParams`` (the CLI's checks, 400 on a bad value); ``max_tokens`` None or -1: the room left."""
        if max_tokens is None or max_tokens == -1:
            max_tokens = max(1, self.ctx - prompt_len)
        if len(stop) > 4:
            raise ApiError(400, f"at most 4 stop sequences, got {len(stop)}")
        try:
            return SamplingParams(max_gen_len=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, stop_strings=tuple(stop), logprobs=logprobs, echo=echo)
        except ValueError as e:
            raise ApiError(400, str(e).replace("max_gen_len", "max_tokens")) from None

    def require_infilling(self) -> None:
        if not self.tokenizer.supports_infilling:
            raise ApiError(501, "this model has no infilling pieces (▁<PRE>/▁<SUF>/▁<MID>/▁<EOT>): infilling needs "
                                "Code Llama 7B/13B base or instruct")

    def infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        self.require_infilling()
        return infilling_prompt_tokens(self.tokenizer, prefix, suffix)

    def prompt_tokens(self, prompt: str | list[int]) -> tuple[list[int], bool]:
        """Tokens of a completion prompt and whether it is an infilling prompt (the text template of
        continue.dev and Tabby is turned into the infilling pieces)."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.tokenizer.n_words]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary of {self.tokenizer.n_words}")
            return list(prompt), False
        m = FIM_TEMPLATE.fullmatch(prompt)
        if m is not None and self.tokenizer.supports_infilling:
            return self.infill_tokens(m["prefix"], m["suffix"]), True
        return self.tokenizer.encode(prompt, bos=True, eos=False), False

    def request(self, tokens: list[int], params: SamplingParams, infill: bool, chat: bool = False,
                top_logprobs: int = 0, cache_prompt: bool = True, predict_ms: float | None = None) -> Request:
        tok = self.tokenizer
        stops = {tok.eos_id} | ({tok.eot_id} if infill else set()) | ({self.generator.chat_stop()} if chat else set())
        return Request(tokens, params, frozenset(stops), tok.decode_infilling if infill else tok.decode,
                       prompt_logprobs=params.logprobs and params.echo, top_logprobs=top_logprobs,
                       cache_prompt=cache_prompt, deadline=time.monotonic() + self.config.timeout_s,
                       predict_ms=predict_ms)

    # -- running them ------------------------------------------------------------------------------------
    def submit(self, reqs: list[Request]) -> Progress:
        progress = Progress(asyncio.get_running_loop())
        for r in reqs:
            r.on_update = progress
        try:
            self.worker.submit(reqs)
        except Busy as e:
            raise ApiError(503, f"server busy: {e}", {"Retry-After": "1"}) from None
        except ValueError as e:
            raise ApiError(400, str(e).replace("max_gen_len", "max_tokens")) from None
        return progress

    async def complete(self, http: HttpRequest, reqs: list[Request]) -> list[Request]:
        """Run ``reqs`` to the end; a client that goes away cancels them (their slots free at once)."""
        progress = self.submit(reqs)
        try:
            while not all(r.finished for r in reqs):
                await progress.wait(POLL_S)
                if await http.is_disconnected():
                    break
        finally:
            for r in reqs:
                if not r.finished:
                    r.cancel()
        self._check_errors(reqs)
        self._count_ttft(reqs)
        return reqs

    async def stream(self, reqs: list[Request], events: Callable[[int, Request, str], list[dict]],
                     done: Callable[[], list[dict]] | None = None, sentinel: bool = True) -> AsyncIterator[str]:
        """Server-sent events: ``events(i, req, delta)`` for each new piece of text of request ``i``
        (and once when it ends), then ``done()`` and ``data: [DONE]``. Cancelled when the client goes
        away (Starlette cancels this generator), which frees the slots."""
        progress = self.submit(reqs)
        shown = [""] * len(reqs)
        ended = [False] * len(reqs)
        try:
            while not all(ended):
                await progress.wait(POLL_S)
                for i, r in enumerate(reqs):
                    if ended[i]:
                        continue
                    finished = r.finished
                    text = r.visible_text()
                    delta = text[len(shown[i]):]
                    if delta or finished:
                        shown[i] = text
                        if finished:
                            ended[i] = True
                            if r.finish_reason == "error":
                                yield _sse({"error": {"message": "internal server error (see the server log)",
                                                      "type": "server_error", "code": 500}})
                                continue
                        for event in events(i, r, delta):
                            yield _sse(event)
            self._count_ttft(reqs)
            for event in (done() if done else []):
                yield _sse(event)
            if sentinel:
                yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                if not r.finished:
                    r.cancel()

    def _check_errors(self, reqs: list[Request]) -> None:
        if any(r.finish_reason == "error" for r in reqs):
            raise RuntimeError("the engine failed on this request")

    def _count_ttft(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r.t_first:
                self.metrics.ttft_sum += r.t_first - r.t_added
                self.metrics.ttft_count += 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def piece_text(tokenizer, token: int) -> str:
    """A token as text on its own: SentencePiece's ``▁`` as a space, byte pieces as their character."""
    piece = tokenizer.token_piece(token)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)]).decode("latin-1")
    return piece.replace("▁", " ")
