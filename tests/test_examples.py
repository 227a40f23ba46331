"""The runnable examples in examples/ run offline on the shipped models and print what they claim."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in the output:\n{text}"
    return float(found.group(1))


def test_vision_features_example(tmp_path):
    out = run_example("vision_features.py", "--out", str(tmp_path / "pca.png"), cwd=tmp_path)
    assert number(r"20-NN top-1: ([\d.]+)", out) > 0.7  # raw pixels reach 0.77 on these images
    assert number(r"logistic regression \(C=[\d.e-]+\) top-1: ([\d.]+)", out) > 0.7
    assert "patch tokens (8, 16, 192), attention (8, 3, 17, 17)" in out
    assert (tmp_path / "pca.png").stat().st_size > 0


def test_code_llama_example(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("code_llama.py", cwd=tmp_path)
    assert out.count("--- completion") == 2 and "--- infilling" in out and "--- streaming" in out
    assert "[INST] <<SYS>>\\nAnswer with code.\\n<</SYS>>\\n\\nReverse a list. [/INST]" in out
    assert number(r"vs transformers = ([\d.e+-]+)", out) < 1e-4


def test_checkpoints_example(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("checkpoints.py", cwd=tmp_path)
    assert number(r"from the cache: max \|diff\| ([\d.e+-]+)", out) == 0.0
    assert number(r"via torch.hub: ([\d.e+-]+)", out) == 0.0
    assert "OfflineError" in out and "dinov2_vitb14_reg4_pretrain.pth" in out
    assert number(r"safetensors round trip: max \|diff\| ([\d.e+-]+)", out) == 0.0
    assert number(r"Dinov2WithRegistersModel: max \|diff\| of the patch tokens ([\d.e+-]+)", out) <= 1e-4
