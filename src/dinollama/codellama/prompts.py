"""Prompt token layouts of the reference: infilling (PSM/SPM) and instruct chat."""

from __future__ import annotations

from typing import TypedDict

from .tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


class Message(TypedDict):
    role: str
    content: str


def infilling_prompt_tokens(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """``[bos, PRE] + enc(prefix) + [SUF] + enc_infill(suffix) + [MID]`` (PSM), or the SPM order
    ``[bos, PRE, SUF] + enc_infill(suffix) + [MID] + enc(prefix)``."""
    tokenizer.require_infilling()
    t = tokenizer
    if suffix_first:
        return [t.bos_id, t.prefix_id, t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id] + t.encode(prefix, False, False)
    return [t.bos_id, t.prefix_id] + t.encode(prefix, False, False) + [t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id]


def _check_dialog(dialog: list[Message]) -> list[Message]:
    if not dialog:
        raise ValueError("empty dialog")
    for i, msg in enumerate(dialog):
        if msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, not {msg.get('role')!r}")
        if any(tag in msg["content"] for tag in SPECIAL_TAGS):
            raise ValueError(f"message {i}: special tags {', '.join(SPECIAL_TAGS)} are not allowed in the prompt")
    return dialog


def chat_prompt_tokens(tokenizer: Tokenizer, dialog: list[Message]) -> list[int]:
    """Llama 2 / Code Llama Instruct chat tokens; the 70B Instruct format when the tokenizer has ``<step>``.

    ``<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{u1} [/INST] {a1} </s><s>[INST] {u2} [/INST]``
    """
    dialog = _check_dialog(list(dialog))
    if tokenizer.step_id is not None:
        return _step_prompt_tokens(tokenizer, dialog)
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise ValueError("a system message must be followed by a user message")
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + dialog[2:]
    if not (all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])):
        raise ValueError("roles must alternate user/assistant/user/... (after an optional system message)")
    if dialog[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    return tokens + tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)


def _step_prompt_tokens(tokenizer: Tokenizer, dialog: list[Message]) -> list[int]:
    """Code Llama 70B Instruct: ``Source: {role}\\n\\n {content} <step> `` per turn, then the assistant header."""
    if dialog[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        tokens += tokenizer.encode(f"Source: {msg['role']}\n\n {msg['content'].strip()}", False, False)
        tokens += [tokenizer.step_id]
    return tokens + tokenizer.encode("Source: assistant\nDestination: user\n\n ", False, False)


def fit_dialog(tokenizer: Tokenizer, dialog: list[Message], context: int, min_reply: int) -> tuple[list[int], int]:
    """Chat tokens of ``dialog`` trimmed to leave ``min_reply`` tokens of a ``context``, and how many
    of its oldest user/assistant exchanges were dropped (a system message is kept).

    Raises ``ValueError`` when the system message and the last user message alone do not fit.
    """
    system = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    dropped = 0
    while True:
        tokens = chat_prompt_tokens(tokenizer, system + turns)
        if len(tokens) + min_reply <= context:
            return tokens, dropped
        if len(turns) <= 1:
            raise ValueError(f"the message is {len(tokens)} tokens with the system prompt; the {context}-token context "
                             f"leaves no room for a {min_reply}-token reply: shorten it (or the system prompt)")
        turns, dropped = turns[2:], dropped + 1
