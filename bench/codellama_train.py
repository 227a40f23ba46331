"""Code Llama training tokens/s: our trainer step vs a plain transformers loop, same config and data.

    python bench/codellama_train.py [--dim 256] [--layers 8] [--heads 4] [--vocab 8000] [--seq 512] [--batch 16]

Both train the same randomly initialised Llama-architecture model (ours, and the identical weights
converted into `LlamaForCausalLM`) on the same random token windows with AdamW (0.9, 0.95), bf16 autocast
and gradient clipping 1.0; `steps` timed steps after 2 warm-up steps each, interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinollama.codellama import ModelArgs, Transformer, save_hf
from dinollama.codellama.train import CodeTrainConfig, CodeTrainer


def hf_step(model, opt, x, y) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab, multiple_of=64,
                      rope_theta=1e4, max_seq_len=args.seq)
    ours = Transformer(margs)
    with tempfile.TemporaryDirectory() as tmp:
        hf = LlamaForCausalLM.from_pretrained(save_hf(ours, Path(tmp) / "hf"), attn_implementation="sdpa").train()
        data = Path(tmp) / "data"
        data.mkdir()
        windows = np.random.default_rng(0).integers(0, args.vocab, (64, args.seq + 1), dtype=np.int32)
        np.save(data / "train.npy", windows)
        cfg = CodeTrainConfig(seq_len=args.seq, batch_size=args.batch, max_iters=1000, warmup_iters=0, eval_every=0)
        trainer = CodeTrainer(ours, cfg, data, Path(tmp) / "run", progress=False)
        opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        w = torch.from_numpy(windows[: args.batch].astype(np.int64))
        x, y = w[:, :-1], w[:, 1:]
        times = {"ours": [], "hf": []}
        for i in range(args.steps + 2):
            t = time.perf_counter()
            trainer.step()
            times["ours"].append(time.perf_counter() - t)
            t = time.perf_counter()
            hf_step(hf, opt, x, y)
            times["hf"].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    rate = {k: tokens * args.steps / sum(v[2:]) for k, v in times.items()}
    n = sum(q.numel() for q in ours.parameters()) / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {n:.1f}M params (dim {args.dim}, "
          f"{args.layers} layers, vocab {args.vocab}), batch {args.batch} x {args.seq} tokens, bf16 autocast")
    print(f"transformers loop : {rate['hf']:7.0f} tokens/s")
    print(f"ours (CodeTrainer): {rate['ours']:7.0f} tokens/s")
    print(f"ours / transformers: {rate['ours'] / rate['hf']:.2f}x")


if __name__ == "__main__":
    main()
