"""The sandbox contains hostile programs; HumanEval references pass; pass@k matches enumeration."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from dinollama.codellama import sandbox
from dinollama.codellama.eval import (
    Task, check_references, infilling_tasks, load_humaneval, load_mbpp, mbpp_prompt, pass_at_k, run_benchmark, summarize,
)

# The private user id and namespaces need root and an interpreter other users can read.
ROOT = os.geteuid() == 0 and sandbox.sandbox_python()[1]


def _sandbox_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "uid=,stat=,pid=,args="], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if int(ln.split()[0]) >= sandbox.BASE_UID and not ln.split()[1].startswith("Z")]


def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))
                direct = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12)
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - math.comb(190, 100) / math.comb(200, 100), rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_simple_programs():
    assert sandbox.run("print('hi')").passed
    r = sandbox.run("assert 1 == 2")
    assert r.status == "failed" and "AssertionError" in r.stderr
    assert sandbox.run("raise SystemExit(3)").status == "failed"


@pytest.mark.parametrize("guard", [True, False])
def test_infinite_loop_times_out(guard):
    t = time.monotonic()
    r = sandbox.run("while True:\n    pass\n", timeout=1.0, guard=guard)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("guard", [True, False])
def test_fork_storm_is_contained(guard):
    program = "import os, time\nfor _ in range(100):\n    try:\n        os.fork()\n    except Exception:\n        pass\ntime.sleep(30)\n"
    r = sandbox.run(program, timeout=1.0, guard=guard)
    assert not r.passed
    if ROOT:
        assert _sandbox_processes() == []


def test_detached_child_is_killed_when_the_program_ends():
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    r = sandbox.run(program, timeout=3.0, guard=False)
    assert r.passed and "parent done" in r.stdout
    if ROOT:
        assert _sandbox_processes() == []


def test_memory_limit():
    r = sandbox.run("x = bytearray(8 * 1024**3)\n", timeout=5.0)
    assert r.status in ("failed", "killed") and not r.passed


def test_huge_output_is_truncated():
    r = sandbox.run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 100000)\n", timeout=5.0,
                    limits=sandbox.Limits(output_bytes=1000))
    assert r.passed and len(r.stdout) < 2000 and "truncated" in r.stdout


def test_file_system_is_protected(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "written.txt"
    assert not sandbox.run(f"import os\nos.remove({str(victim)!r})\n").passed
    if ROOT:  # without root there is no private user or mount namespace: only the guard's layer
        for guard in (True, False):
            assert not sandbox.run(f"import os\nos.remove({str(victim)!r})\n", guard=guard).passed
            assert not sandbox.run(f"open({str(outside)!r}, 'w').write('x')\n", guard=guard).passed
    assert victim.read_text() == "keep me" and not outside.exists()
    # The program's own working directory is writable and removed afterwards.
    r = sandbox.run("import os\nopen('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())\n")
    assert r.passed and r.stdout.strip() == "ok"


def test_no_network():
    for guard in (True, False):
        r = sandbox.run("import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 53))\nprint('connected')\n",
                        timeout=5.0, guard=guard)
        assert not r.passed and "connected" not in r.stdout


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("DINOLLAMA_TEST_SECRET", "hunter2")
    r = sandbox.run("import os\nprint(dict(os.environ))\n")
    assert r.passed and "hunter2" not in r.stdout and "DINOLLAMA_SANDBOX_TOKEN" not in r.stdout


def test_early_exit_is_a_failure():
    assert sandbox.run("import os\nos._exit(0)\nassert False\n").status == "failed"
    if ROOT:  # without the guard os._exit works; the missing end marker still fails the program
        r = sandbox.run("import os\nos._exit(0)\nassert False\n", guard=False)
        assert r.status == "failed" and "before reaching its end" in r.stderr


def test_killing_the_parent_fails_harmlessly():
    for guard in (True, False):
        r = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", guard=guard)
        if guard or ROOT:
            assert not r.passed
    assert sandbox.run("print(1)").passed  # still alive


def test_humaneval_references_pass_and_stubs_fail():
    tasks = load_humaneval()
    assert len(tasks) == 164
    results = check_references(tasks, workers=2)
    assert [t.task_id for t, r in results if not r.passed] == []
    stubs = list(sandbox.run_many([t.program("    pass\n") for t in tasks], 3.0, workers=2))
    assert [t.task_id for t, r in zip(tasks, stubs) if r.passed] == []


def test_infilling_tasks():
    problems = load_humaneval()
    counts = {m: len(infilling_tasks(problems, m)) for m in ("single-line", "multi-line", "random-span")}
    assert counts == {"single-line": 1033, "multi-line": 5815, "random-span": 1640}
    tasks = infilling_tasks(problems[:8], "single-line") + infilling_tasks(problems[:4], "random-span")
    for t in tasks:
        p = next(p for p in problems if p.task_id == t.meta["problem"])
        assert t.prefix + t.reference + t.suffix == p.prompt + p.reference
    results = check_references(tasks, workers=2)
    assert all(r.passed for _, r in results)
    assert not sandbox.run(tasks[0].program("")).passed or tasks[0].reference.strip() == ""


def test_mbpp_loader_and_prompt(tmp_path):
    rows = [{"task_id": i, "text": f"Write a function f{i} returning {i}.", "code": f"def f{i}():\n    return {i}",
             "test_list": [f"assert f{i}() == {i}"], "test_setup_code": ""} for i in range(1, 13)]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    tasks = load_mbpp(path)
    assert [t.task_id for t in tasks] == ["MBPP/11", "MBPP/12"]
    prompt = tasks[0].prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Write a function f2")
    assert mbpp_prompt("t", ["assert x"]) == ("You are an expert Python programmer, and here is your task: t Your code "
                                               "should pass these tests:\n\nassert x\n[BEGIN]\n")
    assert all(r.passed for _, r in check_references(tasks))


def test_run_benchmark_resumes(tmp_path):
    class FakeGenerator:
        calls = 0
        model = type("M", (), {"params": type("P", (), {"max_seq_len": 4096})()})()
        tokenizer = type("T", (), {"encode": lambda self, s, bos, eos: s.split()})()

        def text_completion(self, prompts, params):
            FakeGenerator.calls += len(prompts)
            return ["    return 1\n" if "one" in p else "    return 0\n" for p in prompts]

    tasks = [Task(f"T/{i}", prompt=f"def f():\n    '''{'one' if i % 2 else 'zero'}'''\n", test="def check(f):\n    assert f() == 1\n",
                  entry_point="f") for i in range(4)]
    out = tmp_path / "res.jsonl"
    from dinollama.codellama.eval import EvalSettings

    s = run_benchmark(FakeGenerator(), tasks[:2], out, EvalSettings(batch_size=2), progress=False)
    assert FakeGenerator.calls == 2 and s["pass@1"] == 0.5
    s = run_benchmark(FakeGenerator(), tasks, out, EvalSettings(batch_size=2), progress=False)
    assert FakeGenerator.calls == 4 and s["pass@1"] == 0.5 and s["n_tasks"] == 4
    assert summarize([{"task_id": "a", "passed": True, "status": "passed"}])["pass@1"] == 1.0


def test_eval_cli_pipeline_with_a_small_model(tmp_path, capsys):
    """Generator -> sandbox -> pass@k -> report, through the CLI, resumable (a random 2-layer model
    stands in until a trained default code model is shipped)."""
    import json

    import torch

    from dinollama.cli.main import main
    from dinollama.codellama import ModelArgs, Tokenizer, build, save_native

    data = Path(__file__).parent / "data"
    torch.manual_seed(0)
    model = build(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, multiple_of=32, max_seq_len=1024))
    folder = save_native(model, tmp_path / "m", Tokenizer(data / "codellama_tokenizer.model"))
    out = tmp_path / "he.jsonl"
    common = ["--model", str(folder), "--limit", "3", "--max-new-tokens", "6", "--dtype", "fp32", "--quiet", "--workers", "2"]
    assert main(["eval", "humaneval", *common, "--output", str(out)]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["n_tasks"] == 3 and summary["pass@1"] == 0.0 and sum(summary["statuses"].values()) == 3
    assert "pass@1" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
    assert main(["eval", "humaneval", *common, "--output", str(out)]) == 0  # resumed: nothing generated again
    assert len(out.read_text().splitlines()) == 3
    inf = tmp_path / "inf.jsonl"
    assert main(["eval", "infilling", *common, "--suffix-first", "--output", str(inf)]) == 0
    rows = [json.loads(x) for x in inf.read_text().splitlines()]
    assert len(rows) == 3 and all(r["mode"] == "single-line" for r in rows)
    assert main(["eval", "mbpp", "--model", str(folder)]) == 2  # no local MBPP file: a one-line error


def test_prompts_longer_than_the_context_fail_without_stopping_the_run(tmp_path):
    from dinollama.codellama.eval import EvalSettings

    class SmallContext:
        model = type("M", (), {"params": type("P", (), {"max_seq_len": 40})()})()
        tokenizer = type("T", (), {"encode": lambda self, s, bos, eos: s.split()})()
        seen: list = []

        def text_completion(self, prompts, params):
            SmallContext.seen.append(params.max_gen_len)
            return ["    return 1\n" for _ in prompts]

    short = Task("T/short", prompt="def f():\n", test="def check(f):\n    assert f() == 1\n", entry_point="f")
    long = Task("T/long", prompt="def f():\n" + "# x\n" * 100, test=short.test, entry_point="f")
    s = run_benchmark(SmallContext(), [short, long], tmp_path / "r.jsonl", EvalSettings(batch_size=2, max_new_tokens=512),
                      progress=False)
    assert s["pass@1"] == 0.5 and SmallContext.seen == [40 - 2]  # new tokens capped to the room left
