"""Decode and prefill tokens/s of dinollama's Code Llama vs transformers' LlamaForCausalLM.

    python bench/codellama_decode.py [--dtypes fp32 bf16] [--new 128] [--prompt 64] [--rounds 3] [--batches 1 4 8]

Same weights (exported with save_hf), same dtype, greedy; run side by side, interleaved. Batch 1 decode and
prefill first; then aggregate decode tok/s at each of ``--batches`` (the engine decodes all sequences of a
step in one forward; transformers' ``generate`` on the same batch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import LlamaForCausalLM

from dinollama.codellama import Generator, ModelArgs, SamplingParams, build, optimize_for_inference, save_hf
from dinollama.nn.kernels import cpu_kernels

CONFIG = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32016, multiple_of=256, rope_theta=1e6, max_seq_len=2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench(dtype: torch.dtype, prompt_len: int, new: int, rounds: int, prefill_len: int) -> dict[str, float]:
    torch.manual_seed(0)
    ours = build(CONFIG).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = LlamaForCausalLM.from_pretrained(save_hf(ours, tmp), attn_implementation="sdpa", dtype=dtype).eval()
    ours = optimize_for_inference(ours.to(dtype))
    gen = Generator(ours, None)
    prompt = torch.randint(3, CONFIG.vocab_size, (1, prompt_len)).tolist()
    long = torch.randint(3, CONFIG.vocab_size, (1, prefill_len))
    params = SamplingParams(max_gen_len=new, temperature=0.0)
    res: dict[str, list[float]] = {k: [] for k in ("hf-decode", "ours-decode", "hf-prefill", "ours-prefill")}
    with torch.inference_mode():
        for r in range(rounds + 1):
            t = time.perf_counter()
            out_h = hf.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=0)
            th = time.perf_counter() - t
            t = time.perf_counter()
            out_o, _ = gen.generate(prompt, params, stop_token=-100)
            to = time.perf_counter() - t
            t = time.perf_counter()
            hf(long)
            ph = time.perf_counter() - t
            ours.setup_cache(1, prefill_len)
            t = time.perf_counter()
            ours(long, 0)
            po = time.perf_counter() - t
            if r == 0:  # warm-up round; also check both produce the same greedy tokens
                same = out_h[0, prompt_len:].tolist() == out_o[0]
                continue
            res["hf-decode"].append(new / th)
            res["ours-decode"].append(new / to)
            res["hf-prefill"].append(prefill_len / ph)
            res["ours-prefill"].append(prefill_len / po)
    out = {k: statistics.median(v) for k, v in res.items()}
    out["same_tokens"] = float(same)
    return out


def bench_batches(dtype: torch.dtype, batches: list[int], prompt_len: int, new: int, rounds: int) -> list[tuple]:
    """``(batch, hf tok/s, ours tok/s, same greedy tokens)`` for each batch size."""
    torch.manual_seed(0)
    ours = build(CONFIG).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = LlamaForCausalLM.from_pretrained(save_hf(ours, tmp), attn_implementation="sdpa", dtype=dtype).eval()
    gen = Generator(optimize_for_inference(ours.to(dtype), rows_hint=max(batches)), None)
    params = SamplingParams(max_gen_len=new, temperature=0.0)
    rows = []
    with torch.inference_mode():
        for b in batches:
            prompts = torch.randint(3, CONFIG.vocab_size, (b, prompt_len))
            times: dict[str, list[float]] = {"hf": [], "ours": []}
            for r in range(rounds + 1):
                t = time.perf_counter()
                out_h = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=0)
                times["hf"].append(time.perf_counter() - t)
                t = time.perf_counter()
                out_o, _ = gen.generate(prompts.tolist(), params, stop_token=-100)
                times["ours"].append(time.perf_counter() - t)
                if r == 0:
                    same = out_h[:, prompt_len:].tolist() == out_o
            rows.append((b, b * new / statistics.median(times["hf"][1:]), b * new / statistics.median(times["ours"][1:]),
                         same))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8], help="aggregate decode tok/s at these batch sizes")
    args = p.parse_args()
    n = sum(x.numel() for x in build(CONFIG).parameters())
    from codellama_gguf import cpu_name  # noqa: E402 (the bench folder's helper)

    print(f"{cpu_name()}; {cpu_kernels().describe()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n / 1e6:.0f}M params, batch 1, "
          f"{args.prompt}-token prompt + {args.new} new (decode), {args.prefill}-token prefill; tokens/s (median)")
    print(f"{'dtype':<6}{'hf decode':>11}{'ours decode':>13}{'ratio':>8}{'hf prefill':>12}{'ours prefill':>14}{'ratio':>8}  same greedy tokens")
    for dt in args.dtypes:
        r = bench(DTYPES[dt], args.prompt, args.new, args.rounds, args.prefill)
        print(f"{dt:<6}{r['hf-decode']:>11.1f}{r['ours-decode']:>13.1f}{r['ours-decode'] / r['hf-decode']:>7.2f}x"
              f"{r['hf-prefill']:>12.0f}{r['ours-prefill']:>14.0f}{r['ours-prefill'] / r['hf-prefill']:>7.2f}x  "
              f"{bool(r['same_tokens'])}", flush=True)
    if args.batches:
        print(f"\naggregate decode tok/s, {args.prompt}-token prompts + {args.new} new tokens each (prefill included)")
        print(f"{'dtype':<6}{'batch':>6}{'hf':>9}{'ours':>9}{'ratio':>8}  same greedy tokens")
        for dt in args.dtypes:
            for b, h, o, same in bench_batches(DTYPES[dt], args.batches, args.prompt, args.new, args.rounds):
                print(f"{dt:<6}{b:>6}{h:>9.1f}{o:>9.1f}{o / h:>7.2f}x  {same}", flush=True)


if __name__ == "__main__":
    main()
