"""``dinollama complete|infill|chat``: the Code Llama commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .vision import DTYPES

FILL_MARKER = "<FILL_ME>"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model folder: official (params.json + consolidated.*.pth), "
                   "Hugging Face (config.json + safetensors) or ours; default: the small model shipped with dinollama")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-gen-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _generator(args):
    from ..codellama import Generator, SamplingParams, load, optimize_for_inference

    model, tokenizer = load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    optimize_for_inference(model)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}/tokenizer.model: the model folder needs its tokenizer")
    params = SamplingParams(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_strings=tuple(args.stop))
    return Generator(model, tokenizer), params


def _read(arg: str) -> str:
    return sys.stdin.read() if arg == "-" else Path(arg).read_text() if Path(arg).is_file() else arg


def cmd_complete(args) -> int:
    gen, params = _generator(args)
    prompt = _read(args.prompt)
    sys.stdout.write(prompt)
    for piece in gen.stream(gen.tokenizer.encode(prompt, bos=True, eos=False), params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_infill(args) -> int:
    from ..codellama import infilling_prompt_tokens

    if args.file:
        text = Path(args.file).read_text()
        if text.count(FILL_MARKER) != 1:
            raise ValueError(f"{args.file}: needs exactly one {FILL_MARKER} marker, found {text.count(FILL_MARKER)}")
        prefix, suffix = text.split(FILL_MARKER)
    elif args.prefix is not None and args.suffix is not None:
        prefix, suffix = _read(args.prefix), _read(args.suffix)
    else:
        raise ValueError("give a FILE with a <FILL_ME> marker, or both --prefix and --suffix")
    gen, params = _generator(args)
    tokens = infilling_prompt_tokens(gen.tokenizer, prefix, suffix, suffix_first=args.suffix_first)
    middle = "".join(gen.stream(tokens, params, stop_token=gen.tokenizer.eot_id, infilling=True))
    sys.stdout.write(prefix + middle + suffix if args.whole else middle)
    sys.stdout.write("" if (args.whole or middle.endswith("\n")) else "\n")
    return 0


def cmd_chat(args) -> int:
    from ..codellama import chat_prompt_tokens

    gen, params = _generator(args)
    tok = gen.tokenizer
    stop = tok.step_id if tok.step_id is not None else tok.eos_id
    dialog = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if not user.strip():
            break
        dialog.append({"role": "user", "content": user})
        try:
            prompt = chat_prompt_tokens(tok, dialog)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            dialog.pop()
            continue
        print("assistant> ", end="", flush=True)
        reply = ""
        for piece in gen.stream(prompt, params, stop_token=stop):
            reply += piece
            print(piece, end="", flush=True)
        print()
        dialog.append({"role": "assistant", "content": reply.strip()})
    return 0


def register(sub) -> None:
    p = sub.add_parser("complete", help="continue code or text (streamed)")
    p.add_argument("prompt", help="prompt text, a file, or - for stdin")
    _add_common(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    p.add_argument("file", nargs="?", help=f"a source file with one {FILL_MARKER} marker")
    p.add_argument("--prefix", help="prefix text or file")
    p.add_argument("--suffix", help="suffix text or file")
    p.add_argument("--suffix-first", action="store_true", help="SPM layout instead of PSM")
    p.add_argument("--whole", action="store_true", help="print prefix + middle + suffix")
    _add_common(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("chat", help="interactive instruct chat (streamed)")
    p.add_argument("--system", default="", help="system prompt")
    _add_common(p)
    p.set_defaults(func=cmd_chat)
