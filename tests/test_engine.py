"""Continuous batching: what a sequence decodes does not depend on who shares the step with it."""

from __future__ import annotations

import pytest
import torch

import dinollama.codellama as cl
from dinollama.codellama.engine import Engine, Request


@pytest.fixture(scope="module")
def shipped():
    model, tok = cl.load("default")
    return model.float().eval(), tok


def _prompts(tok):
    texts = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "for i in range(",
             "# read a json file and print every key\n" * 3]
    return [tok.encode(t, True, False) for t in texts]


def _alone(model, tok, prompt, p):
    return Engine(model, 1, 256).run([Request(prompt, p, frozenset({tok.eos_id}), tok.decode)])[0].tokens


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_joining_midway_changes_nothing(shipped, kv_dtype):
    model, tok = shipped
    p = cl.SamplingParams(max_gen_len=24)
    prompts = _prompts(tok)
    ref = [Engine(model, 1, 256, kv_dtype).run([Request(t, p, frozenset({tok.eos_id}))])[0].tokens for t in prompts]
    engine = Engine(model, 3, 256, kv_dtype, prefill_chunk=7, decode_chunk=5)  # chunks interleave with decoding
    reqs = [Request(t, p, frozenset({tok.eos_id})) for t in prompts]
    engine.add(reqs[0])
    for _ in range(5):
        engine.step()
    engine.add(reqs[1])
    engine.step()
    engine.add(reqs[2])
    engine.add(reqs[3])
    engine.step()
    assert engine.queued == 1 and engine.running == 3  # the fourth waits for a free slot
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.tokens for r in reqs] == ref
    assert all(r.finish_reason in ("stop", "length") for r in reqs)


def test_cancel_frees_the_slot_and_prefix_reuse(shipped):
    model, tok = shipped
    p = cl.SamplingParams(max_gen_len=40)
    prompt = _prompts(tok)[1]
    engine = Engine(model, 1, 256)
    first = engine.add(Request(prompt, p, frozenset()))
    engine.step()
    engine.step()
    first.cancel()
    second = engine.add(Request(prompt + tok.encode(" x", False, False), cl.SamplingParams(max_gen_len=8), frozenset()))
    engine.step()
    assert first.finish_reason == "cancelled" and second.slot == 0
    while not second.finished:
        engine.step()
    assert second.cached == len(prompt)  # only the changed tail was prefilled
    assert second.tokens == _alone(model, tok, second.prompt, cl.SamplingParams(max_gen_len=8))[: len(second.tokens)]


def test_per_row_positions_match_single_rows(shipped):
    model, _ = shipped
    torch.manual_seed(0)
    model.setup_cache(3, 64)
    prompts = [torch.randint(3, 1000, (1, n)) for n in (5, 11, 2)]
    for row, t in enumerate(prompts):
        model(t, 0, row=row)
    nxt = torch.randint(3, 1000, (3, 1))
    batched = model.step(nxt[:, 0], torch.tensor([5, 11, 2]), [])[0]
    for row, t in enumerate(prompts):
        model.setup_cache(1, 64)
        model(t, 0)
        alone = model(nxt[row : row + 1], t.shape[1])[0, -1]
        torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=1e-4)


def test_sampling_is_per_request_and_seeded(shipped):
    model, tok = shipped
    p = cl.SamplingParams(max_gen_len=12, temperature=0.9, top_p=0.9, seed=3)
    prompt = _prompts(tok)[0]
    alone = Engine(model, 1, 128).run([Request(prompt, p)])[0].tokens
    together = Engine(model, 2, 128).run([Request(_prompts(tok)[2], cl.SamplingParams(max_gen_len=12, temperature=1.0,
                                                                                      seed=9)), Request(prompt, p)])
    assert together[1].tokens == alone


def test_stop_strings_and_visible_text(shipped):
    model, tok = shipped
    prompt = _prompts(tok)[0]
    free = Engine(model, 1, 256).run([Request(prompt, cl.SamplingParams(max_gen_len=30), decode=tok.decode)])[0]
    text = free.text()
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    r = Engine(model, 1, 256).run([Request(prompt, cl.SamplingParams(max_gen_len=30, stop_strings=(stop,)),
                                           decode=tok.decode)])[0]
    assert r.finish_reason == "stop" and r.stop_word == stop and r.text() == text[: text.index(stop)]
    partial = Request(prompt, cl.SamplingParams(stop_strings=("abc",)), decode=lambda t: "xyz ab")
    partial.tokens = [1]
    assert partial.visible_text() == "xyz "


def test_a_prompt_over_the_context_is_refused(shipped):
    model, _ = shipped
    with pytest.raises(ValueError, match=r"prompt \(300 tokens\) \+ max_gen_len \(10\) = 310 exceeds the context of 256"):
        Engine(model, 1, 256).add(Request([1] * 300, cl.SamplingParams(max_gen_len=10)))


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_one_forward_step_equals_a_decode_and_a_prefill(shipped, kv_dtype):
    model, _ = shipped
    torch.manual_seed(1)
    rows = [torch.randint(3, 1000, (1, n)) for n in (6, 13, 3)]
    chunk = torch.randint(3, 1000, (9,))
    other = torch.randint(3, 1000, (5,))
    nxt = torch.randint(3, 1000, (3,))
    positions = torch.tensor([6, 13, 3])
    results = []
    for together in (True, False):
        model.setup_cache(5, 64, kv_dtype)
        for row, t in enumerate(rows):
            model(t, 0, row=row)
        model(chunk[None, :4], 0, row=3)  # the chunk's row already holds 4 tokens: the chunk starts at 4
        if together:  # the decode rows, the rest of row 3's prompt and a new prompt in row 4, in one forward
            results.append(model.step(nxt, positions, [(chunk[4:], 4, 3), (other, 0, 4)]))
        else:
            dec = model.step(nxt, positions, [])[0]  # the decode rows alone (single rows: the test above)
            lasts = torch.stack([model(chunk[None, 4:], 4, row=3)[0, -1], model(other[None], 0, row=4)[0, -1]])
            results.append((dec, lasts))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)
    prefill_only = model.step(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), [(other, 0, 4)])
    torch.testing.assert_close(prefill_only[1][0], results[1][1][1], atol=1e-4, rtol=1e-4)


def test_a_tiny_temperature_samples_the_most_likely_token():
    from dinollama.codellama import sample

    logits = torch.randn(3, 50) * 10
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 5e-64, 0.95, 0, gen), logits.argmax(-1))  # found by schemathesis: was nan
