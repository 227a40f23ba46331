"""Instruction tuning data: dialogs in the inference chat format, loss on assistant tokens only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..prompts import B_INST, E_INST, Message, _check_dialog, chat_prompt_tokens
from ..tokenizer import Tokenizer

IGNORE = -100


def dialog_tokens(tok: Tokenizer, dialog: list[Message]) -> tuple[list[int], list[int]]:
    """``(tokens, targets)`` of a dialog ending with an assistant message; ``targets`` is ``IGNORE``
    outside assistant answers (each answer's tokens and its ``</s>``).

    The tokens are those ``chat_prompt_tokens`` gives for the same turns (checked), so the model is
    trained on exactly the layout it sees at inference.
    """
    dialog = _check_dialog(list(dialog))
    if dialog[-1]["role"] != "assistant":
        raise ValueError("a training dialog must end with an assistant message")
    tokens: list[int] = []
    targets: list[int] = []
    for i in range(len(dialog)):
        if dialog[i]["role"] != "assistant":
            continue
        context = chat_prompt_tokens(tok, dialog[:i])  # everything up to and including "[/INST]"
        if context[: len(tokens)] != tokens:
            raise ValueError("dialog turns do not tokenize consistently; check the roles alternate")
        new_prompt = context[len(tokens) :]
        answer = tok.encode(f"{E_INST} {dialog[i]['content'].strip()} ", False, True)
        closing = tok.encode(f"{E_INST}", False, False)
        if answer[: len(closing)] != closing:
            raise ValueError("unexpected tokenization of the answer boundary")
        answer = answer[len(closing) :]
        tokens += new_prompt + answer
        targets += [IGNORE] * len(new_prompt) + answer
    return tokens, targets


def read_dialogs(path: str | os.PathLike) -> list[list[Message]]:
    """JSONL rows with ``messages`` (or ``dialog``): lists of ``{"role", "content"}``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            msgs = row.get("messages", row.get("dialog"))
            if not isinstance(msgs, list):
                raise ValueError(f"{path}:{i}: needs a 'messages' list of {{role, content}}")
            out.append(msgs)
    return out


__all__ = ["B_INST", "E_INST", "IGNORE", "dialog_tokens", "read_dialogs"]
