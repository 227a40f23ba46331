"""Serving under load: ``dinollama serve`` against ``llama-server`` on the same GGUF file and threads.

    python bench/serve_load.py --llama-cpp SRC_DIR [--streams 1 4 16] [--requests 32] [--threads 2]
                               [--types f32 bf16 f16 q8_0 q4_0] [--tokens 64] [--prompt 96]

SRC_DIR is a built llama.cpp tree with ``build/bin/llama-server`` (``cmake --build build --target
llama-server``; bench/long_context.py --build-llama-cpp builds the tree from the llama-cpp-python sdist).
The weights: a random Llama of 134M's shape (dim 768, 12 layers; vocabulary: the shipped tokenizer's 8,000), written by
our ``save_gguf`` (q8_0/q4_0: quantized first, the output head too; ours serves them with ``--dtype auto``). Each server
gets 16 slots of 512 tokens; the client keeps 1, 4 or 16 streams busy with a fixed number of
``/completion`` requests (``stream: true``, distinct random prompts, greedy, ``n_predict`` tokens each)
and reports aggregate tok/s, p50/p99 time to first token and inter-token latency, and failures.
One server runs at a time; the client is the same for both.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from dinollama.codellama import ModelArgs, build, load, quantize, save_gguf
from dinollama.nn.kernels import cpu_kernels

CONFIG = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32016, multiple_of=256, rope_theta=1e6, max_seq_len=2048)
SLOTS, SLOT_CTX = 16, 512
EXTRA: list[str] = []  # more `dinollama serve` options (--serve-args)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def one_request(port: int, prompt: list[int], n: int) -> dict:
    """Stream one completion; the time of each event and the tokens it carried."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "stream": True, "cache_prompt": False})
    t0 = time.perf_counter()
    conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        return {"ok": False, "error": f"HTTP {r.status}"}
    events, seen = [], 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        ev = json.loads(line[6:])
        done = ev.get("tokens_predicted", seen)
        if done > seen and ev.get("content"):
            events.append((time.perf_counter() - t0, done - seen))
            seen = done
        if ev.get("stop"):
            seen = max(seen, ev.get("tokens_predicted", seen))
            break
    conn.close()
    return {"ok": seen > 0, "events": events, "tokens": seen}


def load_test(port: int, streams: int, n_requests: int, n_tokens: int, prompt_len: int, vocab: int) -> dict:
    rng = random.Random(streams)
    jobs: queue.Queue = queue.Queue()
    for _ in range(n_requests):
        jobs.put([1] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)])
    results: list[dict] = []

    def worker() -> None:
        while True:
            try:
                prompt = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results.append(one_request(port, prompt, n_tokens))
            except OSError as e:
                results.append({"ok": False, "error": str(e)})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["events"][0][0] for r in ok if r["events"]]
    itl = [(b[0] - a[0]) / b[1] for r in ok for a, b in zip(r["events"], r["events"][1:])]
    pct = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))
    return {"tok_s": sum(r["tokens"] for r in ok) / wall, "failed": len(results) - len(ok) + n_requests - len(results),
            "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "itl50": pct(itl, 50), "itl99": pct(itl, 99)}


SCHEME = {"q8_0": "int8", "q4_0": "int4"}


def start_ours(gguf: Path, qtype: str, threads: int, port: int) -> subprocess.Popen:
    dtype = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(qtype, "auto")  # q8_0/q4_0: bf16 where native
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "dinollama.cli.main", "serve", "--model", str(gguf), "--port",
                             str(port), "--parallel", str(SLOTS), "--ctx", str(SLOT_CTX), "--dtype", dtype,
                             "--max-queue", "1000", *EXTRA], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama(exe: Path, gguf: Path, threads: int, port: int) -> subprocess.Popen:
    return subprocess.Popen([str(exe), "-m", str(gguf), "--port", str(port), "-np", str(SLOTS), "-c",
                             str(SLOTS * SLOT_CTX), "-t", str(threads), "-tb", str(threads), "--no-ui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree with build/bin/llama-server")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per run (at least the stream count)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16", "f16", *SCHEME])
    p.add_argument("--tokens", type=int, default=64, help="n_predict of each request")
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens of each request")
    p.add_argument("--serve-args", default="", help="extra options for dinollama serve, e.g. '--prefill-chunk 128'")
    p.add_argument("--only-ours", action="store_true", help="skip llama-server (for tuning our options)")
    args = p.parse_args()
    EXTRA.extend(args.serve_args.split())
    exe = args.llama_cpp / "build" / "bin" / "llama-server"
    print(f"{cpu_name()}; {cpu_kernels().describe()}; torch {torch.__version__}; {args.threads} threads per server")
    print(f"random Llama dim 768 x 12 layers, vocab 8000, {SLOTS} slots x {SLOT_CTX} tokens, /completion streamed, {args.prompt}-token prompts, "
          f"{args.tokens} tokens each")
    print("type  streams  server        tok/s  ttft p50  ttft p99  itl p50  itl p99  failed   ratio tok/s")
    with tempfile.TemporaryDirectory() as tmp:
        _, tok = load("default")
        torch.manual_seed(0)
        model = build(replace(CONFIG, vocab_size=tok.n_words))  # the shipped tokenizer's 8,000 pieces
        for qtype in args.types:
            m = model
            if qtype in SCHEME:  # int8/int4 codes (head too) written as their own Q8_0/Q4_0 blocks
                m = build(replace(CONFIG, vocab_size=tok.n_words)).eval()
                m.load_state_dict(model.state_dict())
                quantize(m, SCHEME[qtype], group_size=32, head=True)
            gguf = save_gguf(m, tok, Path(tmp) / f"m-{qtype}.gguf", qtype)
            for streams in args.streams:
                rows = {}
                for name in (("dinollama",) if args.only_ours else ("llama-server", "dinollama")):
                    port = free_port()
                    proc = (start_llama(exe, gguf, args.threads, port) if name == "llama-server"
                            else start_ours(gguf, qtype, args.threads, port))
                    try:
                        wait_ready(port, proc)
                        load_test(port, 1, 1, 8, 16, tok.n_words)  # warm-up
                        rows[name] = load_test(port, streams, max(args.requests, streams), args.tokens, args.prompt,
                                               tok.n_words)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=60)
                for name, r in rows.items():
                    ratio = f"{r['tok_s'] / rows['llama-server']['tok_s']:.2f}x" if "llama-server" in rows and name == "dinollama" else ""
                    print(f"{qtype:<5} {streams:>7}  {name:<12} {r['tok_s']:>7.1f} {r['ttft50'] * 1000:>7.0f}ms "
                          f"{r['ttft99'] * 1000:>7.0f}ms {r['itl50'] * 1000:>6.1f}ms {r['itl99'] * 1000:>6.1f}ms "
                          f"{r['failed']:>7}   {ratio}", flush=True)


if __name__ == "__main__":
    main()
