"""Parity with transformers' LlamaForCausalLM, both loaders, shard merging, KV-cache correctness."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from dinollama.codellama import (PRESETS, Generator, ModelArgs, SamplingParams, Tokenizer, build, chat_prompt_tokens, load, save_hf,
                                 save_native, split_shards)

DATA = Path(__file__).parent / "data"
SMALL = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=32016, multiple_of=64,
                  rope_theta=1e6, max_seq_len=512)


def randomized(args=SMALL):
    model = build(args)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.05) + ("norm" in name))
    return model.eval()


def official_folder(model, folder: Path, mp: int = 1) -> Path:
    folder.mkdir(parents=True)
    a = model.params
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "multiple_of": a.multiple_of, "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    sd = model.state_dict()
    sd["rope.freqs"] = torch.zeros(a.head_dim // 2)  # present in Llama 2 era files, must be dropped
    for i, shard in enumerate(split_shards(sd, mp)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    shutil.copy(DATA / "codellama_tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cl")
    model = randomized()
    tok = Tokenizer(DATA / "codellama_tokenizer.model")
    hf_dir = save_hf(model, tmp / "hf", tok)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    return model, tok, hf, tmp


def test_presets_have_the_released_shapes():
    expected = {"7b": (4096, 11008, 32, 32016), "13b": (5120, 13824, 40, 32016), "34b": (8192, 22016, 8, 32000),
                "70b": (8192, 28672, 8, 32016)}
    for size, (dim, ffn, kv, vocab) in expected.items():
        a = PRESETS[f"codellama-{size}"]
        assert (a.dim, a.ffn_hidden, a.kv_heads, a.vocab_size, a.rope_theta) == (dim, ffn, kv, vocab, 1e6)
        assert PRESETS[f"codellama-{size}-python"].vocab_size == 32000
    assert PRESETS["codellama-70b-instruct"].rope_theta == 1e4 and PRESETS["codellama-70b-python"].max_seq_len == 4096
    with torch.device("meta"):
        n = sum(p.numel() for p in build("codellama-7b").parameters())
    assert n == 6_738_546_688  # 7B with the 16 extra embeddings


@pytest.mark.parametrize("loader", ["official", "official-mp2", "official-mp4", "hf", "native"])
def test_logits_match_hf(loader, setup):
    model, tok, hf, tmp = setup
    folder = tmp / loader
    if not folder.exists():
        if loader.startswith("official"):
            official_folder(model, folder, mp=int(loader[-1]) if "mp" in loader else 1)
        elif loader == "native":
            save_native(model, folder, tok)
        else:
            folder = tmp / "hf"
    ours, ours_tok = load(folder)
    assert ours_tok is not None and ours_tok.eot_id == 32010
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    tokens = torch.randint(3, 32016, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        got = ours(tokens)
    assert got.dtype == torch.float32 and got.shape == (2, 300, 32016)
    assert (got - ref).abs().max() <= 1e-4


def test_chunked_prefill_and_decode_match_full_forward(setup):
    model = setup[0]
    tokens = torch.randint(3, 32016, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.forward_train(tokens).float()
        model.setup_cache(1, 64)
        parts = [model(tokens[:, :17], 0), model(tokens[:, 17:30], 17)] + [model(tokens[:, i : i + 1], i) for i in range(30, 40)]
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-4


def test_greedy_generation_matches_hf(setup):
    model, tok, hf, _ = setup
    prompts = [tok.encode("def fibonacci(n):", True, False), tok.encode("import os\nimport sys\n\nclass Config:", True, False)]
    gen = Generator(model, tok)
    ours, _ = gen.generate(prompts, SamplingParams(max_gen_len=64, temperature=0.0), stop_token=-100)
    for prompt, out in zip(prompts, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out == ref


def test_generation_options(setup):
    model, tok, _, _ = setup
    gen = Generator(model, tok)
    p = [tok.encode("x = 1", True, False)]
    a, la = gen.generate(p, SamplingParams(max_gen_len=8, temperature=0.8, top_p=0.9, top_k=50, seed=7, logprobs=True))
    b, _ = gen.generate(p, SamplingParams(max_gen_len=8, temperature=0.8, top_p=0.9, top_k=50, seed=7))
    assert a == b and len(la[0]) == len(a[0]) and all(v <= 0 for v in la[0])
    echo, _ = gen.generate(p, SamplingParams(max_gen_len=4, echo=True), stop_token=-100)
    assert echo[0][: len(p[0])] == p[0] and len(echo[0]) == len(p[0]) + 4
    with pytest.raises(ValueError, match="exceeds the context of 512"):
        gen.generate([list(range(3, 500))], SamplingParams(max_gen_len=100))
    streamed = "".join(gen.stream(p[0], SamplingParams(max_gen_len=6), stop_token=-100))
    full, _ = gen.generate(p, SamplingParams(max_gen_len=6), stop_token=-100)
    assert streamed == tok.decode(full[0])
    middles = gen.text_infilling(["def f(x):\n    "], ["\n    return y\n"], SamplingParams(max_gen_len=5))
    assert isinstance(middles[0], str)


def test_official_folder_mismatch_is_explained(setup, tmp_path):
    model = setup[0]
    folder = official_folder(model, tmp_path / "bad")
    params = json.loads((folder / "params.json").read_text())
    params["n_layers"] = 3
    (folder / "params.json").write_text(json.dumps(params))
    from dinollama.io import CheckpointError

    with pytest.raises(CheckpointError, match="missing: .*layers.2"):
        load(folder)


def test_cli_complete_infill_chat(setup, tmp_path, capsys, monkeypatch):
    from dinollama.cli.main import main

    model, tok, _, _ = setup
    folder = save_native(model, tmp_path / "m", tok)
    common = ["--model", str(folder), "--dtype", "fp32", "--max-gen-len", "5"]
    assert main(["complete", "def add(a, b):", *common]) == 0
    out = capsys.readouterr().out
    gen = Generator(model, tok)
    ids, _ = gen.generate([tok.encode("def add(a, b):", True, False)], SamplingParams(max_gen_len=5))
    assert out == "def add(a, b):" + tok.decode(ids[0]) + "\n"
    src = tmp_path / "f.py"
    src.write_text("def f(x):\n    <FILL_ME>\n    return y\n")
    assert main(["infill", str(src), *common, "--whole"]) == 0
    whole = capsys.readouterr().out
    assert whole.startswith("def f(x):\n    ") and whole.endswith("\n    return y\n")
    src.write_text("no marker")
    assert main(["infill", str(src), *common]) == 2
    assert "needs exactly one <FILL_ME>" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n[INST]\n\n"))
    assert main(["chat", *common]) == 0
    captured = capsys.readouterr()  # piped: no prompts, the answer to each line, errors on stderr
    reply = "".join(gen.stream(chat_prompt_tokens(tok, [{"role": "user", "content": "hello"}]), SamplingParams(max_gen_len=5)))
    assert captured.out == reply + "\n" and "special tags" in captured.err


def test_bf16_cast_keeps_fp32_rotary(setup):
    model = randomized()
    tokens = torch.randint(3, 32016, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.forward_train(tokens).float()
        model.to(torch.bfloat16)
        assert model.freqs_cis.dtype == torch.complex64
        got = model(tokens)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.15 * ref.abs().max()


def test_optimize_for_inference_keeps_logits():
    from dinollama.codellama import optimize_for_inference

    model = randomized()
    fast = optimize_for_inference(randomized())
    tokens = torch.randint(3, 32016, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(tokens)
        got = fast(tokens)
        step_ref, step_got = model(tokens[:, :1], 30), fast(tokens[:, :1], 30)
    assert (got - ref).abs().max() <= 1e-4 and (step_got - step_ref).abs().max() <= 1e-4
