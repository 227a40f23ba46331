"""Code Llama on GGUF files: a cross-check with llama.cpp, then decode/prefill speed side by side.

    python bench/codellama_gguf.py --llama-cpp SRC_DIR [--threads 1 2] [--types f32 bf16 f16 q8_0 q4_0]
                                   [--completion PATH_TO_llama-completion] [--batches 1 4 8]

SRC_DIR is a built llama.cpp tree (bench/long_context.py --build-llama-cpp makes one from the
llama-cpp-python sdist). Cross-check: the shipped default model exported by ``save_gguf`` (int8/int4
written as their own codes) runs in llama.cpp's ``llama-completion`` and in ours from the same file, greedy;
and a file from llama.cpp's own ``convert_hf_to_gguf.py`` loads here with the source model's logits.
Speed: a random 134M Llama (issue 16's table), ``llama-bench -p 64,512 -n 128`` against our Generator on
the same GGUF file, same threads. llama.cpp runs with ``--repack 0`` when its repacked (AMX/AVX-512)
kernels crash on this CPU, which the script detects and says. Batches: aggregate decode tok/s of
``--batches`` sequences (64-token prompts, 128 new tokens each) at the largest thread count, against
``llama-batched-bench -npp 64 -ntg 128`` (built with ``cmake --build build --target llama-batched-bench``).
``--alternate N``: decode (tg128) in N rounds that alternate a ``llama-bench -p 0 -n 128`` run and one of
ours, in the same minute, with the median of the per-round ratios: on a VM whose memory bandwidth moves by
20-30% within an hour (neighbours), one run of each, minutes apart, says little.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dinollama.codellama import (Generator, ModelArgs, SamplingParams, Tokenizer, build, load, quantize, save_gguf,
                                 save_hf)
from dinollama.codellama.checkpoint import default_model_dir
from dinollama.nn.kernels import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32016, multiple_of=256, rope_theta=1e6, max_seq_len=2048)
SCHEME = {"q8_0": "int8", "q4_0": "int4"}
OURS = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from dinollama.codellama import Generator, SamplingParams, load, optimize_for_inference
from dinollama.nn.kernels import auto_dtype
# quantized files compute in the auto dtype (bf16 where the CPU has it natively, else fp32)
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}.get(sys.argv[2]) or auto_dtype()
model, _ = load(sys.argv[1], dtype=dtype)
optimize_for_inference(model)
gen = Generator(model, None)
prompt = torch.randint(3, 32000, (512,), generator=torch.Generator().manual_seed(0)).tolist()
p = SamplingParams(max_gen_len=128)
with torch.inference_mode():
    gen.generate([prompt[:8]], SamplingParams(max_gen_len=8), stop_token=-100)
    speeds = {}
    for n in (512, 64):  # the median of 3 prefills each
        runs = []
        for _ in range(3):
            model.setup_cache(1, 640)
            t = time.perf_counter(); model(torch.tensor([prompt[:n]]), 0, last_only=True)
            runs.append(n / (time.perf_counter() - t))
        speeds[f"pp{n}"] = sorted(runs)[1]
    runs = []
    for _ in range(3):  # the median of 3 (llama-bench: the mean of its -r 2)
        t = time.perf_counter(); gen.generate([prompt[:1]], p, stop_token=-100); runs.append(128 / (time.perf_counter() - t))
    speeds["tg128"] = sorted(runs)[1]
print(json.dumps(speeds))
"""
OURS_BATCH = """
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from dinollama.codellama import Generator, SamplingParams, load, optimize_for_inference
from dinollama.nn.kernels import auto_dtype
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}.get(sys.argv[2]) or auto_dtype()
model, _ = load(sys.argv[1], dtype=dtype)
optimize_for_inference(model)
gen = Generator(model, None)
out = {}
with torch.inference_mode():
    for b in json.loads(sys.argv[4]):
        prompts = torch.randint(3, 32000, (b, 64), generator=torch.Generator().manual_seed(b)).tolist()
        def timed(n):  # the median of 3 generate calls of n tokens each
            runs = []
            for _ in range(3):
                t = time.perf_counter(); gen.generate(prompts, SamplingParams(max_gen_len=n), stop_token=-100)
                runs.append(time.perf_counter() - t)
            return sorted(runs)[1]
        prefill = timed(1)  # the prompts and the first token, sampled from the prefill's logits
        out[b] = b * 128 / (timed(129) - prefill)
print(json.dumps(out))
"""

