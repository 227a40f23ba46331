"""Long-context prefill: tokens/s and peak memory of dinollama vs llama.cpp at growing context lengths.

    python bench/long_context.py [--lengths 4096 16384 65536 100000] [--model 134m|small] [--dtypes f32 bf16]
                                 [--llama-bench PATH | --build-llama-cpp DIR] [--threads 2]

Same random weights for both: exported with ``save_hf`` and converted by llama.cpp's own
``convert_hf_to_gguf.py``. llama.cpp runs ``llama-bench -p N -n 0 -fa 1`` (flash attention); ours
prefills in chunks of 2,048 with ``last_only`` logits over a preallocated cache, in a fresh process
per length so that its peak RSS is its own. ``--build-llama-cpp DIR`` downloads the
``llama-cpp-python`` sdist from PyPI and builds ``llama-bench`` there (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dinollama.codellama import ModelArgs, Tokenizer, build, save_hf
from dinollama.nn.kernels import cpu_kernels

MODELS = {  # the 134M Llama of issue 16's table, and a 2-layer model for the longest contexts
    "134m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32016, multiple_of=256, rope_theta=1e6,
                      max_seq_len=100_000),
    "small": ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=32016, multiple_of=256, rope_theta=1e6,
                       max_seq_len=100_000),
}
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "codellama_tokenizer.model"

OURS = """
import json, sys, time, torch
from dinollama.codellama import load
model, _ = load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
model.set_context(int(sys.argv[3]))
n, chunk = int(sys.argv[3]), 2048
tokens = torch.randint(3, model.params.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(tokens[:, :64], 0)  # warm-up
    model.setup_cache(1, n)
    t = time.perf_counter()
    for lo in range(0, n, chunk):
        model(tokens[:, lo:lo + chunk], lo, last_only=True)
    seconds = time.perf_counter() - t
print(json.dumps({"tok_s": n / seconds}))
"""


def build_llama_cpp(folder: Path) -> Path:
    """llama-bench from the llama-cpp-python sdist (which vendors llama.cpp), built with cmake."""
    folder.mkdir(parents=True, exist_ok=True)
    src = next(folder.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python", "-d", str(folder)], check=True)
        sdist = next(folder.glob("llama_cpp_python-*.tar.gz"))
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(folder)], check=True)
        src = next(folder.glob("llama_cpp_python-*/vendor/llama.cpp"))
    exe = src / "build" / "bin" / "llama-bench"
    if not exe.exists():
        subprocess.run(["cmake", "-B", "build", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                        "-DCMAKE_BUILD_TYPE=Release"], cwd=src, check=True)
        subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "llama-bench"],
                       cwd=src, check=True)
    return exe


def convert(hf_folder: Path, out: Path, outtype: str, llama_src: Path) -> Path:
    """llama.cpp's own converter, with its bundled gguf-py."""
    env = {**os.environ, "PYTHONPATH": str(llama_src / "gguf-py")}
    subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(hf_folder), "--outfile", str(out),
                    "--outtype", outtype], check=True, env=env, capture_output=True)
    return out


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """stdout and the peak RSS in MB of one process (GNU time's %M)."""
    r = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB=%M", *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-2000:]}")
    kb = next(int(line.split("=")[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_KB="))
    return r.stdout, kb / 1024


def run_llama_bench(exe: Path, gguf: Path, n: int, threads: int) -> dict:
    out, peak = peak_rss([str(exe), "-m", str(gguf), "-p", str(n), "-n", "0", "-fa", "1", "-t", str(threads),
                          "-r", "1", "-o", "json"])
    return {"tok_s": json.loads(out)[0]["avg_ts"], "peak_mb": peak}


def run_ours(folder: Path, dtype: str, n: int, threads: int) -> dict:
    out, peak = peak_rss([sys.executable, "-c", OURS, str(folder), dtype, str(n)],
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return {**json.loads(out.strip().splitlines()[-1]), "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 100_000])
    p.add_argument("--model", choices=list(MODELS), default="134m")
    p.add_argument("--dtypes", nargs="+", choices=list(TORCH_DTYPES), default=["f32", "bf16"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--llama-bench", type=Path, help="a built llama-bench (its source tree must hold the converter)")
    p.add_argument("--build-llama-cpp", type=Path, help="download and build llama.cpp in this folder")
    args = p.parse_args()
    exe = args.llama_bench or (build_llama_cpp(args.build_llama_cpp) if args.build_llama_cpp else None)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{cpu}; {cpu_kernels().describe()}; torch {torch.__version__}; {args.threads} threads")
    torch.manual_seed(0)
    model = build(MODELS[args.model]).eval()
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model {args.model}: {n_params / 1e6:.0f}M parameters; prefill of N random tokens, batch 1")
    print(f"{'dtype':<6}{'tokens':>8}{'ours tok/s':>12}{'llama.cpp':>11}{'ratio':>8}{'ours peak MB':>14}{'llama.cpp MB':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(TOKENIZER)
        for dt in args.dtypes:
            folder = save_hf(model.to(TORCH_DTYPES[dt]), Path(tmp) / f"hf-{dt}", tok)
            gguf = convert(folder, Path(tmp) / f"m-{dt}.gguf", dt, exe.parents[2]) if exe else None
            for n in args.lengths:
                ours = run_ours(folder, str(TORCH_DTYPES[dt]).removeprefix("torch."), n, args.threads)
                ref = run_llama_bench(exe, gguf, n, args.threads) if exe else {"tok_s": float("nan"), "peak_mb": float("nan")}
                print(f"{dt:<6}{n:>8}{ours['tok_s']:>12.0f}{ref['tok_s']:>11.0f}{ours['tok_s'] / ref['tok_s']:>7.2f}x"
                      f"{ours['peak_mb']:>14.0f}{ref['peak_mb']:>14.0f}", flush=True)
        print(f"({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
