"""Images/s of dinollama's DINOv2 backbone vs transformers' Dinov2Model, same weights, same batch.

    python bench/dinov2_inference.py [--models s b] [--dtypes fp32 bf16] [--batch 8] [--iters 12]

Each model and dtype is measured in a fresh process (what one configuration leaves in the allocator
changed the next one's figures by 10-20%); within it, everything runs side by side, interleaved round
by round in a shuffled order. ``--keep-freed-memory`` runs both sides with
``dinollama.memory.keep_freed_memory()`` (no page faults on reused temporaries), so the allocator's
share of the difference can be told apart from the kernels'.
The ratios are per round (the faster Hugging Face variant's time over ours in the same round), shown
as the median with the middle half of the rounds in brackets: on a noisy machine they are meaningful,
the lone seconds are not. ``ours-fast`` is ``model(x)``, the class embedding, whose last block
computes the class token only; ``fast-all`` is ``forward_features``, which like the Hugging Face
models carries every token through every block.

Two columns bound what any rewrite can gain: ``gemm-ceiling`` times the model's largest matrix
multiply (fc1, batch x 257 tokens) as Hugging Face runs it (``F.linear``) and as we do (oneDNN,
pre-packed), interleaved in the same rounds; ``all GF/s`` is the matrix-multiply work of
``forward_features`` (projections, MLP, attention, patch embedding) per second.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Dinov2Model

from dinollama.dinov2 import build, optimize_for_inference, to_hf
from dinollama.memory import keep_freed_memory
from dinollama.nn import PackedLinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_copy(model, attn: str, folder: Path) -> torch.nn.Module:
    sd, config = to_hf(model.state_dict(), model.cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return Dinov2Model.from_pretrained(folder, attn_implementation=attn).eval()


def timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def matmul_flops(model, res: int) -> float:
    """Multiply-add work (2 FLOPs each) of one image through ``forward_features``."""
    d, g = model.embed_dim, res // model.patch_size
    t = 1 + model.num_register_tokens + g * g
    linears = [m for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    per_block = 2 * t * sum(m.in_features * m.out_features for m in linears) + 4 * t * t * d
    return len(model.blocks) * per_block + 2 * g * g * 3 * model.patch_size**2 * d


def gemm_pair(model, dtype: torch.dtype, rows: int) -> dict:
    """fc1 (w12 in SwiGLU models) of the first block as Hugging Face runs it and as the fast path does."""
    mlp = model.blocks[0].mlp
    fc1 = mlp.fc1 if hasattr(mlp, "fc1") else mlp.w12
    x = torch.randn(rows, fc1.in_features, dtype=dtype)
    w, b = fc1.weight.detach().to(dtype), fc1.bias.detach().to(dtype)
    packed = PackedLinear(fc1, rows, dtype=dtype)
    return {"gemm-hf": lambda _: torch.nn.functional.linear(x, w, b), "gemm-ours": lambda _: packed(x)}


def run(size: str, dtype_name: str, batch: int, iters: int, res: int) -> dict[str, list[float]]:
    dtype = DTYPES[dtype_name]
    ours = build(f"dinov2_vit{size}14").eval()
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {
            "hf-eager": hf_copy(ours, "eager", Path(tmp) / "e").to(dtype),
            "hf-sdpa": hf_copy(ours, "sdpa", Path(tmp) / "s").to(dtype),
        }
    contenders["ours-fast"] = optimize_for_inference(ours, dtype=dtype, rows_hint=batch * 257)
    contenders["ours"] = ours.to(dtype)
    x = torch.randn(batch, 3, res, res, dtype=dtype)
    fns = {
        "hf-eager": lambda x, m=contenders["hf-eager"]: m(pixel_values=x).pooler_output,
        "hf-sdpa": lambda x, m=contenders["hf-sdpa"]: m(pixel_values=x).pooler_output,
        "ours": contenders["ours"],
        "ours-fast": contenders["ours-fast"],
        "fast-all": lambda x, m=contenders["ours-fast"]: m.forward_features(x)["x_norm_clstoken"],
    }
    gemms = gemm_pair(ours, dtype, batch * 257)
    times: dict[str, list[float]] = {k: [] for k in [*fns, *gemms, "flops"]}
    times["flops"] = [matmul_flops(ours, res)]
    with torch.inference_mode():
        # HF interpolates non-register position embeddings without the official 0.1 offset (its
        # PR #33226), so it differs slightly from the official numerics at 224; ours-fast must not.
        ref, hf = fns["ours"](x).float(), fns["hf-sdpa"](x).float()
        for k, f in fns.items():
            f(x)  # warm-up
            out = f(x).float()
            ours_k = k.startswith("ours") or k == "fast-all"
            tol = (1e-3 if dtype == torch.float32 else 0.25) if ours_k else 0.25
            err = (out - (ref if ours_k else hf)).abs().max().item()
            assert err < tol, f"{k} deviates by {err}"
        order = list(fns)
        for i in range(iters):
            random.Random(i).shuffle(order)
            for k in order:
                times[k].append(timed(fns[k], x))
            for k, f in gemms.items():
                f(None)
                times[k].append(timed(f, None))
    return times


def ratio(times: dict[str, list[float]], ours: str, hf: str) -> str:
    """Median and middle half of the per-round speed-ups of ``ours`` over ``hf``."""
    r = [a / b for a, b in zip(times[hf], times[ours], strict=True)]
    q1, _, q3 = statistics.quantiles(r, n=4)
    return f"{statistics.median(r):.2f}x ({q1:.2f}-{q3:.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["s", "b"], choices=list("sblg"))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--keep-freed-memory", action="store_true", help="glibc keeps freed memory (both sides)")
    p.add_argument("--times-json", action="store_true", help="measure one model and dtype, print the raw times")
    args = p.parse_args()
    if args.times_json:
        if args.keep_freed_memory:
            keep_freed_memory()
        print(json.dumps(run(args.models[0], args.dtypes[0], args.batch, args.iters, args.res)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.res}px, "
          f"{args.iters} rounds, {'freed memory kept' if args.keep_freed_memory else 'default allocator'}; "
          f"images/s (median)")
    print(f"{'model':<10}{'dtype':<6}{'hf-eager':>10}{'hf-sdpa':>10}{'ours':>10}{'ours-fast':>11}{'fast-all':>10}"
          f"{'fast/best-hf':>22}{'all/best-hf':>22}{'gemm-ceiling':>22}{'all GF/s':>10}")
    for size in args.models:
        for dt in args.dtypes:
            cmd = [sys.executable, __file__, "--times-json", "--models", size, "--dtypes", dt, "--batch", str(args.batch),
                   "--iters", str(args.iters), "--res", str(args.res)] + ["--keep-freed-memory"] * args.keep_freed_memory
            t = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            flops = t.pop("flops")[0]
            r = {k: args.batch / statistics.median(v) for k, v in t.items()}
            best = max(("hf-eager", "hf-sdpa"), key=r.get)
            print(f"ViT-{size.upper()}/14   {dt:<6}{r['hf-eager']:>10.1f}{r['hf-sdpa']:>10.1f}{r['ours']:>10.1f}"
                  f"{r['ours-fast']:>11.1f}{r['fast-all']:>10.1f}{ratio(t, 'ours-fast', best):>22}"
                  f"{ratio(t, 'fast-all', best):>22}{ratio(t, 'gemm-ours', 'gemm-hf'):>22}"
                  f"{r['fast-all'] * flops / 1e9:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
