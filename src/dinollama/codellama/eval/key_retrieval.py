"""The Code Llama paper's long-context probe: a function returning a value, buried at a chosen depth
in ~N tokens of real Python code, then the model completes an assert on it.

The haystack is CPython's own standard library (the interpreter running this), so every prompt is
syntactically valid real code and the same on every machine with the same Python.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..generation import Generator, SamplingParams
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class Probe:
    length: int  # prompt tokens asked for
    depth: float  # where the function sits: 0 = first, 1 = just before the question
    key: int
    tokens: list[int]


def stdlib_code(root: str | Path | None = None, limit_chars: int = 20_000_000) -> Iterator[str]:
    """Python files of the standard library in a fixed order (tests and site-packages left out)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "site-packages" in path.parts or "test" in path.parts[-2:-1]:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total > limit_chars:
            return


def _needle(name: str, key: int) -> str:
    return f"\n\ndef {name}():\n    return {key}\n\n\n"


def build_probe(tokenizer: Tokenizer, code: Sequence[str], length: int, depth: float, key: int,
                name: str = "get_secret_value") -> Probe:
    """``[bos] + code[:a] + needle + code[a:b] + question`` of about ``length`` tokens, the needle at
    ``depth`` of the code (cut at line boundaries)."""
    question = f"\n\nassert {name}() == "
    fixed = len(tokenizer.encode(_needle(name, key) + question, bos=True, eos=False))
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the probe's {fixed} fixed tokens")
    lines: list[str] = []
    count = 0
    for text in code:
        for line in text.splitlines(keepends=True):
            n = len(tokenizer.encode(line, bos=False, eos=False))
            if count + n > budget:
                break
            lines.append(line)
            count += n
        else:
            continue
        break
    at = round(depth * len(lines))
    text = "".join(lines[:at]) + _needle(name, key) + "".join(lines[at:]) + question
    return Probe(length, depth, key, tokenizer.encode(text, bos=True, eos=False))


def run_key_retrieval(gen: Generator, lengths: Sequence[int], depths: Sequence[float], trials: int = 1,
                      seed: int = 0, code: Sequence[str] | None = None) -> list[dict]:
    """Greedy answers for each (length, depth, trial): ``{"length", "depth", "key", "answer", "correct"}``."""
    code = list(code if code is not None else stdlib_code(limit_chars=8 * max(lengths) + 100_000))
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                probe = build_probe(gen.tokenizer, code, length, depth, rng.randrange(10_000, 100_000))
                out, _ = gen.generate([probe.tokens], SamplingParams(max_gen_len=8))
                answer = gen.tokenizer.decode(out[0]).strip().split()[0] if out[0] else ""
                answer = answer.rstrip(",;)")
                rows.append({"length": len(probe.tokens), "asked": length, "depth": depth, "key": probe.key,
                             "answer": answer, "correct": answer == str(probe.key)})
    return rows


def table(rows: list[dict]) -> str:
    """Accuracy per context length (rows) and depth (columns)."""
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["asked"] for r in rows})
    lines = ["tokens   " + "".join(f"depth {d:<5g}" for d in depths)]
    for n in lengths:
        cells = []
        for d in depths:
            hits = [r["correct"] for r in rows if r["asked"] == n and r["depth"] == d]
            cells.append(f"{sum(hits)}/{len(hits)}".ljust(11))
        lines.append(f"{n:<9}" + "".join(cells))
    return "\n".join(lines)
