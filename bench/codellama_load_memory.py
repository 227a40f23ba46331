"""Peak anonymous memory while loading a Code Llama checkpoint, relative to the model's size.

    python bench/codellama_load_memory.py [--dim 1024 --layers 16] [--mp 1 2] [--dtype fp32 bf16]

Writes official folders (model-parallel MP shards) and a Hugging Face folder of a random model,
then loads each in a fresh process while a thread samples RssAnon (private memory; the mmap'd
file pages are reclaimable page cache and are reported separately as RssFile).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, threading, time, torch, json
from dinollama.codellama import load
def rss():
    f = dict(l.split(':', 1) for l in open('/proc/self/status'))
    return int(f['RssAnon'].split()[0]) * 1024, int(f['RssFile'].split()[0]) * 1024
base = rss()[0]; peak = [0, 0]; stop = False
def watch():
    while not stop:
        a, f = rss(); peak[0] = max(peak[0], a - base); peak[1] = max(peak[1], f); time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
model, _ = load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
stop = True; t.join()
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"size": size, "anon": peak[0], "file": peak[1]}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--mp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_codellama_model import official_folder  # the same folder writer the tests use

    from dinollama.codellama import ModelArgs, build, save_hf

    model = build(ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 128, n_kv_heads=args.dim // 1024 or 1,
                            vocab_size=32016, max_seq_len=4096))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {f"official MP={mp}": official_folder(model, Path(tmp) / f"mp{mp}", mp) for mp in args.mp}
        folders["hugging face"] = save_hf(model, Path(tmp) / "hf")
        del model
        print(f"{'checkpoint':<16}{'dtype':<10}{'model MB':>10}{'peak anon MB':>14}{'ratio':>8}{'file pages MB':>15}")
        for name, folder in folders.items():
            for dt in args.dtype:
                out = subprocess.run([sys.executable, "-c", CHILD, str(folder), dt], capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name:<16}{dt:<10}{r['size'] / 2**20:>10.0f}{r['anon'] / 2**20:>14.0f}"
                      f"{r['anon'] / r['size']:>7.2f}x{r['file'] / 2**20:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
