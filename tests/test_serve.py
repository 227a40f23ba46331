"""``dinollama serve`` against the official ``openai`` client, the requests editors send, and bad input."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from helpers_serve import LiveServer, sse_events
from PIL import Image

import dinollama.codellama as cl
import dinollama.dinov2 as d2

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "for i in range(",
           "# read a json file and print every key\n" * 3]


@pytest.fixture(scope="module")
def server():
    with LiveServer(model="default", vision_model="default", parallel=4, ctx=512, dtype="fp32", prefill_chunk=16, decode_chunk=8) as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """The same shipped model, loaded apart, packed as the server packs it."""
    model, tok = cl.load("default", dtype=torch.float32)
    return cl.Generator(cl.optimize_for_inference(model, rows_hint=4), tok)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _image(seed: int, size=(64, 48)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_client_completions_fim_and_chat_match_the_generator(client, reference):
    greedy = cl.SamplingParams(max_gen_len=24)
    out = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert out.choices[0].text == reference.text_completion([PROMPTS[0]], greedy)[0]
    assert out.usage.completion_tokens <= 24 and out.choices[0].finish_reason in ("stop", "length")
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    fim = client.completions.create(model="default", prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    assert fim.choices[0].text == reference.text_infilling([prefix], [suffix], greedy)[0]
    messages = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": "sort a list"}]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == reference.chat_completion([messages], greedy)[0]
    assert [m.id for m in client.models.list().data] == ["default", "default"]


def test_streamed_pieces_join_to_the_greedy_text(client):
    full = client.completions.create(model="default", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(model="default", prompt=PROMPTS[1], max_tokens=30,
                                                                    temperature=0, stream=True) if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == full.choices[0].text
    messages = [{"role": "user", "content": "write a loop"}]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content


def test_openai_sampling_fields(client):
    a = client.completions.create(model="default", prompt=PROMPTS[2], max_tokens=12, temperature=0.9, seed=5, n=2)
    b = client.completions.create(model="default", prompt=PROMPTS[2], max_tokens=12, temperature=0.9, seed=5, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    lp = client.completions.create(model="default", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=3,
                                   echo=True)
    choice = lp.choices[0]
    assert choice.text.startswith(PROMPTS[2])
    lps = choice.logprobs.token_logprobs
    assert lps[0] is None and all(x <= 0 for x in lps[1:]) and len(choice.logprobs.top_logprobs[-1]) == 3
    stopped = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=["("])
    assert "(" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_image_embeddings_through_the_openai_client(client, server):
    urls = [_image(1), _image(2, (80, 80))]
    out = client.embeddings.create(model="default", input=urls, extra_body={"modality": "image"})  # base64 floats
    got = torch.tensor([d.embedding for d in out.data])
    model = d2.load("default")
    t = d2.default_transform(model)
    with torch.inference_mode():
        ref = model(torch.stack([t(Image.open(io.BytesIO(base64.b64decode(u.split(",")[1])))) for u in urls]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    status, body = server.post("/v1/embeddings", {"input": urls[:1], "modality": "image", "patch_tokens": True,
                                                  "encoding_format": "float"})
    assert status == 200 and len(body["data"][0]["patch_tokens"]) == (56 // 14) ** 2


def test_parallel_greedy_requests_return_what_each_returns_alone(server):
    def ask(prompt):
        return server.post("/v1/completions", {"prompt": prompt, "max_tokens": 20, "temperature": 0})[1]["choices"][0]["text"]

    alone = [ask(p) for p in PROMPTS]
    results = [None] * 8
    threads = []
    for i in range(8):  # 8 requests over 4 slots: some wait, and they join while others decode
        threads.append(threading.Thread(target=lambda i=i: results.__setitem__(i, ask(PROMPTS[i % 4]))))
        threads[-1].start()
        time.sleep(0.02 * (i % 3))
    for t in threads:
        t.join()
    assert results == alone + alone


def test_a_client_that_leaves_frees_its_slot(server):
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=60)
    r.readline()
    r.close()
    engine = server.state.worker.engine
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0


def test_llama_vim_and_continue_dev_requests(server, reference):
    # llama.vim's FIM request, field for field (response_fields as it asks for them)
    vim = {"input_prefix": "import json\n\n\ndef load(path):\n", "input_suffix": "\n\nprint(load('x.json'))\n",
           "input_extra": [{"text": "def save(obj, path):\n    json.dump(obj, open(path, 'w'))\n", "time": 1,
                            "filename": "util.py"}],
           "prompt": "    ", "n_predict": 32, "n_indent": 4, "top_k": 40, "top_p": 0.99, "stream": False,
           "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
           "t_max_predict_ms": 1000,
           "response_fields": ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                               "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                               "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                               "tokens_cached"]}
    status, body = server.post("/infill", vim)
    assert status == 200 and set(body) == set(vim["response_fields"])
    assert isinstance(body["content"], str) and body["tokens_cached"] > body["timings/prompt_n"] > 0
    again = server.post("/infill", {**vim, "response_fields": []})[1]
    assert again["stop"] is True and again["timings"]["cache_n"] > 0  # the resent prefix comes from the slot's cache
    assert {"content", "tokens_cached", "timings", "stop_type", "truncated", "tokens_predicted"} <= set(again)
    # continue.dev (and Tabby) send Code Llama's template as a plain OpenAI prompt
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    cont = {"model": "default", "prompt": f"<PRE> {prefix} <SUF>{suffix} <MID>", "max_tokens": 24, "temperature": 0,
            "stop": ["<EOT>"], "stream": False}
    status, body = server.post("/v1/completions", cont)
    greedy = cl.SamplingParams(max_gen_len=24)
    assert status == 200 and body["choices"][0]["text"] == reference.text_infilling([prefix], [suffix], greedy)[0]
    streamed = sse_events(server.url + "/infill", {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 24,
                                                   "temperature": 0, "stream": True})
    assert streamed[-1]["stop"] is True and "".join(e["content"] for e in streamed) == body["choices"][0]["text"]


def test_infill_puts_the_extra_chunks_before_bos_as_llama_server_does(server):
    from dinollama.serve.llama_api import SNIPPET, infill_prompt
    from dinollama.serve.schemas import InfillRequest
    tok = server.state.tokenizer
    body = InfillRequest(input_prefix="def f(x):\n", input_suffix="\n\nf(1)\n", prompt="    ",
                         input_extra=[{"filename": "a.py", "text": "A = 1\n"}, {"filename": "b.py", "text": "B = 2\n"}])
    tokens, truncated = infill_prompt(server.state, body, 16)
    extra = [t for c in ("A = 1\n", "B = 2\n") for t in tok.encode_infilling(SNIPPET) + tok.encode_infilling(c)]
    fim = [tok.bos_id, tok.prefix_id] + tok.encode("def f(x):\n", False, False) + tok.encode_infilling("    ")
    assert tokens == extra + fim + [tok.suffix_id] + tok.encode_infilling("\n\nf(1)\n") + [tok.middle_id]
    assert not truncated
    long = InfillRequest(input_prefix="x", input_suffix="", input_extra=[{"text": "y = 0\n" * 400}])
    tokens, truncated = infill_prompt(server.state, long, 16)  # the newest extra tokens that fit, the whole FIM part
    tail = [tok.bos_id, tok.prefix_id] + tok.encode("x", False, False) + [tok.suffix_id, tok.middle_id]
    extra = tok.encode_infilling(SNIPPET) + tok.encode_infilling("y = 0\n" * 400)
    head = tokens[:len(tokens) - len(tail)]
    assert truncated and tokens[-len(tail):] == tail and 0 < len(head) < len(extra) and extra[-len(head):] == head
    assert len(tokens) + 16 <= server.state.ctx


def test_tokenize_props_health_metrics(server):
    tok = server.state.tokenizer
    status, body = server.post("/tokenize", {"content": "def f(x):", "add_special": True})
    assert status == 200 and body["tokens"] == tok.encode("def f(x):", True, False)
    assert server.post("/detokenize", {"tokens": body["tokens"]})[1]["content"] == "def f(x):"
    pieces = server.post("/tokenize", {"content": "ab", "with_pieces": True})[1]["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("ab", False, False)
    assert server.get("/health") == (200, {"status": "ok"})
    props = server.get("/props")[1]
    assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 512 and props["infill"]
    status, text = server.get("/metrics")
    assert status == 200 and "dinollama_generated_tokens_total" in text and "dinollama_queue_depth 0" in text
    assert server.get("/")[0] == 200 and "openapi" in json.dumps(server.get("/openapi.json")[1])


@pytest.mark.parametrize("path,body,status,words", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"prompt": "x " * 600, "max_tokens": 8}, 400, "exceeds the context of 512"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "vocabulary"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "roles must alternate"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/infill", {"input_prefix": "x"}, 400, "input_suffix"),
    ("/v1/embeddings", {"input": ["not a url"], "modality": "image"}, 422, "data:image"),
    ("/v1/embeddings", {"input": ["data:image/png;base64,aGVsbG8="], "modality": "image"}, 422, "not a decodable"),
    ("/v1/embeddings", {"input": ["def f(): pass"]}, 400, "modality"),
    ("/v1/embeddings", {"input": ["data:image/png;base64,"] * 17, "modality": "image"}, 413, "limit"),
    ("/v1/nothing", {}, 404, "no such route"),
])
def test_bad_requests_get_json_errors(server, path, body, status, words):
    raw = json.dumps(body, allow_nan=True).encode()
    got, answer = server.post(path, raw=raw)
    assert got == status, answer
    err = answer["error"]
    assert words in err["message"] and err["code"] == status and isinstance(err["type"], str)


def test_bad_json_oversized_bodies_and_bombs(server):
    status, body = server.post("/v1/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    conn = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(21 * 2**20))  # over the 20 MB default: refused before it is read
    conn.endheaders(b'{"prompt": "xxxx')
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]["message"]
    conn.close()
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG")  # 144 Mpixel of zeros: a few hundred kB compressed
    bomb = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    status, body = server.post("/v1/embeddings", {"input": [bomb], "modality": "image"})
    assert status == 422 and ("bomb" in body["error"]["message"] or "limit" in body["error"]["message"])
    assert server.request("GET", "/v1/completions")[0] == 405


def test_api_key_and_infilling_refused_without_its_pieces(tmp_path):
    folder = tmp_path / "plain"
    model = cl.build(cl.ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32000, max_seq_len=256))
    cl.save_native(model, folder)
    llama2 = Path(__file__).resolve().parent / "data" / "llama2_tokenizer.model"  # no infilling pieces
    (folder / "tokenizer.model").write_bytes(llama2.read_bytes())
    with LiveServer(model=str(folder), parallel=1, ctx=128, api_key="s3cret", dtype="fp32") as s:
        assert s.get("/health")[0] == 200  # public
        status, body = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert s.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, {"Authorization": "Bearer wrong"})[0] == 401
        assert s.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, {"Authorization": "Bearer s3cret"})[0] == 200
        assert s.post("/tokenize", {"content": "x"}, {"X-Api-Key": "s3cret"})[0] == 200
        status, body = s.post("/infill", {"input_prefix": "a", "input_suffix": "b"}, {"X-Api-Key": "s3cret"})
        assert status == 501 and "infilling" in body["error"]["message"]
        status, body = s.post("/v1/completions", {"prompt": "a", "suffix": "b"}, {"X-Api-Key": "s3cret"})
        assert status == 501


def test_a_full_queue_answers_503_with_retry_after():
    with LiveServer(model="default", parallel=1, ctx=512, max_queue=1, dtype="fp32") as s:
        results = []

        def ask():
            req = urllib.request.Request(s.url + "/v1/completions", method="POST",
                                         data=json.dumps({"prompt": PROMPTS[0], "max_tokens": 200,
                                                          "temperature": 0}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    results.append((r.status, None))
            except urllib.error.HTTPError as e:
                results.append((e.code, e.headers.get("Retry-After")))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert (503, "1") in results and (200, None) in results


def test_sigterm_under_load_loses_nothing(tmp_path):
    import signal
    import subprocess
    import sys

    from helpers_serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dinollama.cli.main", "serve", "--port", str(port), "--parallel", "2",
                             "--ctx", "512", "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        ready = proc.stdout.readline()
        while "ready at" not in ready:
            assert ready, "the server exited before it was ready"
            ready = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in ready
        url = f"http://127.0.0.1:{port}/v1/completions"
        results = []

        def ask(prompt):
            req = urllib.request.Request(url, data=json.dumps({"prompt": prompt, "max_tokens": 80,
                                                               "temperature": 0}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                results.append((r.status, json.loads(r.read())["usage"]["completion_tokens"]))

        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert proc.wait(timeout=60) == 0
        assert len(results) == 4 and all(status == 200 and n > 0 for status, n in results)
    finally:
        proc.kill()
        proc.stdout.close()


def test_serves_a_gguf_file(tmp_path):
    model, tok = cl.load("default", dtype=torch.float32)
    cl.quantize(model, "int8", group_size=32)
    path = cl.save_gguf(model, tok, tmp_path / "default-q8_0.gguf", "q8_0")
    again, tok2 = cl.load(path, dtype=torch.float32)
    ref = cl.Generator(cl.optimize_for_inference(again, rows_hint=2), tok2)
    with LiveServer(model=str(path), parallel=2, ctx=256, dtype="fp32") as s:
        status, body = s.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0})
        assert status == 200 and body["model"] == "default-q8_0.gguf"
        assert body["choices"][0]["text"] == ref.text_completion([PROMPTS[0]], cl.SamplingParams(max_gen_len=16))[0]
