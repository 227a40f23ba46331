"""The llama.cpp-compatible routes editors call: ``/completion``, ``/infill``, ``/tokenize``,
``/detokenize``, ``/props``, answered with llama-server's fields."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from .. import __version__
from ..codellama.engine import Request, finite, timings
from .errors import ApiError
from .schemas import DetokenizeRequest, InfillRequest, LlamaCompletionRequest, TokenizeRequest
from .state import State, piece_text

STOP_TYPE = {"stop": "eos", "length": "limit", "cancelled": "none"}
SNIPPET = "\n\n--- snippet ---\n\n"  # llama-server's separator of input_extra chunks for models without FIM_SEP
N_BATCH = 2048  # llama-server's default batch: the infill prompt keeps 3/4 of it for the prefix, 1/4 for the suffix


def infill_prompt(state: State, body: InfillRequest, n_predict: int) -> tuple[list[int], bool]:
    """llama-server's infill layout (``format_prompt_infill``) in Code Llama's own format: the extra
    chunks (the newest that fit), then ``<s> <PRE> prefix+prompt <SUF>suffix <MID>``, cutting the
    prefix's head and the suffix's tail to fit; returns the tokens and whether anything was cut."""
    tok = state.tokenizer
    state.require_infilling()
    prefix = tok.encode(body.input_prefix, False, False)
    prompt = tok.encode_infilling(body.prompt) if body.prompt else []
    suffix = tok.encode_infilling(body.input_suffix)
    extra: list[int] = []
    for chunk in body.input_extra:
        extra += tok.encode_infilling(SNIPPET) + tok.encode_infilling(chunk.text)
    n_prefix = min(len(prefix), 3 * (N_BATCH // 4))
    n_suffix = min(len(suffix), max(0, N_BATCH // 4 - (2 + len(prompt))))
    # the extras get the context the rest leaves (llama-server keeps n_ctx - n_batch for them: none below 2K)
    room = state.ctx - (n_prefix + len(prompt) + n_suffix + 4) - max(n_predict, 1)
    n_extra = min(len(extra), max(0, room))
    truncated = n_prefix < len(prefix) or n_suffix < len(suffix) or n_extra < len(extra)
    fim = [tok.bos_id, tok.prefix_id] + prefix[len(prefix) - n_prefix:] + prompt
    return extra[len(extra) - n_extra:] + fim + [tok.suffix_id] + suffix[:n_suffix] + [tok.middle_id], truncated


def _params(state: State, body: LlamaCompletionRequest, prompt_len: int):
    return state.sampling(max_tokens=None if body.n_predict < 0 else body.n_predict, prompt_len=prompt_len,
                          temperature=max(body.temperature, 0.0), top_p=body.top_p or 1.0, top_k=max(body.top_k, 0),
                          seed=None if body.seed < 0 else body.seed, stop=body.stop, logprobs=body.n_probs > 0)


def _probs(state: State, r: Request, start: int = 0) -> list[dict]:
    tok = state.tokenizer
    out = []
    for i in range(start, len(r.tokens)):
        t = r.tokens[i]
        top = r.top[i] if i < len(r.top) else {}
        out.append({"id": t, "token": piece_text(tok, t), "logprob": finite(r.logprobs[i]),
                    "bytes": list(piece_text(tok, t).encode()),
                    "top_logprobs": [{"id": k, "token": piece_text(tok, k), "logprob": finite(v),
                                      "bytes": list(piece_text(tok, k).encode())} for k, v in top.items()]})
    return out


def _select(fields: list[str], res: dict) -> dict:
    """llama-server's ``response_fields``: only the named (``a/b`` nested) fields, keyed by their path."""
    if not fields:
        return res
    out = {}
    for path in fields:
        cur, ok = res, True
        for key in path.split("/"):
            if isinstance(cur, dict) and key in cur:
                cur = cur[key]
            else:
                ok = False
                break
        if ok:
            out[path] = cur
    return out


