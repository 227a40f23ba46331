"""Every command as a new user meets it: CPU fallbacks, one-line errors (exit 2), image modes, the chat REPL."""

import argparse
import contextlib
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinollama.cli.main import build_parser, main
from dinollama.codellama import ModelArgs, SamplingParams, Tokenizer, Transformer, fit_dialog, save_native
from dinollama.codellama.checkpoint import default_model_dir
from dinollama.nn import kernels

ROOT = Path(__file__).resolve().parents[1]
DINOLLAMA = str(Path(sys.executable).with_name("dinollama"))
# What an AVX2-only CPU (AMD Zen 3) looks like to torch and oneDNN: packing bf16 weights raises there.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "DINOLLAMA_KERNELS": "auto"}


def cli(*args, env=None, input=None, timeout=120):
    """The installed command in a fresh process: (exit code, stdout, stderr)."""
    r = subprocess.run([DINOLLAMA, *map(str, args)], capture_output=True, text=True, input=input, timeout=timeout,
                       env={**os.environ, **(env or {})}, cwd=tempfile.gettempdir())
    return r.returncode, r.stdout, r.stderr


def in_process(*args):
    """The same command through ``main`` in this process, for checks that stop before any work (a fresh
    interpreter costs ~4 s of torch import on a Zen 3; the entry point itself is tested by ``cli``)."""
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own errors exit as the process would
                code = e.code
    finally:
        os.chdir(here)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code, err, *words):
    """Exit 2, no traceback, a single line on stderr (besides notes) that contains ``words``."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fm_images(tmp_path_factory):
    from dinollama.data.mnist import load_fashion_mnist

    x, y = load_fashion_mnist("test", "mini")
    folder = tmp_path_factory.mktemp("fm")
    for i in range(3):
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    return folder, y[:3]


# --- 1. defaults and fast paths that run on every CPU ------------------------------------------


def test_forced_kernel_modes(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "generic")
    k = kernels.cpu_kernels()
    assert not k.onednn and not k.native_bf16 and not k.can_pack(torch.float32) and "forced" in k.describe()
    assert kernels.auto_dtype("cpu") == torch.float32
    monkeypatch.setenv(kernels.ENV, "avx2")
    k = kernels.cpu_kernels()
    assert k.can_pack(torch.float32) == torch.backends.mkldnn.is_available() and not k.can_pack(torch.bfloat16)
    monkeypatch.setenv(kernels.ENV, "avx512")
    with pytest.raises(ValueError, match="DINOLLAMA_KERNELS='avx512': use one of auto, avx2, generic"):
        kernels.cpu_kernels()


@pytest.mark.parametrize("mode", ["avx2", "generic"])
def test_packed_linear_fallbacks_match_plain_ops(mode, monkeypatch):
    from dinollama.nn import PackedLinear

    monkeypatch.setenv(kernels.ENV, mode)
    torch.manual_seed(0)
    lin, gamma = torch.nn.Linear(24, 40), torch.rand(40)
    x, res = torch.randn(3, 5, 24), torch.randn(3, 5, 40)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float16):
            fused = PackedLinear(lin, 15, scale=gamma, dtype=dtype)
            assert not fused.packed and "generic" in repr(fused)
            ref = res.to(dtype) + torch.nn.functional.linear(x.to(dtype), (lin.weight * gamma[:, None]).to(dtype),
                                                             (lin.bias * gamma).to(dtype))
            torch.testing.assert_close(fused(x.to(dtype), residual=res.to(dtype)), ref)
        gelu = PackedLinear(lin, 15, activation="gelu")
        assert gelu.packed == (mode == "avx2" and torch.backends.mkldnn.is_available())
        torch.testing.assert_close(gelu(x), torch.nn.functional.gelu(lin(x)))


@pytest.mark.parametrize("mode", ["auto", "avx2", "generic"])
def test_optimize_for_inference_never_raises_for_a_cpu_feature(mode, monkeypatch):
    from dinollama import codellama, dinov2

    monkeypatch.setenv(kernels.ENV, mode)
    vit = dinov2.build("dinov2_vits14", depth=2, img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            fast = dinov2.optimize_for_inference(vit, dtype=dtype)
            plain = dinov2.build("dinov2_vits14", depth=2, img_size=56).eval()
            plain.load_state_dict(vit.state_dict())
            got, ref = fast(x.to(dtype)).float(), plain.to(dtype)(x.to(dtype)).float()
            assert (got - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 0.1 * ref.abs().max())
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=64)
    tokens = torch.randint(3, 300, (1, 12))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = Transformer(args).to(dtype).eval()
        with torch.no_grad():
            ref = model(tokens, 0)
            model.cache = None
            got = codellama.optimize_for_inference(model)(tokens, 0)
        assert (got - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max())


def test_cli_defaults_run_on_an_avx2_only_cpu(fm_images, tmp_path):
    """What crashed on Zen 3 (bf16 packing), run with torch and oneDNN limited to AVX2."""
    folder, _ = fm_images
    code, out, err = cli("complete", "def add(a, b):", "--max-gen-len", "8", env=AVX2_ONLY)
    assert code == 0 and out.startswith("def add(a, b):") and "Traceback" not in err, err
    code, out, err = cli("complete", "x = 1", "--max-gen-len", "4", "--dtype", "bf16", env=AVX2_ONLY)
    assert code == 0 and err.count("no native bfloat16") == 1, err
    code, out, err = cli("embed", folder, "-o", tmp_path / "f.npy", "--dtype", "bf16", "--workers", "0", "--quiet",
                         env=AVX2_ONLY)
    assert code == 0 and np.load(tmp_path / "f.npy").shape == (3, 192), err


FAST_PATH_TESTS = [
    "tests/test_dinov2_model.py::test_optimize_for_inference_keeps_outputs",
    "tests/test_dinov2_model.py::test_packed_linear_fusions_match_plain_ops",
    "tests/test_codellama_model.py::test_optimize_for_inference_keeps_logits",
    "tests/test_defaults.py::test_default_code_model_through_the_eval_pipeline",
    "tests/test_vision_int8.py::test_int8_vit_is_close_to_fp32",
    "tests/test_quant.py::test_quant_linear_equals_the_dequantized_product",
    "tests/test_long_context.py::test_chunked_prefill_equals_one_pass",
    "tests/test_native.py::test_optimized_model_decodes_as_the_plain_one",
    "tests/test_native.py::test_a_serving_step_equals_the_torch_path",
    "tests/test_native.py::test_int8_vit_blocks_run_the_native_passes_and_equal_the_torch_path",
]


@pytest.mark.parametrize("env", [AVX2_ONLY, {kernels.ENV: "generic"}], ids=["avx2-only-cpu", "generic-forced"])
def test_the_fast_path_tests_pass_on_the_fallbacks(env):
    """The suite's fast-path tests again, as an AVX2-only CPU and with the generic path forced."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_PATH_TESTS], cwd=ROOT,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:]


