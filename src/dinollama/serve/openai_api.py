"""The OpenAI-compatible routes: completions (with ``suffix`` infilling), chat, models, image embeddings."""

from __future__ import annotations

import base64
import time
import uuid

import numpy as np
from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..codellama.engine import Request, finite
from ..codellama.prompts import chat_prompt_tokens
from .errors import ApiError
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from .state import State, piece_text
from .vision import BadImage, decode_data_url

MAX_SEQUENCES = 16  # prompts x n of one request
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [p]
    if not p:
        raise ApiError(400, "prompt is empty")
    return list(p)


def _usage(reqs: list[Request], prompts: list[list[int]]) -> dict:
    prompt = sum(len(t) for t in prompts)
    completion = sum(len(r.tokens) for r in reqs)
    cached = sum(r.cached for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _legacy_logprobs(state: State, r: Request, text_start: int, echo: bool) -> dict:
    """The completions ``logprobs`` object: tokens, their log-probabilities, top alternatives, offsets."""
    tok = state.tokenizer
    ids = (r.prompt if echo else []) + r.tokens
    lps = ([finite(x) for x in r.prompt_lp] if echo else []) + [finite(x) for x in r.logprobs[: len(r.tokens)]]
    tops = ([None] * len(r.prompt) if echo else []) + [
        {piece_text(tok, t): finite(v) for t, v in d.items()} for d in r.top[: len(r.tokens)]]
    pieces = [piece_text(tok, t) for t in ids]
    offsets, pos = [], text_start
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    if echo and lps:
        lps[0] = None  # the first token has no context to be predicted from
    return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(state: State, r: Request) -> dict:
    tok = state.tokenizer
    content = []
    for i, t in enumerate(r.tokens):
        piece = piece_text(tok, t)
        top = r.top[i] if i < len(r.top) else {}
        content.append({"token": piece, "logprob": finite(r.logprobs[i]), "bytes": list(piece.encode()),
                        "top_logprobs": [{"token": piece_text(tok, k), "logprob": finite(v),
                                          "bytes": list(piece_text(tok, k).encode())} for k, v in top.items()]})
    return {"content": content}


def register(router: APIRouter, state: State) -> None:
    @router.get("/v1/models")
    async def models() -> dict:
        state.require_ready()
        data = [{"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "dinollama",
                 "meta": {"n_ctx": state.ctx, "n_vocab": state.tokenizer.n_words, "modality": "text"}}]
        if state.vision is not None:
            data.append({"id": state.vision.name, "object": "model", "created": int(state.started),
                         "owned_by": "dinollama", "meta": {"modality": "image", "dim": state.vision.model.embed_dim}})
        return {"object": "list", "data": data}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        state.require_ready()
        prompts, texts, infill = [], [], []
        given = _prompts(body)
        if len(given) * body.n > MAX_SEQUENCES:
            raise ApiError(400, f"{len(given)} prompts x n={body.n} is over {MAX_SEQUENCES} sequences per request")
        for p in given:
            if body.suffix is not None:
                if not isinstance(p, str):
                    raise ApiError(400, "suffix needs a text prompt (the prefix)")
                tokens, fim = state.infill_tokens(p, body.suffix), True
            else:
                tokens, fim = state.prompt_tokens(p)
            prompts.append(tokens)
            texts.append(p if isinstance(p, str) else state.tokenizer.decode(p))
            infill.append(fim)
        reqs = []
        for k, tokens in enumerate(prompts):
            for c in range(body.n):
                seed = None if body.seed is None else body.seed + c
                params = state.sampling(max_tokens=body.max_tokens, prompt_len=len(tokens), temperature=body.temperature,
                                        top_p=body.top_p, top_k=body.top_k, seed=seed, stop=_stops(body.stop),
                                        logprobs=body.logprobs is not None, echo=body.echo and not infill[k])
                reqs.append(state.request(tokens, params, infill[k], top_logprobs=body.logprobs or 0))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
        echo = [body.echo and not infill[i // body.n] for i in range(len(reqs))]

        if body.stream:
            include_usage = bool((getattr(body, "stream_options", None) or {}).get("include_usage"))

            echoed = [not e for e in echo]  # the prompt text goes before the first piece

            def events(i: int, r: Request, delta: str) -> list[dict]:
                if not echoed[i]:
                    echoed[i] = True
                    delta = texts[i // body.n] + delta
                choice = {"text": delta, "index": i, "logprobs": None,
                          "finish_reason": FINISH.get(r.finish_reason) if r.finished else None}
                return [{**base, "choices": [choice]}]

            def done() -> list[dict]:
                return [{**base, "choices": [], "usage": _usage(reqs, [r.prompt for r in reqs])}] if include_usage else []

            return StreamingResponse(state.stream(reqs, events, done), media_type="text/event-stream")

        await state.complete(http, reqs)
        choices = []
        for i, r in enumerate(reqs):
            prefix = texts[i // body.n] if echo[i] else ""
            lp = _legacy_logprobs(state, r, 0, echo[i]) if body.logprobs is not None else None
            choices.append({"text": prefix + r.text(), "index": i, "logprobs": lp,
                            "finish_reason": FINISH.get(r.finish_reason, "stop")})
        return {**base, "choices": choices, "usage": _usage(reqs, [r.prompt for r in reqs])}

    @router.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        state.require_ready()
        dialog = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
        try:
            tokens = chat_prompt_tokens(state.tokenizer, dialog)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        reqs = []
        for c in range(body.n):
            params = state.sampling(max_tokens=max_tokens, prompt_len=len(tokens), temperature=body.temperature,
                                    top_p=body.top_p, top_k=body.top_k,
                                    seed=None if body.seed is None else body.seed + c, stop=_stops(body.stop),
                                    logprobs=body.logprobs)
            reqs.append(state.request(tokens, params, False, chat=True,
                                      top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}

        if body.stream:
            started = [False] * len(reqs)

            def events(i: int, r: Request, delta: str) -> list[dict]:
                out = []
                if not started[i]:
                    started[i] = True
                    out.append({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                    delta = delta.lstrip()
                if delta:
                    out.append({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": i, "delta": {"content": delta}, "finish_reason": None}]})
                if r.finished:
                    out.append({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": i, "delta": {}, "finish_reason": FINISH.get(r.finish_reason, "stop")}]})
                return out

            return StreamingResponse(state.stream(reqs, events), media_type="text/event-stream")

        await state.complete(http, reqs)
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text().lstrip()},
                    "logprobs": _chat_logprobs(state, r) if body.logprobs else None,
                    "finish_reason": FINISH.get(r.finish_reason, "stop")} for i, r in enumerate(reqs)]
        return {**base, "object": "chat.completion", "choices": choices, "usage": _usage(reqs, [tokens] * len(reqs))}

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        state.require_ready()
        if body.modality != "image":
            raise ApiError(400, 'this server embeds images: send "modality": "image" and data:image/...;base64 URLs')
        if state.vision is None:
            raise ApiError(501, "no vision model: start the server with --vision-model NAME|PATH|default")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise ApiError(400, "input is empty")
        if len(inputs) > state.config.max_images:
            raise ApiError(413, f"{len(inputs)} images is over the limit of {state.config.max_images} per request")
        try:
            images = await run_in_threadpool(lambda: [decode_data_url(u, i) for i, u in enumerate(inputs)])
        except BadImage as e:
            raise ApiError(422, str(e)) from None
        cls, patches = await run_in_threadpool(state.vision.embed, images, body.patch_tokens)
        state.metrics.images += len(images)
        data = []
        for i in range(len(images)):
            item = {"object": "embedding", "index": i, "embedding": _encode(cls[i].numpy(), body.encoding_format)}
            if patches is not None:
                item["patch_tokens"] = patches[i].tolist()
            data.append(item)
        return {"object": "list", "data": data, "model": state.vision.name,
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}


def _content(content: str | list[dict] | None) -> str:
    """Message content as text: a string, or the text parts of a list."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p.get("text", "") for p in content if p.get("type") == "text"]
    if len(parts) != len(content):
        raise ApiError(400, "messages: only text content parts are supported by the code model")
    return "".join(parts)


def _encode(vec: np.ndarray, fmt: str):
    if fmt == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode()
    return vec.astype(float).tolist()
