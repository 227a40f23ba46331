"""``dinollama complete|infill``: the Code Llama commands (``chat`` is in :mod:`.chat`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .options import (add_device_arg, add_dtype_arg, nonneg_float, nonneg_int, positive_float, positive_int,
                      resolve_dtype, writable_file, writable_folder)

FILL_MARKER = "<FILL_ME>"
KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16,
             "fp32": torch.float32}


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model folder: official (params.json + consolidated.*.pth), "
                   "Hugging Face (config.json + safetensors) or ours; 'default': the small model shipped with dinollama")
    add_dtype_arg(p)
    add_device_arg(p)
    p.add_argument("--max-gen-len", type=positive_int, default=256, help="new tokens at most")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=positive_float, default=0.95, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=nonneg_int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_context_args(p)


def add_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="context length in tokens (default: the model's; up to 100,000 for Code Llama's rope_theta 1e6)")
    p.add_argument("--kv-dtype", choices=["model", *KV_DTYPES], default="model",
                   help="KV cache dtype: the model's, or int8/fp8 with a scale per token and head (half of bf16)")


def sampling_params(args):
    """The ``SamplingParams`` of the options: they check the values (one place for CLI, API, server)."""
    from ..codellama import SamplingParams

    return SamplingParams(max_gen_len=args.max_gen_len, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop_strings=tuple(args.stop))


def load_generator(args):
    """Model + tokenizer of ``--model`` at ``--dtype``, packed for the CPU when the CPU allows."""
    from ..codellama import Generator, load, optimize_for_inference
    model, tokenizer = load(args.model, dtype=resolve_dtype(args.dtype, args.device), device=args.device)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}/tokenizer.model: the model folder needs its tokenizer")
    if args.ctx:
        model.set_context(args.ctx)
    kv = KV_DTYPES.get(args.kv_dtype, model.tok_embeddings.weight.dtype)
    model.check_memory(1, model.params.max_seq_len, kv)  # the whole context, before any cache exists
    optimize_for_inference(model)
    return Generator(model, tokenizer, kv_dtype=kv)


def _read(arg: str, flag: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    try:
        is_file = len(arg) < 4096 and "\n" not in arg and Path(arg).is_file()
    except OSError:  # e.g. a name too long for the file system: it is text
        is_file = False
    if not is_file:
        return arg
    try:
        return Path(arg).read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {arg}: not a UTF-8 text file") from None


def cmd_complete(args) -> int:
    params = sampling_params(args)
    prompt = _read(args.prompt, "PROMPT")
    gen = load_generator(args)
    tokens = gen.tokenizer.encode(prompt, bos=True, eos=False)
    gen.check_length([tokens], params.max_gen_len)  # before anything is printed
    sys.stdout.write(prompt)
    for piece in gen.stream(tokens, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _infill_parts(args) -> tuple[str, str]:
    if args.file:
        if args.prefix is not None or args.suffix is not None:
            raise ValueError(f"give either FILE ({args.file}, with its {FILL_MARKER} marker) or --prefix/--suffix, not both")
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"{args.file}: no such file")
        text = _read(args.file, "FILE")
        if text.count(FILL_MARKER) != 1:
            raise ValueError(f"{args.file}: needs exactly one {FILL_MARKER} marker, found {text.count(FILL_MARKER)}")
        prefix, suffix = text.split(FILL_MARKER)
        return prefix, suffix
    if args.prefix is None or args.suffix is None:
        raise ValueError("give a FILE with a <FILL_ME> marker, or both --prefix and --suffix")
    return _read(args.prefix, "--prefix"), _read(args.suffix, "--suffix")


def cmd_infill(args) -> int:
    from ..codellama import infilling_prompt_tokens

    params = sampling_params(args)
    prefix, suffix = _infill_parts(args)
    gen = load_generator(args)
    tokens = infilling_prompt_tokens(gen.tokenizer, prefix, suffix, suffix_first=args.suffix_first)
    gen.check_length([tokens], params.max_gen_len)
    middle = "".join(gen.stream(tokens, params, stop_token=gen.tokenizer.eot_id, infilling=True))
    sys.stdout.write(prefix + middle + suffix if args.whole else middle)
    sys.stdout.write("" if (args.whole or middle.endswith("\n")) else "\n")
    return 0


def cmd_quantize(args) -> int:
    """A model folder (or GGUF file) to a quantized folder of ours, or to a GGUF file."""
    from ..codellama import load, quantize, save_gguf, save_native

    out = Path(args.output)
    to_gguf = out.suffix == ".gguf"
    if to_gguf:
        writable_file(out, "OUTPUT", parents=True)
    else:
        writable_folder(out, "OUTPUT")
    model, tok = load(args.model, dtype=torch.float32 if to_gguf else torch.bfloat16)
    if tok is None:
        raise FileNotFoundError(f"{args.model}/tokenizer.model: the model folder needs its tokenizer")
    if to_gguf:
        qtype = args.qtype or {"int8": "q8_0", "int4": "q4_0"}.get(args.scheme, "f16")
        if args.scheme and qtype in ("q8_0", "q4_0"):
            quantize(model, args.scheme, group_size=32, head=True)  # written as their own codes
        save_gguf(model, tok, out, qtype)
        print(f"wrote {out} (GGUF {qtype})")
        return 0
    if args.qtype:
        raise ValueError("--qtype is for a .gguf OUTPUT; a folder takes --scheme int8|int4")
    quantize(model, args.scheme or "int8", group_size=args.group_size, symmetric=not args.asymmetric, head=args.head)
    out.mkdir(parents=True, exist_ok=True)
    save_native(model, out, tok)
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({args.scheme or 'int8'}, groups of {args.group_size or 'one row'}; {size / 2**20:.1f} MiB)")
    return 0


def register(sub) -> None:
    from .chat import cmd_chat

    p = sub.add_parser("quantize", help="quantize a Code Llama model: int8/int4 folder, or a GGUF file for llama.cpp",
                       description="MODEL (folder, GGUF or 'default') -> OUTPUT folder (ours, weight-only int8/int4) "
                                   "or OUTPUT.gguf (f16, q8_0, q4_0) that llama.cpp and Ollama run.")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--scheme", choices=["int8", "int4"], default=None, help="weights (default: int8 for a folder)")
    p.add_argument("--group-size", type=int, choices=[0, 32, 64, 128, 256], default=32,
                   help="weights per scale (0: one per output channel, int8 only)")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a minimum per group (Q4_1)")
    p.add_argument("--head", action="store_true", help="quantize the output head too")
    p.add_argument("--qtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default=None,
                   help="GGUF tensor type (default: from --scheme, else f16)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("complete", help="continue code or text (streamed)")
    p.add_argument("prompt", help="prompt text, a file, or - for stdin")
    add_common(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    p.add_argument("file", nargs="?", help=f"a source file with one {FILL_MARKER} marker")
    p.add_argument("--prefix", help="prefix text or file (instead of FILE)")
    p.add_argument("--suffix", help="suffix text or file (instead of FILE)")
    p.add_argument("--suffix-first", action="store_true", help="SPM layout instead of PSM")
    p.add_argument("--whole", action="store_true", help="print prefix + middle + suffix")
    add_common(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("chat", help="interactive instruct chat (streamed)",
                       description="Chat with an Instruct model. Commands: /reset, /system TEXT, /exit (or Ctrl-D); "
                                   "Ctrl-C stops the current reply. With stdin not a terminal: one answer per line.")
    p.add_argument("--system", default="", help="system prompt")
    add_common(p)
    p.set_defaults(func=cmd_chat)
