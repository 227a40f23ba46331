"""Generate completions for benchmark tasks, run them in the sandbox, and score pass@k.

Results go to a JSONL file, one line per (task, sample), written as they finish: a run stopped at
any point continues where it left off when started again with the same file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .. import sandbox
from ..generation import Generator, SamplingParams
from ..prompts import infilling_prompt_tokens
from .benchmarks import Task
from .passk import mean_pass_at_k


@dataclass
class EvalSettings:
    n_samples: int = 1
    temperature: float = 0.0  # greedy for pass@1; the paper samples T=0.8, top-p 0.95 for pass@10/100
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    timeout: float = 3.0
    workers: int | None = None
    seed: int = 0
    suffix_first: bool = False  # SPM instead of PSM for infilling

    def __post_init__(self) -> None:
        SamplingParams(max_gen_len=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        for name in ("n_samples", "batch_size") + (("workers",) if self.workers is not None else ()):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if not self.timeout > 0 or self.timeout == float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


def _done(results_path: Path) -> dict[tuple[str, int], dict]:
    if not results_path.exists():
        return {}
    out = {}
    for line in results_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write; it is redone
        out[(r["task_id"], r["sample"])] = r
    return out


def _prompt_len(gen: Generator, t: Task, s: EvalSettings) -> int:
    if t.kind == "infilling":
        return len(infilling_prompt_tokens(gen.tokenizer, t.prefix, t.suffix, s.suffix_first))
    return len(gen.tokenizer.encode(t.prompt, True, False))


def _generate(gen: Generator, tasks: list[Task], s: EvalSettings, seed: int) -> list[str]:
    """Completions; new tokens are capped to the model's context, and a prompt that leaves fewer than
    16 tokens of room gets an empty completion (it then fails) instead of stopping the run."""
    context = gen.model.params.max_seq_len
    lengths = [_prompt_len(gen, t, s) for t in tasks]
    fits = [i for i, n in enumerate(lengths) if n + 16 <= context]
    out = [""] * len(tasks)
    if not fits:
        return out
    room = context - max(lengths[i] for i in fits)
    params = SamplingParams(max_gen_len=min(s.max_new_tokens, room), temperature=s.temperature, top_p=s.top_p,
                            seed=seed, stop_strings=tasks[0].stop)
    chosen = [tasks[i] for i in fits]
    if chosen[0].kind == "infilling":
        texts = gen.text_infilling([t.prefix for t in chosen], [t.suffix for t in chosen], params,
                                   suffix_first=s.suffix_first)
    else:
        texts = gen.text_completion([t.prompt for t in chosen], params)
    for i, text in zip(fits, texts):
        out[i] = text
    return out


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_benchmark(gen: Generator, tasks: list[Task], results_path: str | os.PathLike, settings: EvalSettings | None = None,
                  progress: bool = True) -> dict:
    """Generate ``n_samples`` per task (skipping those already in ``results_path``), execute each
    program in the sandbox, append the results, and return the summary with pass@k."""
    s = settings or EvalSettings()
    path = Path(results_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _done(path)
    todo = [(t, i) for t in tasks for i in range(s.n_samples) if (t.task_id, i) not in done]
    bar = tqdm(total=len(tasks) * s.n_samples, initial=len(tasks) * s.n_samples - len(todo), unit="sample",
               disable=not progress, desc="eval")
    with open(path, "a") as f:
        for chunk in _batches(todo, s.batch_size):
            completions = _generate(gen, [t for t, _ in chunk], s, seed=s.seed + chunk[0][1] * 100003 + len(done))
            programs = [t.program(c) for (t, _), c in zip(chunk, completions)]
            for (t, i), c, r in zip(chunk, completions, sandbox.run_many(programs, s.timeout, s.workers)):
                rec = {"task_id": t.task_id, "sample": i, "completion": c, "status": r.status, "passed": r.passed,
                       **({"mode": t.meta["mode"]} if "mode" in t.meta else {})}
                done[(t.task_id, i)] = rec
                f.write(json.dumps(rec) + "\n")
                f.flush()
                bar.update(1)
    bar.close()
    return summarize([done[(t.task_id, i)] for t in tasks for i in range(s.n_samples)])


def summarize(records: list[dict]) -> dict:
    """pass@k over tasks, plus counts of each sandbox status."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    statuses: dict[str, int] = defaultdict(int)
    for r in records:
        per_task[r["task_id"]].append(bool(r["passed"]))
        statuses[r["status"]] += 1
    counts = [(len(v), sum(v)) for v in per_task.values()]
    return {"n_tasks": len(per_task), "n_samples": sum(n for n, _ in counts), **mean_pass_at_k(counts),
            "statuses": dict(statuses)}


def check_references(tasks: list[Task], timeout: float = 10.0, workers: int | None = None) -> list[tuple[Task, sandbox.Result]]:
    """Run every task with its ground-truth completion (canonical solution / middle)."""
    results = sandbox.run_many([t.program(t.reference) for t in tasks], timeout, workers)
    return list(zip(tasks, results))
