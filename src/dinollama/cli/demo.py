"""``dinollama demo``: the vision job on the committed Fashion-MNIST images, the code job on held-out CPython
snippets, and the server answering both kinds of request."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .options import add_dtype_arg, image_size, output_folder, positive_int


def _write_folder(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    from ..data.mnist import FASHION_CLASSES

    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / FASHION_CLASSES[y].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def cmd_demo(args) -> int:
    from ..data.mnist import load_fashion_mnist
    from ..dinov2.eval import knn_predict
    from .main import main as cli

    out = Path(args.out)
    xtr, ytr = load_fashion_mnist("train", "mini")
    xte, yte = load_fashion_mnist("test", "mini")
    xtr, ytr, xte, yte = xtr[: args.n_train], ytr[: args.n_train], xte[: args.n_test], yte[: args.n_test]
    for split, (x, y) in {"train": (xtr, ytr), "test": (xte, yte)}.items():
        if not (out / split).exists() or sum(1 for _ in (out / split).rglob("*.png")) != len(x):
            shutil.rmtree(out / split, ignore_errors=True)  # left by a run with other --n-train/--n-test
            _write_folder(x, y, out / split)
    model = args.model
    print(f"[1/6] embedding {len(xtr)} + {len(xte)} real Fashion-MNIST images (the test images were held out of its training) with {model}")
    common = ["--model", model, "--dtype", args.dtype, "--batch-size", "64", "--workers", "1", "--quiet"]
    for split in ("train", "test"):
        if cli(["embed", str(out / split), "-o", str(out / f"{split}.safetensors"), *common]) != 0:
            return 1
    report = out / "knn.json"
    if cli(["eval", "knn", "--train", str(out / "train.safetensors"), "--test", str(out / "test.safetensors"),
            "--ks", "20", "--report", str(report)]) != 0:
        return 1
    acc = json.loads(report.read_text())["top1"]["20-NN"]
    raw = knn_predict(torch.tensor(xtr.reshape(len(xtr), -1), dtype=torch.float32), torch.tensor(ytr),
                      torch.tensor(xte.reshape(len(xte), -1), dtype=torch.float32), ks=(20,))[20]
    raw_acc = (raw == torch.tensor(yte)).float().mean().item()
    print(f"[2/6] 20-NN top-1 on {len(xte)} test images: features {acc:.3f} | raw pixels {raw_acc:.3f}")
    picks = sorted((out / "test").rglob("*.png"))[:: max(1, len(xte) // 4)][:4]
    cli(["pca", *map(str, picks), "-o", str(out / "pca.png"), "--model", model, "--size", str(args.pca_size)])
    print(f"[3/6] PCA picture of patch features: {out / 'pca.png'}")
    if args.skip_code:
        return 0
    return code_demo(args.code_model) or serve_demo(args.code_model, model, [str(p) for p in picks[:3]])


def code_demo(model_path: str) -> int:
    """Completion and infilling of real snippets the default code model never saw in training."""
    from ..codellama import Generator, SamplingParams, load
    from ..codellama.checkpoint import default_model_dir

    model, tok = load(model_path)
    model = model.float().eval()
    snippets = json.loads((default_model_dir() / "heldout_snippets.json").read_text())
    gen = Generator(model, tok)
    first = snippets[0]
    prompt = first["prefix"][-300:]
    prompt = prompt[prompt.find("\n") + 1 :]
    completion = gen.text_completion([prompt], SamplingParams(max_gen_len=48, stop_strings=("\n\n\n",)))[0]
    print(f"[4/6] completion by the default code model (greedy) of held-out CPython code:\n{prompt}\033[1m{completion}\033[0m")
    middles = gen.text_infilling([s["prefix"] for s in snippets], [s["suffix"] for s in snippets], SamplingParams(max_gen_len=32))
    hits = 0
    print("[5/6] infilling held-out single lines (expected | generated):")
    for s, m in zip(snippets, middles):
        got = m.split("\n")[0]
        hits += got.strip() == s["middle"].strip()
        print(f"  {'=' if got.strip() == s['middle'].strip() else 'x'} {s['middle'].strip()!r:60} | {got.strip()!r}")
    print(f"      exact match {hits}/{len(snippets)}")
    return 0


def serve_demo(code_model: str, vision_model: str, images: list[str]) -> int:
    """``dinollama serve`` in this process on a free loopback port: a chat answer, an infilling, and
    image embeddings compared by cosine, through the HTTP API."""
    import base64
    import socket
    import threading
    import time
    import urllib.request

    import uvicorn

    from ..serve import ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServeConfig(model=code_model, vision_model=vision_model, port=port, parallel=2, ctx=512))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 120
        while app.state.server.load_error is None and not app.state.server.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        if not app.state.server.ready:
            print(f"dinollama demo: the server did not start: {app.state.server.load_error}")
            return 1
        chat = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Sort a list in Python."}],
                                             "max_tokens": 40, "temperature": 0})["choices"][0]["message"]["content"]
        fim = post("/infill", {"input_prefix": "def area(r):\n    return ", "input_suffix": "\n", "n_predict": 16,
                               "temperature": 0})["content"]
        urls = ["data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode() for p in images]
        vecs = torch.tensor([d["embedding"] for d in post("/v1/embeddings", {"input": urls, "modality": "image"})["data"]])
        sims = torch.nn.functional.normalize(vecs, dim=1) @ torch.nn.functional.normalize(vecs, dim=1).T
        print(f"[6/6] dinollama serve at {url} (OpenAI and llama.cpp APIs, one engine):")
        print(f"  POST /v1/chat/completions -> {' '.join(chat.split())[:100]!r}")
        print(f"  POST /infill (def area(r): return ...) -> {fim.splitlines()[0] if fim else fim!r}")
        names = [Path(p).parent.name for p in images]
        print(f"  POST /v1/embeddings, {len(images)} images ({', '.join(names)}): cosine {sims[0, 1]:.3f} (first two), "
              f"{sims[0, -1]:.3f} (first and last)")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the main jobs end to end on committed real data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out", type=output_folder, help="folder for the images, features and pictures")
    p.add_argument("--n-train", type=positive_int, default=2000)
    p.add_argument("--n-test", type=positive_int, default=1000)
    p.add_argument("--model", default="default", help="backbone: the shipped default, a hub name (official weights) or a path")
    p.add_argument("--pca-size", type=image_size, default=112, help="input side of the PCA picture")
    add_dtype_arg(p)
    p.add_argument("--code-model", default="default", help="code model folder for the completion/infilling job")
    p.add_argument("--skip-code", action="store_true", help="run only the vision job")
    p.set_defaults(func=cmd_demo)
