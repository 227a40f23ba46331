"""The prepared accelerator check: what a lent GPU should confirm, in one short run.

    python bench/gpu_check.py [--device cuda] [--quick] [--seconds 600]

Vision: bf16 images/s of random ViT-S/B/L/g/14 at 224 and 518 px through SDPA (flash on recent GPUs)
next to timm's published RTX 4090 fp16 figures at 518 (S 895, B 350, L 115, g 35 img/s), and the
bf16 model against its fp32 self. Code: a 134M Code Llama in bf16: greedy decode tok/s, prefill
tok/s, chunked prefill against one pass at 16K tokens (the long-context kernels), and the int8 KV
cache. ``--device cpu --quick`` runs the same code on tiny models (the suite does, as its test).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dinollama.codellama import Generator, ModelArgs, SamplingParams, build
from dinollama.dinov2 import build as build_vit

TIMM_4090_518 = {"vits14": 895, "vitb14": 350, "vitl14": 115, "vitg14": 35}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


def vision(device: torch.device, quick: bool, deadline: float) -> None:
    dtype = torch.bfloat16
    for arch in ("vits14", "vitb14", "vitl14", "vitg14"):
        kw = {"depth": 1} if quick else {}
        model = build_vit(f"dinov2_{arch}", **kw).eval().to(device)
        for size in (224, 518):
            if time.time() > deadline:
                print("vision: out of time")
                return
            batch = 1 if quick else (64 if size == 224 else 16)
            x = torch.randn(batch, 3, size, size, device=device)
            with torch.inference_mode():
                ref = model(x)
                half = model.to(dtype)
                got = half(x.to(dtype)).float()
                seconds = timed(lambda: half(x.to(dtype)), device, 1 if quick else 3)
                model.float()
            cos = F.cosine_similarity(got, ref).min().item()
            peer = f"  (timm 4090 fp16: {TIMM_4090_518[arch]})" if size == 518 else ""
            print(f"vision {arch} {size}px bf16: {batch / seconds:8.1f} img/s, cosine to fp32 {cos:.4f}{peer}", flush=True)
        del model


def code(device: torch.device, quick: bool) -> None:
    args = ModelArgs(dim=64 if quick else 768, n_layers=2 if quick else 12, n_heads=4 if quick else 12,
                     vocab_size=32016, multiple_of=64, rope_theta=1e6, max_seq_len=16384)
    torch.manual_seed(0)
    model = build(args).eval().to(device)
    n = 2048 if quick else 16384
    tokens = torch.randint(3, 32016, (1, n), device=device)
    with torch.inference_mode():
        model.setup_cache(1, n)
        full = model(tokens, 0, last_only=True)[0, -1]
        chunks = [model(tokens[:, lo : lo + 1000], lo, last_only=True) for lo in range(0, n, 1000)]
        diff = (chunks[-1][0, -1] - full).abs().max().item()
        model.to(torch.bfloat16)
        model.setup_cache(1, n)
        prefill = timed(lambda: model(tokens[:, :4096], 0, last_only=True), device)
        gen = Generator(model, None)
        prompt = tokens[0, :64].tolist()
        decode = timed(lambda: gen.generate([prompt], SamplingParams(max_gen_len=128), stop_token=-100), device, 1)
        gen_int8 = Generator(model, None, kv_dtype=torch.int8)
        same = gen.generate([prompt], SamplingParams(max_gen_len=32), stop_token=-100)[0][0]
        same8 = gen_int8.generate([prompt], SamplingParams(max_gen_len=32), stop_token=-100)[0][0]
    agree = sum(a == b for a, b in zip(same, same8)) / len(same)
    print(f"code {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M bf16: decode {128 / decode:.1f} tok/s, "
          f"prefill {min(4096, n) / prefill:.0f} tok/s; chunked prefill vs one pass at {n} tokens (fp32): {diff:.2e}; "
          f"int8 KV cache greedy agreement {agree:.2f}; quantized weights on this device: none yet", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny models (a smoke test of this script)")
    p.add_argument("--seconds", type=float, default=480, help="stop the vision part after this long")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; bf16 supported: "
          f"{torch.cuda.is_bf16_supported() if device.type == 'cuda' else 'n/a'}")
    code(device, args.quick)
    vision(device, args.quick, time.time() + args.seconds)


if __name__ == "__main__":
    main()
