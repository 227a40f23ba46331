"""Long context: chunked prefill on the fused kernels, bounded memory, the int8/fp8 KV cache, --ctx,
the memory estimate and the key-retrieval probe."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dinollama.codellama import Generator, ModelArgs, SamplingParams, Tokenizer, Transformer, build, save_native
from dinollama.codellama.checkpoint import default_model_dir
from dinollama.codellama.kvcache import MemoryPlan, check_fits, kv_cache_bytes, plan_memory
from dinollama.codellama.model import max_context


def tiny(max_seq_len=10_000, kv_heads=2, dim=64, heads=4, layers=2, vocab=300, seed=0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab, multiple_of=32,
                     max_seq_len=max_seq_len, rope_theta=1e6)
    return Transformer(args).eval()


def prefill(model, tokens, chunk, first=None, kv_dtype=None):
    """Logits of every position, fed as one first piece of ``first`` tokens and then chunks."""
    model.setup_cache(tokens.shape[0], tokens.shape[1], kv_dtype)
    bounds = [0] + ([first] if first else []) + list(range(first or chunk, tokens.shape[1], chunk)) + [tokens.shape[1]]
    bounds = sorted(set(bounds))
    with torch.inference_mode():
        return torch.cat([model(tokens[:, a:b], a) for a, b in zip(bounds, bounds[1:])], 1)


@pytest.fixture(scope="module")
def long_case():
    model = tiny()
    tokens = torch.randint(3, 300, (2, 8500), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.forward_train(tokens).float()
    return model, tokens, ref


@pytest.mark.parametrize("chunk,first", [(2048, None), (1000, 3333), (777, 1), (8192, 100)])
def test_chunked_prefill_equals_one_pass(long_case, chunk, first):
    model, tokens, ref = long_case
    assert (prefill(model, tokens, chunk, first) - ref).abs().max() < 1e-4


def test_chunked_prefill_runs_the_fused_kernel_without_masks(long_case):
    model, tokens, _ = long_case
    model.setup_cache(1, 6000)
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        model(tokens[:1, :3000], 0)
        model(tokens[:1, 3000:6000], 3000)
    names = [e.name for e in prof.events()]
    assert names.count("aten::_scaled_dot_product_flash_attention_for_cpu") >= 2 * len(model.layers)
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert not {"aten::tril", "aten::triu", "aten::masked_fill"} & set(names)
    biggest = max((int(torch.tensor(s).prod()) for e in prof.events() for s in e.input_shapes if s), default=0)
    assert biggest < 3000 * 6000  # nothing the size of a chunk x context score or mask matrix


def test_a_100k_prompt_prefills_in_bounded_memory():
    """A fresh process: its growth is about the KV cache, not chunk x context."""
    code = textwrap.dedent("""
        import json, sys, time, torch
        from dinollama.codellama import ModelArgs, Transformer
        def rss():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
        torch.manual_seed(0)
        args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=32, max_seq_len=100_000,
                         rope_theta=1e6)
        m = Transformer(args).eval()
        tok = torch.randint(3, 300, (1, 100_000))
        with torch.inference_mode():
            m(tok[:, :16], 0, last_only=True)  # warm up the kernels before measuring
            before = rss()
            t0 = time.time()
            m.setup_cache(1, 100_000)
            for lo in range(0, 100_000, 2048):
                out = m(tok[:, lo:lo + 2048], lo, last_only=True)
            print(json.dumps({"growth": rss() - before, "kv": sum(l.attention.cache.nbytes for l in m.layers),
                              "seconds": time.time() - t0, "finite": bool(out.isfinite().all()), "shape": list(out.shape)}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["finite"] and res["shape"] == [1, 1, 300]
    assert res["kv"] == 2 * 1 * 2 * 16 * 100_000 * 4
    # A dense chunk x context mask alone would be 205 MB per layer call, its fp32 scores 1.6 GB.
    assert res["growth"] < res["kv"] + 64 * 2**20, res


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_kv_cache_is_close_and_half_the_bytes(dtype):
    model = tiny(max_seq_len=3000, kv_heads=2, dim=256, heads=4)  # head_dim 64
    tokens = torch.randint(3, 300, (1, 3000), generator=torch.Generator().manual_seed(2))
    ref = prefill(model, tokens, 500, kv_dtype=torch.float32)
    got = prefill(model, tokens, 500, kv_dtype=dtype)
    bound = 0.01 if dtype == torch.int8 else 0.05
    assert (got - ref).abs().max() <= bound * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97
    quant = sum(layer.attention.cache.nbytes for layer in model.layers)
    model.setup_cache(1, 3000, torch.bfloat16)
    bf16 = sum(layer.attention.cache.nbytes for layer in model.layers)
    assert quant <= 0.52 * bf16  # int8 values + one float16 scale per (token, head)
    assert quant == kv_cache_bytes(2, 2, 64, 1, 3000, dtype)


def test_generation_with_an_int8_cache_matches_mostly():
    model = tiny(max_seq_len=512, dim=128)
    tok = Tokenizer(default_model_dir() / "tokenizer.model")
    model = Transformer(ModelArgs(**{**model.params.to_dict(), "vocab_size": tok.n_words})).eval()
    prompt = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n", True, False)
    full, _ = Generator(model, tok).generate([prompt], SamplingParams(max_gen_len=20), stop_token=-100)
    small, _ = Generator(model, tok, prefill_chunk=7, kv_dtype=torch.int8).generate(
        [prompt], SamplingParams(max_gen_len=20), stop_token=-100)
    assert sum(a == b for a, b in zip(full[0], small[0])) >= 15


def test_memory_plan_matches_real_allocations_and_refuses_with_numbers(monkeypatch):
    model = tiny(max_seq_len=4096)
    plan = plan_memory(model.params, 2, 4096, torch.float32, torch.int8)
    model.setup_cache(2, 4096, torch.int8)
    assert plan.kv_cache == sum(layer.attention.cache.nbytes for layer in model.layers)
    n_params = sum(p.numel() for p in model.parameters())
    assert plan.weights == n_params * 4
    monkeypatch.setattr("dinollama.codellama.kvcache.available_memory", lambda device: 2**20)
    with pytest.raises(MemoryError) as e:
        model.setup_cache(1, 4096)
    msg = str(e.value)
    assert "4,096-token context needs" in msg and "KV cache" in msg and "smaller --ctx" in msg and "int8" in msg
    with pytest.raises(MemoryError):
        check_fits(MemoryPlan(10, 2**30, 0), torch.device("cpu"), 100, torch.bfloat16)
    # 7B at 100K: 52 GB in bf16 and 26 GB in int8 (the figures)
    args = ModelArgs(max_seq_len=100_000)
    assert round(plan_memory(args, 1, 100_000, torch.bfloat16, torch.bfloat16).kv_cache / 1e9) == 52
    assert round(plan_memory(args, 1, 100_000, torch.bfloat16, torch.int8).kv_cache / 1e9) == 27


def test_contexts_up_to_100k_and_a_clear_refusal_beyond():
    with torch.device("meta"):
        big = build("codellama-7b", max_seq_len=100_000)
    assert big.params.max_seq_len == 100_000 and max_context(big.params) == 100_000
    model = tiny(max_seq_len=16384)
    model.set_context(100_000)
    with pytest.raises(ValueError, match="addresses at most 100,000 tokens"):
        model.set_context(100_001)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny(max_seq_len=100).setup_cache(1, 101)
    old = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=50, rope_theta=1e4, max_seq_len=4096))
    with pytest.raises(ValueError, match="rope_theta 10000, trained context 4,096"):
        old.set_context(8192)