def test_auto_dtype_follows_the_cpu():
    expected = torch.bfloat16 if kernels.cpu_kernels().native_bf16 else torch.float32
    assert kernels.auto_dtype("cpu") == expected
    probe = "from dinollama.nn.kernels import auto_dtype; print(auto_dtype('cpu'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **AVX2_ONLY})
    assert out.stdout.strip() == "torch.float32"


# --- 2. one clear line for every user mistake ----------------------------------------------------


@pytest.mark.parametrize("field,value,words", [
    ("max_gen_len", -3, "max_gen_len must be >= 1"), ("max_gen_len", 2.5, "whole number"),
    ("top_p", -1.0, "top_p must be in (0, 1]"), ("top_p", 2.0, "top_p must be in (0, 1]"), ("top_p", 0.0, "greedy"),
    ("temperature", float("nan"), "temperature must be a finite number"), ("temperature", -1.0, "0 (greedy) or more"),
    ("top_k", -5, "top_k must be >= 0"), ("seed", -1, "seed must be >= 0"), ("stop_strings", ("",), "non-empty"),
])
def test_sampling_params_check_their_values(field, value, words):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    assert words in str(e.value)


@pytest.mark.parametrize("flags,words", [
    (["--max-gen-len", "-3"], "--max-gen-len: -3 must be a positive whole number"),
    (["--top-p", "-1"], "--top-p: -1 must be a positive number"), (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["--temperature", "nan"], "--temperature: 'nan' is not a finite number"),
    (["--temperature", "-1"], "--temperature: -1 must be 0 or more"), (["--top-k", "-5"], "--top-k: -5 must be 0 or more"),
    (["--dtype", "int3"], "invalid choice: 'int3'"), (["--device", "cuda:9" if not torch.cuda.is_available() else "nope"], "--device"),
])
def test_generation_values_are_one_line_errors(flags, words):
    one_line_error(*in_process("complete", "x", *flags)[::2], words)


