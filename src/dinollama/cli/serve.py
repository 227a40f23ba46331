"""``dinollama serve``: the HTTP server (OpenAI + llama.cpp APIs, image embeddings, a web page)."""

from __future__ import annotations

import argparse
import socket

from .code import KV_DTYPES
from .options import add_device_arg, add_dtype_arg, positive_float, positive_int


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve Code Llama (OpenAI and llama.cpp APIs) and DINOv2 image embeddings over HTTP",
                       description="One engine with continuous batching behind /v1/completions, /v1/chat/completions, "
                                   "/v1/embeddings, /completion, /infill, /tokenize, /health, /metrics and a web page "
                                   "at /. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("--model", default="default", help="code model: any folder or GGUF file 'load' takes, or 'default'")
    p.add_argument("--vision-model", default=None,
                   help="DINOv2 backbone for /v1/embeddings: a name (dinov2_vits14), a checkpoint, or 'default'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--parallel", type=positive_int, default=4, help="slots: sequences decoded together, a KV cache each")
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="context per slot in tokens (default: 4096 or the model's, if shorter)")
    p.add_argument("--kv-dtype", choices=["model", *KV_DTYPES], default="model", help="KV cache dtype")
    add_dtype_arg(p)
    add_device_arg(p)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' or 'X-Api-Key: KEY' "
                                                    "(/health stays public)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting for a slot before 503")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds a request may take at most")
    p.add_argument("--max-body-mb", type=positive_float, default=20.0, help="largest request body (413 above)")
    p.add_argument("--max-images", type=positive_int, default=16, help="images per embeddings request")
    p.add_argument("--prefill-chunk", type=positive_int, default=512,
                   help="prompt tokens per step while nothing decodes: long prompts prefill in chunks")
    p.add_argument("--decode-chunk", type=positive_int, default=2048,
                   help="prompt tokens per step while others decode, in the same forward, across the waiting prompts "
                        "(llama-server's batch; lower: a smoother stream while long prompts arrive)")
    p.set_defaults(func=cmd_serve)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return port


def _check_bind(host: str, port: int) -> None:
    """A one-line error now, instead of uvicorn's log after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None


def cmd_serve(args) -> int:
    from pathlib import Path

    from ..serve import ServeConfig, serve

    for name, value in (("--model", args.model), ("--vision-model", args.vision_model)):
        looks_like_path = value and ("/" in value or value.endswith((".gguf", ".safetensors", ".pth", ".pt")))
        if looks_like_path and not Path(value).exists():
            raise FileNotFoundError(f"{name} {value}: no such file or folder")
    _check_bind(args.host, args.port)
    config = ServeConfig(model=args.model, vision_model=args.vision_model, host=args.host, port=args.port,
                         parallel=args.parallel, ctx=args.ctx, api_key=args.api_key, dtype=args.dtype,
                         device=args.device, kv_dtype=args.kv_dtype, max_queue=args.max_queue, timeout_s=args.timeout,
                         max_body_mb=args.max_body_mb, max_images=args.max_images, prefill_chunk=args.prefill_chunk,
                         decode_chunk=args.decode_chunk)
    return serve(config)
