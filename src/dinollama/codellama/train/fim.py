"""Fill-in-the-middle training documents, laid out exactly as the inference prompts.

A document is split at two uniform random character positions into prefix/middle/suffix. PSM:
``infilling_prompt_tokens(prefix, suffix) + enc_infill(middle) + [EOT]``; SPM the same with
``suffix_first=True``. The prompt part is built by the inference function itself, so training
and inference layouts cannot drift apart. Every document ends with ``</s>``, the separator of
packed sequences.
"""

from __future__ import annotations

import random

from ..prompts import infilling_prompt_tokens
from ..tokenizer import Tokenizer


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Prefix, middle, suffix at two positions drawn uniformly over ``[0, len(text)]``."""
    a, b = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:a], text[a:b], text[b:]


def fim_tokens(tok: Tokenizer, prefix: str, middle: str, suffix: str, suffix_first: bool) -> list[int]:
    return infilling_prompt_tokens(tok, prefix, suffix, suffix_first) + tok.encode_infilling(middle) + [tok.eot_id, tok.eos_id]


def plain_tokens(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, bos=True, eos=True)


def document_tokens(tok: Tokenizer, text: str, rng: random.Random, fim_rate: float = 0.9, spm_rate: float = 0.5,
                    max_tokens: int | None = None) -> tuple[list[int], str]:
    """Tokens of one document and its layout (``plain``, ``psm`` or ``spm``).

    FIM is drawn with probability ``fim_rate`` (then SPM with ``spm_rate``); a document whose plain
    tokens exceed ``max_tokens`` (one context) would be cut across contexts and stays plain.
    """
    draw_fim, draw_spm = rng.random() < fim_rate, rng.random() < spm_rate
    prefix, middle, suffix = fim_split(text, rng)
    plain = plain_tokens(tok, text)
    if not draw_fim or not tok.supports_infilling or (max_tokens is not None and len(plain) + 4 > max_tokens):
        return plain, "plain"
    tokens = fim_tokens(tok, prefix, middle, suffix, draw_spm)
    if max_tokens is not None and len(tokens) > max_tokens:
        return plain, "plain"
    return tokens, "spm" if draw_spm else "psm"