def test_eval_and_training_values_are_checked():
    one_line_error(*in_process("eval", "humaneval", "--n-samples", "0")[::2],
                   "--n-samples: 0 must be a positive whole number")
    one_line_error(*in_process("embed", ".", "-o", "x.npy", "--image-size", "0")[::2],
                   "--image-size: 0 must be at least 14")
    one_line_error(*in_process("train", "code", "--data", ".", "--output", "r", "--fim-rate", "2")[::2],
                   "between 0 and 1")


@pytest.mark.parametrize("override,words", [
    ("optim.epochs=abc", "optim.epochs must be a finite number, got 'abc'"),
    ("optim.base_lr=nan", "optim.base_lr must be a finite number, got 'nan'"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu must be > 0, got 0"),
    ("train.batch_size_per_gpu=2.5", "train.batch_size_per_gpu must be a whole number"),
    ("crops.global_crops_scale=3", "crops.global_crops_scale must be a list of 2 values"),
    ("train.precision=fp8", "train.precision must be one of bf16, fp16, fp32"),
    ("ibot.separate_head=1", "ibot.separate_head must be true or false"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
])
def test_training_overrides_are_type_checked(override, words, tmp_path):
    from dinollama.dinov2.train import load_config

    with pytest.raises(ValueError) as e:
        load_config(preset="test-tiny", overrides=[override])
    assert words in str(e.value)
    code, _, err = in_process("train", "ssl", "--preset", "test-tiny", "--data", "fashion-mnist:mini", "--output",
                       tmp_path / "run", "--set", override)
    one_line_error(code, err, words)
    assert not (tmp_path / "run").exists()


def test_code_training_options_are_type_checked_and_ignored_keys_said(capsys):
    from dinollama.codellama.train import CodeTrainConfig
    from dinollama.dinov2.train import load_config

    with pytest.raises(ValueError, match="max_iters must be a whole number, got 'abc'"):
        CodeTrainConfig.from_dict({"max_iters": "abc"})
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        CodeTrainConfig.from_dict({"batch_size": 0})
    assert CodeTrainConfig.from_dict({"lr": 1}).lr == 1.0  # an int where a float is wanted is fine
    cfg = load_config(preset="test-tiny", overrides=["optim.lr=0.5"])
    assert "optim.lr is an official key with no effect here, ignored; set optim.base_lr" in capsys.readouterr().err
    assert cfg.optim.base_lr == load_config(preset="test-tiny").optim.base_lr


def test_options_that_would_be_ignored_are_refused(tmp_path, fm_images):
    folder, _ = fm_images
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    one_line_error(*in_process("embed", folder, "-o", tmp_path / "f.npy", "--model", "default",
                               "--weights", weights)[::2],
                   "has no effect with --model default", f"--model {weights}")
    src = tmp_path / "f.py"
    src.write_text("def f():\n    <FILL_ME>\n")
    one_line_error(*in_process("infill", src, "--prefix", "a", "--suffix", "b")[::2], "not both")
    assert not (tmp_path / "f.npy").exists()


def test_paths_are_checked_before_any_work(tmp_path, fm_images):
    folder, _ = fm_images
    t0 = time.time()
    one_line_error(*in_process("pca", folder / "0.png", "-o", tmp_path / "missing" / "dir" / "x.png")[::2],
                   "the folder", "does not exist")
    one_line_error(*in_process("pca", folder / "0.png", "-o", tmp_path / "x.unknownext")[::2], "Pillow cannot write")
    one_line_error(*in_process("embed", folder, "-o", tmp_path / "f.npy", "--model", "/missing/file.safetensors")[::2],
                   "/missing/file.safetensors: no such checkpoint file or folder")
    one_line_error(*in_process("embed", folder, "-o", tmp_path / "f.npy", "--model", "dinov2_vitx14")[::2],
                   "unknown model 'dinov2_vitx14'; choose from default,")
    one_line_error(*in_process("complete", "x", "--model", tmp_path / "nope")[::2], "no such model folder")
    one_line_error(*in_process("classify", folder / "0.png", "--model", tmp_path / "w.pth")[::2],
                   "classify needs a hub name")
    assert time.time() - t0 < 60


def test_unwritable_output_folder_is_one_line(fm_images):
    """A read-only folder; as root (CI) a read-only bind mount, since permission bits do not stop root."""
    folder, _ = fm_images
    out = Path(tempfile.mkdtemp())
    args = [DINOLLAMA, "embed", str(folder), "-o", str(out / "f.npy"), "--workers", "0", "--quiet"]
    if os.geteuid() == 0:
        args = ["unshare", "--mount", "sh", "-c", f'mount --bind -o ro "{out}" "{out}" && exec "$@"', "sh", *args]
    os.chmod(out, 0o555)
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        one_line_error(r.returncode, r.stderr, f"--out {out / 'f.npy'}", "is not writable")
        assert not any(out.iterdir())
    finally:
        os.chmod(out, 0o755)
        os.rmdir(out)


def test_os_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["train", "tokenizer", "--data", str(tmp_path / "file" / "sub"), "--output", str(tmp_path / "t")])
    one_line_error(code, capsys.readouterr().err)


def test_overlong_prompt_is_refused_before_it_is_echoed():
    code, out, err = cli("complete", "-", input="x = 1\n" * 35_000)
    assert out == ""
    one_line_error(code, err, "exceeds the context of 512 tokens")


def test_classify_with_the_default_model(fm_images):
    from dinollama.data.mnist import FASHION_CLASSES

    folder, labels = fm_images
    code, out, err = cli("classify", *(folder / f"{i}.png" for i in range(3)), "--model", "default", "--topk", "2")
    assert code == 0, err
    for line, y in zip(out.splitlines(), labels):
        assert line.split(": ")[1].startswith(FASHION_CLASSES[y] + " ")


def test_knn_caps_k_at_the_training_set(tmp_path, capsys):
    from dinollama.dinov2.embed import EmbedResult, write_features

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        paths = [str(tmp_path / ("a" if i % 2 else "b") / f"{split}{i}.png") for i in range(n)]
        feats = EmbedResult(paths, torch.tensor(rng.normal(size=(n, 8)), dtype=torch.float32))
        write_features(feats, tmp_path / f"{split}.safetensors", "t")
    report = tmp_path / "r.json"
    assert main(["eval", "knn", "--train", str(tmp_path / "train.safetensors"), "--test", str(tmp_path / "test.safetensors"),
                 "--ks", "5", "20", "200", "--report", str(report)]) == 0
    assert "capped: reported as 12-NN" in capsys.readouterr().err
    assert sorted(json.loads(report.read_text())["top1"]) == ["12-NN", "5-NN"]


def _base_rgb(base: np.ndarray) -> Image.Image:
    return Image.fromarray(base).convert("RGB")


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "RGB"])
def test_default_transform_takes_every_image_mode(mode):
    from dinollama.dinov2 import default_transform, load

    tf = default_transform(load("default"))
    base = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    if mode == "I;16":
        img = Image.frombytes("I;16", (50, 40), (base.astype("<u2") * 257).tobytes())
    elif mode == "I":
        img = Image.fromarray(base.astype(np.int32) * 257)
    elif mode == "F":  # float TIFFs hold [0, 1]
        img = Image.fromarray(base.astype(np.float32) / 255)
    else:
        img = Image.fromarray(base).convert(mode)
    assert img.mode == mode
    tol = 0.05 if mode == "CMYK" else 1e-6  # JPEG-style CMYK round trip
    assert (tf(img) - tf(_base_rgb(base))).abs().max() <= tol