@pytest.fixture(scope="module")
def long_model_folder(tmp_path_factory):
    tok = Tokenizer(default_model_dir() / "tokenizer.model")
    model = tiny(max_seq_len=16384, vocab=tok.n_words)
    return save_native(model, tmp_path_factory.mktemp("long") / "m", tok)


def test_cli_ctx_and_kv_dtype(long_model_folder, capsys):
    from dinollama.cli.main import main

    prompt = "x = 1\n" * 4000  # 20,001 tokens with bos: beyond the model's 16,384
    common = ["--model", str(long_model_folder), "--dtype", "fp32", "--max-gen-len", "4"]
    assert main(["complete", prompt, *common]) == 2
    assert "exceeds the context of 16384 tokens" in capsys.readouterr().err
    assert main(["complete", prompt, *common, "--ctx", "25000", "--kv-dtype", "int8"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    assert main(["complete", "x", *common, "--ctx", "200000"]) == 2
    assert "addresses at most 100,000 tokens" in capsys.readouterr().err
    assert main(["complete", "x", "--ctx", "100000"]) == 2  # the shipped model: rope_theta 1e4, 512 tokens
    assert "trained context 512" in capsys.readouterr().err


def test_key_retrieval_probe_and_cli(long_model_folder, tmp_path, capsys):
    from dinollama.cli.main import main
    from dinollama.codellama.eval.key_retrieval import build_probe, stdlib_code

    tok = Tokenizer(default_model_dir() / "tokenizer.model")
    code = list(stdlib_code(limit_chars=200_000))
    for depth in (0.0, 0.5, 1.0):
        probe = build_probe(tok, code, 2000, depth, 4242)
        text = tok.decode(probe.tokens)
        at = text.index("def get_secret_value():\n    return 4242")
        assert abs(at / len(text) - depth) < 0.1 and text.endswith("assert get_secret_value() == ")
        assert 1800 <= len(probe.tokens) <= 2100
    report = tmp_path / "kr.json"
    assert main(["eval", "key-retrieval", "--model", str(long_model_folder), "--lengths", "1000", "3000",
                 "--depths", "0", "1", "--dtype", "fp32", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["tokens", "depth", "0", "depth", "1"] and "3000" in out
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 4 and all(r["correct"] == (r["answer"] == str(r["key"])) for r in rows)


def test_the_prepared_gpu_script_runs_on_cpu():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("vision vit") for line in lines) == 8, r.stdout
    code = next(line for line in lines if line.startswith("code "))
    assert float(code.split("one pass at 2048 tokens (fp32): ")[1].split(";")[0]) < 1e-4, code
