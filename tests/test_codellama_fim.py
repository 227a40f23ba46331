"""FIM documents: round trip, rates, layouts equal to the inference prompts; packing; corpus reading."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from dinollama.codellama import Tokenizer, infilling_prompt_tokens
from dinollama.codellama.train.data import (
    Document, deduplicate, is_heldout, pack, read_documents, split_long, tokenize_documents,
)
from dinollama.codellama.train.fim import document_tokens, fim_split, fim_tokens

DATA = Path(__file__).parent / "data"
SRC = '''def add(a, b):
    """Add two numbers."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
'''


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DATA / "codellama_tokenizer.model")


def test_split_round_trip_and_uniform_positions():
    rng = random.Random(0)
    lengths = []
    for _ in range(2000):
        p, m, s = fim_split(SRC, rng)
        assert p + m + s == SRC
        lengths.append(len(p))
    assert abs(sum(lengths) / len(lengths) / len(SRC) - 1 / 3) < 0.03  # min of two uniforms: mean 1/3


def test_layouts_equal_inference_prompts(tok):
    rng = random.Random(1)
    for spm in (False, True):
        for _ in range(50):
            p, m, s = fim_split(SRC, rng)
            tokens = fim_tokens(tok, p, m, s, spm)
            prompt = infilling_prompt_tokens(tok, p, s, suffix_first=spm)
            assert tokens[: len(prompt)] == prompt
            middle = tokens[len(prompt) : -2]
            assert tokens[-2:] == [tok.eot_id, tok.eos_id]
            assert tok.decode_infilling(middle) == m  # the middle decodes back exactly (no leading-space drift)


def test_rates(tok):
    rng = random.Random(2)
    layouts = Counter(document_tokens(tok, SRC, rng)[1] for _ in range(4000))
    assert layouts["plain"] / 4000 == pytest.approx(0.1, abs=0.02)
    assert layouts["psm"] / (layouts["psm"] + layouts["spm"]) == pytest.approx(0.5, abs=0.03)
    tokens, layout = document_tokens(tok, SRC * 50, random.Random(0), fim_rate=1.0, max_tokens=64)
    assert layout == "plain"  # longer than one context: cut across contexts, so never transformed


def test_pack_never_cuts_fim_documents():
    rng = random.Random(0)
    docs = []
    for i in range(300):
        layout = rng.choice(["plain", "psm", "spm"])
        n = rng.randint(3, 80 if layout == "plain" else 32)
        docs.append(([1000 + i] * n, layout))
    windows = list(pack(docs, 31))
    assert all(len(w) == 32 for w in windows)
    flat = [t for w in windows for t in w.tolist()]
    for i, (tokens, layout) in enumerate(docs):
        if layout == "plain":
            continue
        positions = [j for j, t in enumerate(flat) if t == 1000 + i]
        if positions:  # placed: contiguous and inside one window
            assert positions == list(range(positions[0], positions[0] + len(tokens)))
            assert positions[0] // 32 == positions[-1] // 32
    total = sum(len(t) for t, _ in docs)
    assert len(flat) >= total - 2 * 32  # nothing lost but the final partial windows
    with pytest.raises(ValueError, match="must stay plain"):
        list(pack([([1] * 40, "psm")], 31))


def test_corpus_reading(tmp_path, tok):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text(SRC)
    (tmp_path / "src" / "pkg" / "b.py").write_text(SRC)  # duplicate content
    (tmp_path / "src" / "c.txt").write_text("not code")
    docs = list(deduplicate(read_documents(tmp_path / "src")))
    assert [d.name for d in docs] == ["a.py"]
    rows = tmp_path / "c.jsonl"
    rows.write_text("\n".join(json.dumps({"path": f"f{i}.py", "content": f"x = {i}\n"}) for i in range(3)))
    assert [d.text for d in read_documents(rows)] == ["x = 0\n", "x = 1\n", "x = 2\n"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["p.py", "q.py"], "content": ["a = 1\n", None]}), tmp_path / "c.parquet")
    assert [(d.name, d.text) for d in read_documents(tmp_path / "c.parquet")] == [("c.parquet:0", "a = 1\n"),
                                                                                 ("c.parquet:1", "")]
    pq.write_table(pa.table({"body": ["b = 2\n"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="no 'text' or 'content' column"):
        list(read_documents(tmp_path / "d.parquet"))
    assert [d.text for d in read_documents(tmp_path / "d.parquet", field="body")] == ["b = 2\n"]
    names = [f"lib/m{i}.py" for i in range(2000)]
    held = [n for n in names if is_heldout(n, 0.1)]
    assert 150 < len(held) < 250 and held == [n for n in names if is_heldout(n, 0.1)]
    parts = split_long(Document("big.py", SRC * 20), 200)
    assert "".join(p.text for p in parts) == SRC * 20 and len(parts) > 5
    out = list(tokenize_documents([Document("a.py", SRC), Document("b.py", SRC)], str(DATA / "codellama_tokenizer.model"),
                                  seq_len=512, workers=2))
    again = list(tokenize_documents([Document("a.py", SRC), Document("b.py", SRC)], str(DATA / "codellama_tokenizer.model"),
                                    seq_len=512, workers=1))
    assert out == again  # worker processes change nothing
