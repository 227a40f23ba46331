"""Code Llama evaluation: HumanEval, MBPP and HumanEval-infilling pass@k with the sandbox."""

from .benchmarks import Task, humaneval_path, infilling_tasks, load_humaneval, load_mbpp, mbpp_prompt
from .passk import mean_pass_at_k, pass_at_k
from .runner import EvalSettings, check_references, run_benchmark, summarize

__all__ = [
    "EvalSettings", "Task", "check_references", "humaneval_path", "infilling_tasks", "load_humaneval", "load_mbpp",
    "mbpp_prompt", "mean_pass_at_k", "pass_at_k", "run_benchmark", "summarize",
]