# --- also expected of a mature CLI ---------------------------------------------------------------


def test_version_help_and_bare_command():
    from dinollama import __version__

    assert cli("--version")[1].strip() == f"dinollama {__version__}"
    code, out, _ = cli()
    assert code == 0 and out.startswith("usage: dinollama") and "embed" in out and "chat" in out


def _parsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, prefix + (name,))
    yield prefix, parser


def test_every_help_shows_every_default():
    for names, parser in _parsers(build_parser()):
        text = parser.format_help()  # raises on a bad % in a help string
        for action in parser._actions:
            d = action.default
            if action.option_strings and not (d is None or d is False or d == [] or d is argparse.SUPPRESS):
                assert "(default: %(default)s)" in action.help or "%(default)" in action.help, (names, action.dest)
        assert text


# --- 3. a chat that keeps the conversation -------------------------------------------------------


def _random_chat_model(folder: Path, context: int = 2048) -> Path:
    """A tiny random model with the default tokenizer: it never says </s>, so replies run to their limit."""
    tok = Tokenizer(default_model_dir() / "tokenizer.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=tok.n_words, multiple_of=32,
                                  max_seq_len=context))
    return save_native(model, folder, tok)


def test_fit_dialog_drops_the_oldest_exchanges():
    tok = Tokenizer(default_model_dir() / "tokenizer.model")
    dialog = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        dialog += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": "answer " * 30}]
    dialog.append({"role": "user", "content": "last question"})
    tokens, dropped = fit_dialog(tok, dialog, context=256, min_reply=32)
    assert len(tokens) + 32 <= 256 and dropped > 0
    from dinollama.codellama import chat_prompt_tokens

    kept = dialog[:1] + dialog[1 + 2 * dropped :]
    assert tokens == chat_prompt_tokens(tok, kept)
    assert len(chat_prompt_tokens(tok, dialog[:1] + dialog[1 + 2 * (dropped - 1) :])) + 32 > 256  # dropped no more
    with pytest.raises(ValueError, match="leaves no room"):
        fit_dialog(tok, [{"role": "user", "content": "word " * 400}], context=256, min_reply=32)


