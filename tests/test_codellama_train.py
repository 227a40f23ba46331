"""Code Llama training: data preparation on real stdlib code, loop, resume, LCFT, SFT masks, LoRA, export."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dinollama.codellama import ModelArgs, Tokenizer, build, chat_prompt_tokens, load, save_hf
from dinollama.codellama.train import (
    IGNORE, CodeTrainConfig, CodeTrainer, apply_lora, dialog_tokens, merge_lora, prepare_corpus, prepare_dialogs,
    train_tokenizer, with_context,
)

DATA = Path(__file__).parent / "data"
TOKENIZER = DATA / "codellama_tokenizer.model"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["bisect.py", "colorsys.py", "keyword.py", "heapq.py", "fnmatch.py", "glob.py", "shlex.py", "textwrap.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name in FILES:
        shutil.copy(STDLIB / name, root / name)
    shutil.copy(STDLIB / "bisect.py", root / "bisect_copy.py")  # an exact duplicate, removed
    out = tmp_path_factory.mktemp("prepared")
    stats = prepare_corpus(root, TOKENIZER, out, seq_len=256, heldout=0.25, max_doc_chars=500, progress=False)
    return root, out, stats


def tiny_model(vocab: int = 32016) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32,
                           max_seq_len=128, rope_theta=1e4))


def test_prepare_corpus(corpus):
    _, out, stats = corpus
    assert stats["files"] == len(FILES)  # the duplicate is gone
    assert stats["train_windows"] > 10 and stats["val_windows"] > 0
    train, val = np.load(out / "train.npy"), np.load(out / "val.npy")
    assert train.shape[1] == val.shape[1] == 257
    fim = stats["layouts"].get("psm", 0) + stats["layouts"].get("spm", 0)
    assert fim / sum(stats["layouts"].values()) > 0.5
    tok = Tokenizer(TOKENIZER)
    assert tok.prefix_id not in set(val.flatten().tolist())  # held-out windows are plain code
    held = set(stats["heldout_files"])
    assert held and held < set(FILES)  # whole files are held out, never pieces of a training file


def test_training_loss_drops_and_resume_is_exact(corpus, tmp_path):
    _, data, _ = corpus
    cfg = CodeTrainConfig(seq_len=64, batch_size=4, lr=3e-3, warmup_iters=2, max_iters=12, eval_every=6, eval_batches=2,
                          log_every=1, save_every=3, precision="fp32")
    full = CodeTrainer(tiny_model(), cfg, data, tmp_path / "full", TOKENIZER, progress=False)
    folder = full.run()
    log = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 0.3
    assert any(r.get("val_loss") for r in log)
    part = CodeTrainer(tiny_model(), cfg, data, tmp_path / "part", TOKENIZER, progress=False)
    part.run(stop_at=7)  # checkpoint at 6 and at the stop: a resumed run continues from 7
    resumed = CodeTrainer(tiny_model(), cfg, data, tmp_path / "part", TOKENIZER, progress=False)
    resumed.run()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, tok = load(folder)
    assert tok is not None and model.params.dim == 64
    x = torch.tensor([[1, 500, 600]])
    with torch.no_grad():
        assert torch.allclose(model(x), full.model.eval()(x), atol=1e-5)


def test_lcft_keeps_weights():
    model = tiny_model()
    longer = with_context(model, rope_theta=1e6, max_seq_len=512)
    assert longer.params.rope_theta == 1e6 and longer.params.max_seq_len == 512
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), longer.state_dict().values()))


def test_sft_masks_and_layout(tmp_path):
    tok = Tokenizer(TOKENIZER)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum a list?"},
              {"role": "assistant", "content": "Use sum(xs)."}, {"role": "user", "content": "And max?"},
              {"role": "assistant", "content": "max(xs)"}]
    tokens, targets = dialog_tokens(tok, dialog)
    assert len(tokens) == len(targets)
    prompt = chat_prompt_tokens(tok, dialog[:4])
    assert tokens[: len(prompt)] == prompt  # the training layout is the inference layout
    trained = [t for t, y in zip(tokens, targets) if y != IGNORE]
    assert tok.decode(trained).replace("</s>", "") .strip().startswith("Use sum(xs).")
    assert "max(xs)" in tok.decode(trained) and "Sum a list" not in tok.decode(trained)
    assert trained.count(tok.eos_id) == 2
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": dialog}) + "\n")
    counts = prepare_dialogs(tmp_path / "d.jsonl", TOKENIZER, tmp_path / "sft", seq_len=128, heldout=0.0)
    assert counts["train_windows"] == 1
    tg = np.load(tmp_path / "sft" / "train.targets.npy")
    assert (tg != IGNORE).sum() == len(trained)


def test_lora_trains_adapters_and_merges():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.tensor([[1, 5, 9, 300]])
    with torch.no_grad():
        want = model.eval()(x)
    merge_lora(model)
    assert set(model.state_dict()) == set(base)
    with torch.no_grad():
        assert torch.allclose(model(x), want, atol=1e-4)


def test_exported_model_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_model().eval()
    folder = save_hf(model, tmp_path / "hf", Tokenizer(TOKENIZER))
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    x = torch.tensor([[1, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)


def test_train_tokenizer(corpus, tmp_path):
    root, _, _ = corpus
    path = train_tokenizer(root, tmp_path / "tok", vocab_size=600)
    tok = Tokenizer(path)
    assert tok.supports_infilling and tok.step_id is None and tok.n_words == 600
    text = "def f(x):\n    return x + 12345  # ünïcode ☃\n"
    assert tok.decode(tok.encode(text, False, False)) == text  # byte fallback: nothing lost
    assert tok.prefix_id not in tok.encode("<PRE> ▁<PRE>", False, False)  # control pieces never come from text
    body = "    x = 1\n        return x\n"
    assert tok.decode_infilling(tok.encode_infilling(body)) == body  # the marker (bytes here) leaves no trace
    assert tok.token_piece(tok.encode_infilling(body)[0]).startswith("▁")
    ids = tok.encode("12345", False, False)
    assert len([p for p in map(tok.token_piece, ids) if any(c.isdigit() for c in p)]) == 5  # digits split


def test_report_numbers(corpus):
    from dinollama.codellama.train.report import (
        LineTask, heldout_lines, infilled_lines, infilling_scores, model_perplexity, unigram_perplexity,
    )

    train = np.array([[0, 1, 1, 2]])
    val = np.array([[0, 1, 2, 3]])
    counts = np.array([0, 2, 1, 0]) + 1.0
    expected = np.exp(-np.mean(np.log(counts / counts.sum())[[1, 2, 3]]))
    assert unigram_perplexity(train, val, 4) == pytest.approx(expected)
    model = tiny_model().eval()
    w = np.load(corpus[1] / "val.npy")[:2]
    x = torch.from_numpy(w.astype(np.int64))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model.forward_train(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert model_perplexity(model, w) == pytest.approx(float(ce.exp()), rel=1e-4)
    text = (STDLIB / "bisect.py").read_text()
    tasks = heldout_lines([text], 5, context_chars=300)
    assert len(tasks) == 5 and all(t.prefix + t.middle + t.suffix in text for t in tasks)
    short = heldout_lines([text], 3, context_chars=100)
    lines = infilled_lines(model, Tokenizer(TOKENIZER), short, batch_size=2, max_new_tokens=4)
    assert len(lines) == 3 and not any("\n" in line for line in lines)
    gold = [LineTask("", "    return lo\n", ""), LineTask("", "x = 1\n", ""), LineTask("", "abcd\n", "")]
    scores = infilling_scores(["  return lo ", "y = 2", "wxyz"], gold)
    assert scores["exact_match"] == pytest.approx(1 / 3)  # whitespace around the line does not count
    assert scores["edit_similarity"] == pytest.approx((1.0 + 2 * 3 / 10 + 0.0) / 3)  # "y = 2" vs "x = 1": " = " matches


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_code_training_two_processes_match_one(corpus, tmp_path, parallel):
    import os
    import subprocess
    import sys

    _, data, _ = corpus
    args = ["--data", "unused", "--tokenizer", str(TOKENIZER), "--dim", "64", "--layers", "2", "--heads", "4",
            "--seq-len", "64", "--quiet", "--set", "max_iters=3", "--set", "warmup_iters=0", "--set", "lr=3e-3",
            "--set", "precision=fp32", "--set", "eval_every=0", "--set", f"parallel={parallel}"]
    for name in ("one", "two"):  # reuse the prepared windows (seq_len 256 >= 64): copy them into each run folder
        (tmp_path / name / "data").mkdir(parents=True)
        for f in ("train.npy", "val.npy"):
            shutil.copy(data / f, tmp_path / name / "data" / f)
        (tmp_path / name / "data" / "stats.json").write_text(json.dumps({"seq_len": 64}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "dinollama.cli.main", "train", "code", *args, "--set", "batch_size=4",
                    "--output", str(tmp_path / "one")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                    "-m", "dinollama.cli.main", "train", "code", *args, "--set", "batch_size=2",
                    "--output", str(tmp_path / "two")], check=True, env=env)
    a, _ = load(tmp_path / "one" / "model")
    b, _ = load(tmp_path / "two" / "model")
    sa, sb = a.state_dict(), b.state_dict()
    last = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[-1])
    assert last["grad_norm"] > 0 and last["lr"] > 0  # the weights did move
    for k in sa:
        # Adam turns rounding-level gradient differences of rarely seen embedding rows into up to ~lr steps.
        assert torch.allclose(sa[k], sb[k], atol=2e-3, rtol=0), k
    assert sum((sa[k] - sb[k]).abs().sum() for k in sa) / sum(v.numel() for v in sa.values()) < 1e-5


def test_code_training_sigkill_and_resume_matches_uninterrupted(corpus, tmp_path):
    """A run killed with SIGKILL right after a checkpoint resumes to the same final weights."""
    import os
    import subprocess
    import sys

    from helpers_process import kill_at_first_checkpoint

    _, data, _ = corpus
    args = ["--data", "unused", "--tokenizer", str(TOKENIZER), "--dim", "64", "--layers", "2", "--heads", "4",
            "--seq-len", "64", "--quiet", "--set", "max_iters=30", "--set", "warmup_iters=2", "--set", "lr=3e-3",
            "--set", "precision=fp32", "--set", "eval_every=0", "--set", "save_every=2", "--set", "batch_size=4"]
    for name in ("full", "killed"):
        (tmp_path / name / "data").mkdir(parents=True)
        for f in ("train.npy", "val.npy"):
            shutil.copy(data / f, tmp_path / name / "data" / f)
        (tmp_path / name / "data" / "stats.json").write_text(json.dumps({"seq_len": 64}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "dinollama.cli.main", "train", "code", *args]
    subprocess.run([*cli, "--output", str(tmp_path / "full")], check=True, env=env)
    run = tmp_path / "killed"
    kill_at_first_checkpoint([*cli, "--output", str(run)], run, env)
    assert not (run / "model").exists(), "the run finished before it could be killed"
    saved = torch.load(run / "checkpoint.pth", weights_only=True)["iteration"]
    assert 0 < saved < 30
    subprocess.run([*cli, "--output", str(run)], check=True, env=env)
    a, _ = load(tmp_path / "full" / "model")
    b, _ = load(run / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
