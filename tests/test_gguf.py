"""GGUF in and out: exact F32, quantized tensors against gguf's own dequantizer, the tokenizer rebuilt
from the metadata on the shared vectors, Q8_0/Q4_0 export -> import without a second rounding."""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from dinollama.codellama import (ModelArgs, QuantLinear, SamplingParams, Generator, Tokenizer, Transformer,  # noqa: E402
                                 load, load_gguf, quantize, save_gguf)
from dinollama.codellama.gguf_file import dequantized, quant_from_gguf  # noqa: E402
from dinollama.nn import native  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer(DATA / "codellama_tokenizer.model")
    torch.manual_seed(0)
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32,
                     rope_theta=1e6, max_seq_len=1024)
    model = Transformer(args).eval()
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n", True, False)])
    with torch.no_grad():
        ref = model(ids, 0)
    return model, tok, ids, ref


def test_f32_gguf_equals_the_source_model(setup, tmp_path):
    model, tok, ids, ref = setup
    path = save_gguf(model, tok, tmp_path / "m.gguf", "f32")
    again, tok2 = load(path)
    assert again.params.rope_theta == 1e6 and again.params.kv_heads == 2 and again.params.max_seq_len == 1024
    with torch.no_grad():
        assert (again(ids, 0) - ref).abs().max() < 1e-5
    assert tok2.encode("x = [1, 2]", True, False) == tok.encode("x = [1, 2]", True, False)
    assert (tok2.prefix_id, tok2.suffix_id, tok2.middle_id, tok2.eot_id) == (32007, 32008, 32009, 32010)


def test_tokenizer_from_gguf_metadata_encodes_the_shared_vectors(setup, tmp_path):
    llama = Tokenizer(DATA / "llama2_tokenizer.model")
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=llama.n_words, multiple_of=32))
    _, tok = load(save_gguf(tiny, llama, tmp_path / "t.gguf", "f16"))
    inputs = (DATA / "vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (DATA / "vectors.out").read_text(encoding="utf-8").split("\n")
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    for text, ids in zip(inputs, outputs):
        assert tok.encode(text, bos=False, eos=False) == [int(i) for i in ids.split()], repr(text)
    assert tok.decode(tok.encode("Hello world", True, False)) == "Hello world"


def _write_tensor_file(path, arr, qtype):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path)).tensors[0]


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_tensors_equal_ggufs_dequantizer(name, tmp_path):
    qtype = getattr(gguf.GGMLQuantizationType, name)
    arr = np.random.default_rng(0).normal(size=(48, 256)).astype(np.float32)
    t = _write_tensor_file(tmp_path / "q.gguf", arr, qtype)
    ref = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(48, 256)
    q = quant_from_gguf(t)
    assert isinstance(q, QuantLinear) and q.config.group_size == 32
    assert np.abs(q.dequantize().numpy() - ref).max() <= 1e-6 * np.abs(ref).max()  # the file's codes, as stored
    x = torch.randn(native.WIDENED_ROWS + 8, 256)  # prefill rows beyond the native kernel's: the weights' own product
    if native.int8_gemm():  # except AVX-512 VNNI's int8 product: activations rounded to int8 per block, as llama.cpp's
        exact = x @ torch.from_numpy(ref).t()
        assert (q(x) - exact).abs().max() <= 2e-2 * exact.abs().max()
    else:
        torch.testing.assert_close(q(x), x @ torch.from_numpy(ref).t(), atol=1e-3, rtol=1e-4)
    # decode rows: the native kernel rounds the activations to int8 per block of 32, as llama.cpp does
    exact = x[:2] @ torch.from_numpy(ref).t()
    assert (q(x[:2]) - exact).abs().max() <= 2e-2 * exact.abs().max(), q.kernel(x[:2])


_D_OFFSETS = {"Q6_K": (208,), "Q4_K": (0, 2)}  # where each 256-weight block keeps its float16 scale(s)


@pytest.mark.parametrize("name", ["Q6_K", "Q4_K", "BF16", "F16"])
def test_other_types_dequantize_with_gguf(name, tmp_path):
    """K-quants (the bulk of Q4_K_M files) and 16-bit types: dequantized by gguf.quants, in our layout."""
    qtype = getattr(gguf.GGMLQuantizationType, name)
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(16, 256)).astype(np.float32)
    if name in _D_OFFSETS:  # gguf-py cannot write K-quants: random blocks with sane scales are valid ones
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(16, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
        for off in _D_OFFSETS[name]:
            raw[:, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
        w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        t = gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors[0]
    else:
        t = _write_tensor_file(tmp_path / "k.gguf", arr, qtype)
        ref = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(16, 256)
        assert np.abs(ref - arr).max() < 0.01 * np.abs(arr).max()
    ref = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(16, 256)
    assert dequantized(t).shape == (16, 256) and np.isfinite(ref).all()
    assert np.abs(dequantized(t).numpy() - ref).max() == 0


def test_requantize_on_load(setup, tmp_path):
    model, tok, ids, ref = setup
    path = save_gguf(model, tok, tmp_path / "m.gguf", "f16")
    q, _ = load_gguf(path, requantize="int8")
    assert isinstance(q.layers[0].feed_forward.w1, QuantLinear) and q.layers[0].feed_forward.w1.config.bits == 8
    with torch.no_grad():
        assert (q(ids, 0) - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("qtype,scheme", [("q8_0", "int8"), ("q4_0", "int4")])
def test_quantized_export_import_round_trip_is_exact(setup, qtype, scheme, tmp_path):
    model, tok, ids, ref = setup
    q = Transformer(model.params).eval()
    q.load_state_dict(model.state_dict())
    quantize(q, scheme, group_size=32, head=True)  # the file's output head has the file's type too
    again, _ = load(save_gguf(q, tok, tmp_path / "q.gguf", qtype))
    pairs = [(a, b) for a, b in zip(q.modules(), again.modules()) if isinstance(a, QuantLinear)]
    assert len(pairs) == 2 * 7 + 1  # every layer linear and the head: our codes, written and read as they are
    for a, b in pairs:
        assert isinstance(b, QuantLinear) and torch.equal(a.codes(), b.codes()) and torch.equal(a.scales, b.scales)
    q.tok_embeddings.weight.data = again.tok_embeddings.weight.data  # the one tensor the file rounds (as llama.cpp's)
    with torch.no_grad():
        assert (again(ids, 0) - q(ids, 0)).abs().max() < 1e-5
        drift = (again(ids, 0) - ref).abs().max() / ref.abs().max()
    assert drift < (0.05 if scheme == "int8" else 0.3)
    gen = Generator(again, tok)
    out, _ = gen.generate([ids[0].tolist()], SamplingParams(max_gen_len=4), stop_token=-100)
    assert len(out[0]) == 4


def test_fused_models_and_bad_qtypes_are_refused(setup, tmp_path):
    model, tok, _, _ = setup
    with pytest.raises(ValueError, match="qtype must be"):
        save_gguf(model, tok, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        save_gguf(model, None, tmp_path / "x.gguf", "f16")
