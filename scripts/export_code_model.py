"""Copy a trained code model folder into the package as bf16 safetensors (half the size).

    python scripts/export_code_model.py runs/code/model src/dinollama/codellama/weights/default
"""

from __future__ import annotations

import sys

import torch

from dinollama.codellama import load, save_native


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    model, tok = load(src)
    save_native(model.to(torch.bfloat16), dst, tok)
    print(dst)


if __name__ == "__main__":
    main()