def _final(state: State, r: Request, body: LlamaCompletionRequest, prompt_text: str, truncated: bool) -> dict:
    res = {
        "index": 0, "content": r.text(), "tokens": [], "id_slot": r.slot if r.slot is not None else -1, "stop": True,
        "model": state.model_name, "tokens_predicted": len(r.tokens), "tokens_evaluated": len(r.prompt),
        "generation_settings": {"n_predict": body.n_predict, "temperature": body.temperature, "top_k": body.top_k,
                                "top_p": body.top_p, "seed": body.seed, "stop": body.stop, "n_probs": body.n_probs,
                                "cache_prompt": body.cache_prompt, "t_max_predict_ms": body.t_max_predict_ms},
        "prompt": prompt_text, "has_new_line": "\n" in r.text(), "truncated": truncated,
        "stop_type": "word" if r.stop_word else STOP_TYPE.get(r.finish_reason, "none"),
        "stopping_word": r.stop_word, "tokens_cached": len(r.prompt) + len(r.tokens), "timings": timings(r),
    }
    if body.n_probs:
        res["completion_probabilities"] = _probs(state, r)
    return _select(body.response_fields, res)


async def _run(state: State, http: HttpRequest, body: LlamaCompletionRequest, tokens: list[int], infill: bool,
               prompt_text: str, truncated: bool):
    params = _params(state, body, len(tokens))
    r = state.request(tokens, params, infill, top_logprobs=body.n_probs, cache_prompt=body.cache_prompt,
                      predict_ms=body.t_max_predict_ms or None)
    if body.stream:
        sent = [0]

        def events(_: int, req: Request, delta: str) -> list[dict]:
            out = []
            if delta:
                out.append({"content": delta, "tokens": [], "stop": False, "id_slot": req.slot,
                            "tokens_predicted": len(req.tokens), "tokens_evaluated": len(req.prompt)})
                if body.n_probs:
                    out[0]["completion_probabilities"] = _probs(state, req, sent[0])
                    sent[0] = len(req.tokens)
            if req.finished:  # the last event: every field of the answer, the text already sent
                out.append(_final(state, req, body, prompt_text, truncated) | {"content": ""})
            return out

        return StreamingResponse(state.stream([r], events, sentinel=False), media_type="text/event-stream")
    await state.complete(http, [r])
    return _final(state, r, body, prompt_text, truncated)


def register(router: APIRouter, state: State) -> None:
    @router.post("/completion")
    @router.post("/completions", include_in_schema=False)
    async def completion(body: LlamaCompletionRequest, http: HttpRequest):
        state.require_ready()
        tokens, fim = state.prompt_tokens(body.prompt)
        text = body.prompt if isinstance(body.prompt, str) else state.tokenizer.decode(body.prompt)
        return await _run(state, http, body, tokens, fim, text, False)

    @router.post("/infill")
    async def infill(body: InfillRequest, http: HttpRequest):
        state.require_ready()
        tokens, truncated = infill_prompt(state, body, body.n_predict)
        return await _run(state, http, body, tokens, True, body.prompt, truncated)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state.require_ready()
        tok = state.tokenizer
        ids = tok.encode(body.content, bos=body.add_special, eos=False)
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": piece_text(tok, t)} for t in ids]}
        return {"tokens": ids}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state.require_ready()
        bad = [t for t in body.tokens if not 0 <= t < state.tokenizer.n_words]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary of {state.tokenizer.n_words}")
        return {"content": state.tokenizer.decode(body.tokens)}

    @router.get("/props")
    async def props() -> dict:
        state.require_ready()
        c = state.config
        return {"default_generation_settings": {"n_ctx": state.ctx, "params": {"temperature": 0.8, "top_k": 40,
                                                                                "top_p": 0.95, "n_predict": -1}},
                "total_slots": c.parallel, "model_path": c.model, "vision_model": c.vision_model,
                "chat_template": "llama2" if state.tokenizer.step_id is None else "codellama-70b-instruct",
                "infill": state.tokenizer.supports_infilling, "build_info": f"dinollama {__version__}"}
