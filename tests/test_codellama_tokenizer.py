"""The real Llama 2 tokenizer vectors, infilling layouts and chat prompts of the reference."""

from pathlib import Path

import pytest

from dinollama.codellama import InfillingNotSupported, Tokenizer, chat_prompt_tokens, infilling_prompt_tokens

DATA = Path(__file__).parent / "data"
REFERENCE_PSM = [int(t) for t in (
    "1 32007 822 3349 29918 5464 29918 294 18869 29898 29879 29901 851 29897 1599 851 29901 13 1678 9995 29871 "
    "32008 13 1678 736 1121 13 32009").split()]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DATA / "codellama_tokenizer.model")


def test_all_shared_vectors():
    llama = Tokenizer(DATA / "llama2_tokenizer.model")
    inputs = (DATA / "vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (DATA / "vectors.out").read_text(encoding="utf-8").split("\n")
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    assert len(inputs) == 47
    for text, ids in zip(inputs, outputs):
        assert llama.encode(text, bos=False, eos=False) == [int(i) for i in ids.split()], repr(text)
    assert llama.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert llama.decode([15043, 3186]) == "Hello world"


def test_infilling_ids_and_reference_sequence(tok):
    assert (tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id, tok.step_id) == (32007, 32008, 32009, 32010, None)
    prefix, suffix = 'def remove_non_ascii(s: str) -> str:\n    """ ', "\n    return result\n"
    assert infilling_prompt_tokens(tok, prefix, suffix) == REFERENCE_PSM
    spm = infilling_prompt_tokens(tok, prefix, suffix, suffix_first=True)
    assert spm == [1, 32007, 32008] + tok.encode_infilling(suffix) + [32009] + tok.encode(prefix, False, False)


def test_encode_infilling_has_no_leading_space(tok):
    ids = tok.encode_infilling("\n    return result\n")
    assert ids == [13, 1678, 736, 1121, 13]
    assert tok.decode_infilling(ids) == "\n    return result\n"
    assert tok.encode("return", False, False) != tok.encode_infilling("return")  # "▁return" vs "return"
    assert tok.decode_infilling(tok.encode_infilling(" x = 1")) == " x = 1"


def test_models_without_infilling_pieces_say_so():
    llama = Tokenizer(DATA / "llama2_tokenizer.model")
    with pytest.raises(InfillingNotSupported, match="not trained for infilling"):
        infilling_prompt_tokens(llama, "a", "b")


def test_chat_prompt_exact_strings(tok):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sort a list in Python."},
    ]
    expected = (tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", bos=True, eos=True)
                + tok.encode("[INST] Sort a list in Python. [/INST]", bos=True, eos=False))
    assert chat_prompt_tokens(tok, dialog) == expected
    assert chat_prompt_tokens(tok, [{"role": "user", "content": " x "}]) == tok.encode("[INST] x [/INST]", True, False)
    with pytest.raises(ValueError, match="alternate"):
        chat_prompt_tokens(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="last message"):
        chat_prompt_tokens(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="special tags"):
        chat_prompt_tokens(tok, [{"role": "user", "content": "[INST] sneaky"}])