def test_piped_chat_answers_each_line_and_trims_the_dialog(tmp_path):
    folder = _random_chat_model(tmp_path / "m", context=256)
    lines = [f"question number {i}" for i in range(4)] + ["/reset", "one more"]
    code, out, err = cli("chat", "--model", folder, "--max-gen-len", "100", "--dtype", "fp32",
                         input="\n".join(lines) + "\n")
    assert code == 0 and "Traceback" not in err, err
    assert "you>" not in out and "assistant>" not in out and "you>" not in err
    assert "note: dropped the 1 oldest exchange(s) to fit the 256-token context" in err
    assert "dialog cleared" in err


class _Terminal:
    """The master side of a pseudo-terminal: everything read is kept, and each wait starts where the last ended."""

    def __init__(self, fd: int) -> None:
        self.fd, self.text, self.pos = fd, "", 0

    def wait_for(self, marker: str, timeout: float = 60.0) -> None:
        end = time.time() + timeout
        while marker not in self.text[self.pos :]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.time()))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout}s; saw {self.text[-500:]!r}")
            try:
                self.text += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"terminal closed before {marker!r}; saw {self.text[-500:]!r}") from None
        self.pos += self.text[self.pos :].index(marker) + len(marker)


def _exit_code(pid: int, term: _Terminal, timeout: float = 30.0) -> int:
    end = time.time() + timeout
    while time.time() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([term.fd], [], [], 0.2)[0]:
            try:
                term.text += os.read(term.fd, 4096).decode(errors="replace")
            except OSError:
                time.sleep(0.2)
    raise AssertionError(f"still running {timeout}s after Ctrl-D; saw {term.text[-500:]!r}")


def test_chat_on_a_terminal_ctrl_c_stops_the_reply_and_ctrl_d_ends(tmp_path):
    folder = _random_chat_model(tmp_path / "m")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the REPL on a pseudo-terminal, with Ctrl-C's SIGINT as a terminal user has it
        # (a suite started in the background by a non-interactive shell ignores SIGINT, and an ignored SIGINT
        # survives exec: Python then installs no KeyboardInterrupt handler and Ctrl-C did nothing)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(DINOLLAMA, [DINOLLAMA, "chat", "--model", str(folder), "--max-gen-len", "1900", "--dtype", "fp32"])
    term = _Terminal(fd)
    try:
        term.wait_for("you> ")
        os.write(fd, b"write a long function\r")
        term.wait_for("assistant> ")
        time.sleep(0.3)
        os.write(fd, b"\x03")  # Ctrl-C during the reply
        term.wait_for("(stopped)")
        term.wait_for("you> ")  # back at the prompt, the session goes on
        os.write(fd, b"/system be brief\r")
        term.wait_for("system prompt set; dialog cleared")
        term.wait_for("you> ")
        os.write(fd, b"\x04")  # Ctrl-D ends
        assert _exit_code(pid, term) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
