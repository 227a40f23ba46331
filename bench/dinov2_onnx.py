"""DINOv2 images/s: our CPU fast path vs ONNX Runtime on our exact ONNX export of the same model.

    python bench/dinov2_onnx.py [--archs vits14 vitb14] [--sizes 224 518] [--batches 1 8] [--rounds 5]

fp32 on both sides (``optimize_for_inference(model)`` vs ``InferenceSession`` of ``export_onnx``, all
graph optimizations, as many intra-op threads as torch uses); then our bf16 (where the CPU has native
bf16) and int8 (dynamic) paths, and ONNX Runtime's own dynamic int8 quantization of the same file
(``quantize_dynamic``, QInt8 weights). Where ``openvino`` imports (``pip install openvino``), OpenVINO
runs the same file too, in f32 and, where the CPU has native bf16, in bf16 (its default there).
Contenders run one after the other (warm-up, then the rounds), medians of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dinollama.dinov2 import build, export_onnx, optimize_for_inference
from dinollama.nn.kernels import cpu_kernels


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def openvino_contenders(path: Path, threads: int) -> dict:
    try:
        import openvino as ov
    except ImportError:
        return {}
    core, out = ov.Core(), {}
    for name, precision in [("OV fp32", "f32")] + ([("OV bf16", "bf16")] if cpu_kernels().native_bf16 else []):
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": precision})
        request = compiled.create_infer_request()
        out[name] = lambda x, r=request: r.infer({0: x.numpy()})
    return out


def contenders(arch: str, size: int, tmp: Path, threads: int) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    model = build(f"dinov2_{arch}").eval()
    path = export_onnx(model, tmp / f"{arch}-{size}.onnx", (size, size))
    qpath = tmp / f"{arch}-{size}-int8.onnx"
    quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
    fp32, ort_fp32, ort_int8 = optimize_for_inference(model), ort_session(path, threads), ort_session(qpath, threads)
    out = {"ours fp32": lambda x: fp32(x), "ORT fp32": lambda x: ort_fp32.run(None, {"image": x.numpy()})}
    if cpu_kernels().native_bf16:
        bf16 = optimize_for_inference(model, dtype=torch.bfloat16)
        out["ours bf16"] = lambda x: bf16(x.bfloat16())
    out |= openvino_contenders(path, threads)
    int8 = optimize_for_inference(model, dtype=torch.int8)
    out["ours int8"] = lambda x: int8(x)
    out["ORT int8"] = lambda x: ort_int8.run(None, {"image": x.numpy()})
    return out


def measure(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Images/s of each contender, measured one after the other: interleaved calls let one runtime's
    idle threads (ONNX Runtime's, OpenVINO's, OpenMP's all spin for a while) slow the next one down."""
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            fn(x)  # warm-up
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t)
            out[name] = len(x) / statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vits14", "vitb14"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 518])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    import onnxruntime

    threads = torch.get_num_threads()
    try:
        import openvino
        peers = f", openvino {openvino.__version__.split('-')[0]}"
    except ImportError:
        peers = ""
    print(f"{cpu_name()}; {cpu_kernels().describe()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}{peers}; "
          f"{threads} threads; images/s (median of {args.rounds})")
    header = None
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            for size in args.sizes:
                fns = contenders(arch, size, Path(tmp), threads)
                for batch in args.batches:
                    r = measure(fns, torch.randn(batch, 3, size, size), args.rounds)
                    if header is None:
                        header = f"{'model':<8}{'px':>5}{'batch':>6}" + "".join(f"{k:>11}" for k in r)
                        ov = "  vs OV fp32  vs OV bf16" if "OV fp32" in r else ""
                        print(header + f"{'fp32 ratio':>12}{'int8 ratio':>12}" + ov)
                    ratios = f"{r['ours fp32'] / r['ORT fp32']:>11.2f}x{r['ours int8'] / r['ORT int8']:>11.2f}x"
                    if "OV fp32" in r:
                        ratios += f"{r['ours fp32'] / r['OV fp32']:>11.2f}x"
                        ratios += f"{r['ours bf16'] / r['OV bf16']:>11.2f}x" if "OV bf16" in r else ""
                    print(f"{arch:<8}{size:>5}{batch:>6}" + "".join(f"{v:>11.2f}" for v in r.values()) + ratios, flush=True)


if __name__ == "__main__":
    main()