ALTERNATE = """
import json, statistics, subprocess, sys, time, torch
path, qtype, threads, rounds, exe = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
from dinollama.codellama import Generator, SamplingParams, load, optimize_for_inference
from dinollama.nn.kernels import auto_dtype
dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}.get(qtype) or auto_dtype()
model, _ = load(path, dtype=dtype)
optimize_for_inference(model)
gen = Generator(model, None)
theirs, ours = [], []
with torch.inference_mode():
    gen.generate([[5]], SamplingParams(max_gen_len=8), stop_token=-100)
    for _ in range(rounds):
        r = subprocess.run([exe, "-m", path, "-p", "0", "-n", "128", "-t", str(threads), "-r", "2", "-o", "json"]
                           + sys.argv[6:], capture_output=True, text=True, check=True)
        theirs.append(json.loads(r.stdout)[0]["avg_ts"])
        t = time.perf_counter(); gen.generate([[5]], SamplingParams(max_gen_len=128), stop_token=-100)
        ours.append(128 / (time.perf_counter() - t))
ratios = [o / t for o, t in zip(ours, theirs)]
print(json.dumps({"theirs": theirs, "ours": ours, "ratio": statistics.median(ratios)}))
"""


def alternate(exe: Path, gguf: Path, qtype: str, threads: int, rounds: int, norepack: bool) -> dict:
    """tg128 of llama-bench and ours in alternating rounds (our process runs llama-bench between its own)."""
    r = subprocess.run([sys.executable, "-c", ALTERNATE, str(gguf), qtype, str(threads), str(rounds), str(exe)]
                       + (["--repack", "0"] if norepack else []), capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def llama_bench(exe: Path, gguf: Path, threads: int) -> tuple[dict, bool]:
    """pp64/pp512/tg128 tok/s; retried with ``--repack 0`` if the default run crashes."""
    for repack in ("1", "0"):
        r = subprocess.run([str(exe), "-m", str(gguf), "-p", "64,512", "-n", "128", "-t", str(threads), "-r", "2",
                            "--repack", repack, "-o", "json"], capture_output=True, text=True)
        if r.returncode == 0:
            rows = json.loads(r.stdout)
            speeds = {(f"pp{row['n_prompt']}" if row["n_prompt"] else "tg128"): row["avg_ts"] for row in rows}
            return speeds, repack == "0"
    raise RuntimeError(f"llama-bench failed on {gguf}: {r.stderr[-1500:]}")


def ours(gguf: Path, qtype: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", OURS, str(gguf), qtype, str(threads)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def batched(exe: Path, gguf: Path, threads: int, batches: list[int], norepack: bool) -> tuple[dict, dict]:
    """Aggregate decode tok/s per batch size: llama-batched-bench's ``speed_tg``, and ours."""
    r = subprocess.run([str(exe), "-m", str(gguf), "-c", "2048", "-b", "2048", "-ub", "512", "-npp", "64", "-ntg", "128",
                        "-npl", ",".join(map(str, batches)), "-t", str(threads), "--output-format", "jsonl"]
                       + (["-nr"] if norepack else []), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama-batched-bench failed on {gguf}: {r.stderr[-1500:]}")
    theirs = {row["pl"]: row["speed_tg"] for row in map(json.loads, r.stdout.strip().splitlines()) if "speed_tg" in row}
    got = subprocess.run([sys.executable, "-c", OURS_BATCH, str(gguf), gguf.stem.split("-")[-1], str(threads),
                          json.dumps(batches)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if got.returncode:
        raise RuntimeError(got.stderr[-2000:])
    return theirs, {int(k): v for k, v in json.loads(got.stdout.strip().splitlines()[-1]).items()}


def completion_text(exe: Path, gguf: Path, prompt: str, n: int) -> str:
    """llama.cpp's greedy continuation (``llama-completion --temp 0``, extra buffer types off: ``-nr``)."""
    r = subprocess.run([str(exe), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "-nr",
                        "--no-display-prompt", "-no-cnv"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode:  # older builds have no -no-cnv
        r = subprocess.run([str(exe), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "-nr",
                            "--no-display-prompt"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return (prompt + r.stdout).strip() if r.returncode == 0 else f"<llama-completion exit {r.returncode}>"


def crosscheck(src: Path, completion: Path, tmp: Path) -> None:
    model, tok = load("default", dtype=torch.float32)
    prompt, n = "def add(a, b):\n    return", 24
    for qtype in ("f32", "f16", "q8_0", "q4_0"):
        m, _ = load("default", dtype=torch.float32)
        if qtype in SCHEME:
            quantize(m, SCHEME[qtype], group_size=32, head=True)
        path = save_gguf(m, tok, tmp / f"default-{qtype}.gguf", qtype)
        again, tok2 = load(path, dtype=torch.float32)
        ids = tok2.encode(prompt, True, False)
        out, _ = Generator(again, tok2).generate([ids], SamplingParams(max_gen_len=n), stop_token=tok2.eos_id)
        mine = tok2.decode(ids + out[0]).strip()
        theirs = completion_text(completion, path, prompt, n)
        print(f"save_gguf {qtype:<5} greedy {n} tokens: llama.cpp {'==' if theirs == mine else '!='} ours"
              + ("" if theirs == mine else f"\n  ours:      {mine!r}\n  llama.cpp: {theirs!r}"), flush=True)
    hf = save_hf(model, tmp / "hf", tok)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    theirs = tmp / "converted.gguf"
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(theirs),
                    "--outtype", "f32"], check=True, capture_output=True, env=env)
    again, _ = load(theirs)
    ids = torch.tensor([tok.encode(prompt, True, False)])
    with torch.inference_mode():
        diff = (again(ids, 0) - model(ids, 0)).abs().max().item()
    print(f"llama.cpp's convert_hf_to_gguf (f32) loaded here: max |logit diff| vs the source model {diff:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin")
    p.add_argument("--completion", type=Path, help="llama-completion (default: build/bin/llama-completion)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--types", nargs="+", default=["f32", "bf16", "f16", "q8_0", "q4_0"])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8], help="aggregate decode tok/s at these batch sizes")
    p.add_argument("--alternate", type=int, default=0, metavar="N",
                   help="also tg128 in N alternating rounds (llama-bench, ours, ...) with the median ratio")
    args = p.parse_args()
    exe = args.llama_cpp / "build" / "bin" / "llama-bench"
    print(f"{cpu_name()}; {cpu_kernels().describe()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crosscheck(args.llama_cpp, args.completion or exe.with_name("llama-completion"), tmp)
        torch.manual_seed(0)
        model = build(CONFIG).eval()
        tok = Tokenizer(ROOT / "tests" / "data" / "codellama_tokenizer.model")
        print(f"\nrandom {sum(t.numel() for t in model.parameters()) / 1e6:.0f}M Llama, batch 1; tok/s "
              "(pp64/pp512: prefill of 64/512 tokens, tg128: 128 greedy tokens)")
        print(f"{'type':<6}{'threads':>8}{'llama.cpp pp64':>15}{'ours':>8}{'ratio':>7}{'llama.cpp pp512':>16}"
              f"{'ours':>8}{'ratio':>7}{'llama.cpp tg':>14}{'ours tg':>9}{'ratio':>7}  note")
        files = {}
        for qtype in args.types:
            m = build(CONFIG).eval()
            m.load_state_dict(model.state_dict())
            if qtype in SCHEME:
                quantize(m, SCHEME[qtype], group_size=32, head=True)
            path = save_gguf(m, tok, tmp / f"m-{qtype}.gguf", qtype)
            os.sync()  # the file's writeback otherwise runs during the first measurement (f32 pp512 at 2 threads: 0.65x)
            for t in args.threads:
                ref, norepack = llama_bench(exe, path, t)
                got = ours(path, qtype, t)
                note = "llama.cpp --repack 0 (its repacked kernels crash here)" if norepack else ""
                print(f"{qtype:<6}{t:>8}{ref['pp64']:>15.1f}{got['pp64']:>8.1f}{got['pp64'] / ref['pp64']:>6.2f}x"
                      f"{ref['pp512']:>16.1f}{got['pp512']:>8.1f}{got['pp512'] / ref['pp512']:>6.2f}x"
                      f"{ref['tg128']:>14.1f}{got['tg128']:>9.1f}{got['tg128'] / ref['tg128']:>6.2f}x  {note}", flush=True)
            if args.batches or args.alternate:
                files[qtype] = (path, norepack)
        if args.alternate:
            print(f"\ntg128 in {args.alternate} alternating rounds (llama-bench, then ours, each round); tok/s per round")
            print(f"{'type':<6}{'threads':>8}  {'llama.cpp':<34}{'ours':<34}{'median ratio':>12}")
            for qtype, (path, norepack) in files.items():
                for t in args.threads:
                    got = alternate(exe, path, qtype, t, args.alternate, norepack)
                    ref_text, our_text = (" ".join(f"{x:.1f}" for x in got[k]) for k in ("theirs", "ours"))
                    print(f"{qtype:<6}{t:>8}  {ref_text:<34}{our_text:<34}{got['ratio']:>11.2f}x",
                          flush=True)
        if args.batches:
            threads = max(args.threads)
            print(f"\naggregate decode tok/s, {threads} threads, 64-token prompts + 128 new tokens each "
                  "(llama-batched-bench speed_tg; ours: 128 generate steps, the prefill's time subtracted)")
            print(f"{'type':<6}{'batch':>6}{'llama.cpp':>11}{'ours':>9}{'ratio':>7}")
            for qtype, (path, norepack) in files.items():
                theirs, mine = batched(exe.with_name("llama-batched-bench"), path, threads, args.batches, norepack)
                for b in args.batches:
                    print(f"{qtype:<6}{b:>6}{theirs[b]:>11.1f}{mine[b]:>9.1f}{mine[b] / theirs[b]:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
