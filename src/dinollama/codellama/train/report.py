"""Numbers a code-model training run reports: held-out perplexity against a unigram baseline and
the untrained model, and infilling exact match and edit similarity on held-out single lines."""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..generation import Generator, SamplingParams
from ..model import Transformer
from ..tokenizer import Tokenizer


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity of held-out targets under add-one smoothed training token frequencies."""
    counts = np.bincount(train[:, 1:].reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val[:, 1:].reshape(-1)].mean()))


@torch.no_grad()
def model_perplexity(model: Transformer, val: np.ndarray, batch_size: int = 8, max_windows: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over held-out windows."""
    model.eval()
    windows = val[:max_windows] if max_windows else val
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(np.asarray(windows[i : i + batch_size], dtype=np.int64))
        logits = model.forward_train(w[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(total / count)


@dataclass
class LineTask:
    prefix: str
    middle: str
    suffix: str


def heldout_lines(texts: list[str], n: int, seed: int = 0, context_chars: int = 600) -> list[LineTask]:
    """``n`` random non-blank single lines of held-out files with up to ``context_chars`` of code
    before and after (cut at line boundaries)."""
    rng = random.Random(seed)
    candidates = []
    for t_index, text in enumerate(texts):
        lines = text.splitlines(keepends=True)
        candidates += [(t_index, i) for i, ln in enumerate(lines) if len(ln.strip()) > 3 and not ln.strip().startswith("#")]
    tasks = []
    for t_index, i in rng.sample(candidates, min(n, len(candidates))):
        lines = texts[t_index].splitlines(keepends=True)
        before, after = "".join(lines[:i]), "".join(lines[i + 1 :])
        cut = before.find("\n", max(0, len(before) - context_chars))
        before = before[cut + 1 :] if len(before) > context_chars and cut >= 0 else before
        end = after.rfind("\n", 0, context_chars)
        after = after[: end + 1] if len(after) > context_chars and end >= 0 else after
        tasks.append(LineTask(before, lines[i], after))
    return tasks


def infilled_lines(model: Transformer, tok: Tokenizer, tasks: list[LineTask], batch_size: int = 8,
                   max_new_tokens: int = 48) -> list[str]:
    """The first line of each greedy PSM infill."""
    gen = Generator(model, tok)
    lines = []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        outs = gen.text_infilling([t.prefix for t in chunk], [t.suffix for t in chunk], SamplingParams(max_gen_len=max_new_tokens))
        lines += [o.split("\n")[0] for o in outs]
    return lines


def infilling_scores(predicted: list[str], tasks: list[LineTask]) -> dict[str, float]:
    """Exact match and mean edit similarity (difflib's ratio in [0, 1], like CodeXGLUE's line-completion
    "Edit Sim") of predicted lines against the held-out ones, without surrounding whitespace: exact
    match is 0 for nearly every line of a small model, edit similarity still tells models apart."""
    pairs = [(p.strip(), t.middle.strip()) for p, t in zip(predicted, tasks, strict=True)]
    n = max(1, len(pairs))
    return {"exact_match": sum(p == m for p, m in pairs) / n,
            "edit_similarity": sum(difflib.SequenceMatcher(None, p, m).ratio() for p, m in pairs) / n}
