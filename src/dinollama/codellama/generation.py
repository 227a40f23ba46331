"""Text completion, infilling, chat and streaming over the engine: the reference ``generate`` API."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .engine import Engine, Request, check_fits_context
from .model import Transformer
from .prompts import Message, chat_prompt_tokens, infilling_prompt_tokens
from .sampling import SamplingParams, sample
from .tokenizer import Tokenizer

__all__ = ["Generator", "SamplingParams", "generate", "sample"]


class Generator:
    """Text completion, infilling and chat over one model and tokenizer, decoded by the :class:`Engine`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prefill_chunk: int = 2048,
                 kv_dtype: torch.dtype | None = None) -> None:
        """``prefill_chunk``: prompt tokens per forward pass (bounds activation memory at long context);
        ``kv_dtype``: the KV cache's dtype (default the model's; ``torch.int8`` halves it)."""
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk, self.kv_dtype = prefill_chunk, kv_dtype

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def check_length(self, prompts: list[list[int]], max_gen_len: int) -> int:
        """Prompt + ``max_gen_len`` tokens, or a ``ValueError`` with the counts when over the context."""
        if not prompts:
            raise ValueError("every prompt needs at least one token")
        return max(check_fits_context(len(p), max_gen_len, self.model.params.max_seq_len) for p in prompts)

    def engine(self, prompts: list[list[int]], p: SamplingParams) -> Engine:
        """An engine with a slot per prompt and a cache just long enough for them."""
        return Engine(self.model, len(prompts), self.check_length(prompts, p.max_gen_len), self.kv_dtype,
                      self.prefill_chunk)

    def requests(self, prompts: list[list[int]], p: SamplingParams, stop_token: int | None = None,
                 infilling: bool = False) -> list[Request]:
        tok = self.tokenizer  # None: token ids only (benchmarks), with an explicit stop_token
        stop = tok.eos_id if stop_token is None else stop_token
        decode = None if tok is None else tok.decode_infilling if infilling else tok.decode
        return [Request(list(t), p, frozenset({stop}), decode, prompt_logprobs=p.logprobs and p.echo) for t in prompts]

    def generate(self, prompts: list[list[int]], p: SamplingParams, stop_token: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Generated tokens per prompt (the prompt too with ``echo``), cut at the stop token, and their
        log-probabilities (with ``logprobs``; zeros otherwise)."""
        reqs = self.engine(prompts, p).run(self.requests(prompts, p, stop_token))
        out_tokens, out_logprobs = [], []
        for r in reqs:
            toks = (r.prompt if p.echo else []) + r.tokens
            probs = (r.prompt_lp if p.echo else []) + (r.logprobs[: len(r.tokens)] if p.logprobs else [0.0] * len(r.tokens))
            out_tokens.append(toks)
            out_logprobs.append(probs if p.logprobs else [0.0] * len(toks))
        return out_tokens, out_logprobs

    def text_completion(self, prompts: list[str], p: SamplingParams | None = None) -> list[str]:
        p = p or SamplingParams()
        tokens = [self.tokenizer.encode(s, bos=True, eos=False) for s in prompts]
        return [r.text() for r in self.engine(tokens, p).run(self.requests(tokens, p))]

    def text_infilling(self, prefixes: list[str], suffixes: list[str], p: SamplingParams | None = None,
                       suffix_first: bool = False) -> list[str]:
        """Middles for each (prefix, suffix), stopping at ``<EOT>``."""
        p = p or SamplingParams()
        p = SamplingParams(**{**p.__dict__, "echo": False})
        tokens = [infilling_prompt_tokens(self.tokenizer, a, b, suffix_first) for a, b in zip(prefixes, suffixes)]
        reqs = self.requests(tokens, p, self.tokenizer.eot_id, infilling=True)
        return [r.text() for r in self.engine(tokens, p).run(reqs)]

    def chat_stop(self) -> int:
        """The end of an assistant turn: ``<step>`` for 70B Instruct, else eos."""
        return self.tokenizer.step_id if self.tokenizer.step_id is not None else self.tokenizer.eos_id

    def chat_completion(self, dialogs: list[list[Message]], p: SamplingParams | None = None) -> list[str]:
        p = p or SamplingParams()
        tokens = [chat_prompt_tokens(self.tokenizer, d) for d in dialogs]
        return [r.text().strip() for r in self.engine(tokens, p).run(self.requests(tokens, p, self.chat_stop()))]

    def stream(self, prompt: list[int], p: SamplingParams | None = None, stop_token: int | None = None,
               infilling: bool = False) -> Iterator[str]:
        """Yield text pieces of one generation as they are decoded (a tail that may still turn into a
        stop string is held back until it does not)."""
        p = p or SamplingParams()
        engine = self.engine([prompt], p)
        req = engine.add(self.requests([prompt], p, stop_token, infilling)[0])
        shown = ""
        while not req.finished:
            engine.step()
            text = req.visible_text()
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text


def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """One-call text completion: ``generate(model, tok, ["def fib(n):"], max_gen_len=64)``."""
    return Generator(model, tokenizer).text_completion(prompts, SamplingParams(**kwargs))
