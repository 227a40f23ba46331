#!/usr/bin/env bash
# Reproduces the two shipped default models on a 2-core CPU (run from the repository root after `make test`).
# Logs and checkpoints go to runs/; the exported files are then copied into the package.
set -euo pipefail
BIN=.venv/bin

# Vision: a 2.7M-parameter ViT/14 at 56 px, DINOv2 recipe (DINO + iBOT + KoLeo), Fashion-MNIST's 60k training
# images (Debian's dataset-fashion-mnist; 2,000 held out for the k-NN monitor), 8 epochs, about 70 minutes.
$BIN/dinollama train ssl --preset fmnist-tiny --data fashion-mnist --output runs/fmnist-tiny-v2
cp runs/fmnist-tiny-v2/backbone.safetensors src/dinollama/dinov2/weights/default.safetensors
$BIN/python scripts/dinov2_default_report.py runs/fmnist-tiny-v2/backbone.safetensors

# Code: a SentencePiece BPE tokenizer (8,000 pieces + the infilling pieces) and a ~10M-parameter
# Code-Llama-architecture model trained with FIM on the CPython 3.11 standard library (5% of files held out).
# The corpus: every .py file of this interpreter's standard library (3.11.7 here), site-packages excluded.
CORPUS=${CORPUS:-runs/cpython-stdlib}
[ -d "$CORPUS" ] || $BIN/python - "$CORPUS" <<'PY'
import pathlib, shutil, sys, sysconfig
src, dst = pathlib.Path(sysconfig.get_paths()["stdlib"]), pathlib.Path(sys.argv[1])
for f in src.rglob("*.py"):
    if "site-packages" not in f.parts:
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / f.relative_to(src))
PY
ITERS=${ITERS:-650}
$BIN/dinollama train tokenizer --data "$CORPUS" --output runs/code/tokenizer --vocab-size 8000
$BIN/dinollama train code --data "$CORPUS" --tokenizer runs/code/tokenizer.model --output runs/code \
    --dim 256 --layers 8 --heads 4 --seq-len 512 --max-doc-chars 1200 \
    --set max_iters="$ITERS" --set batch_size=16 --set lr=1e-3 --set warmup_iters=30 \
    --set eval_every=100 --set save_every=50 --set log_every=10
# The shipped weights then continued for 150 iterations on freshly prepared data: the first run's FIM documents
# carried two stray byte tokens (encode_infilling assumed the marker was one piece, which it is not in a new
# vocabulary; fixed before this step). A fresh run of the fixed code does not need this step.
$BIN/dinollama train code --init runs/code/model --data "$CORPUS" --output runs/code-ft --seq-len 512 \
    --max-doc-chars 1200 --set max_iters=150 --set batch_size=16 --set lr=3e-4 --set warmup_iters=10 \
    --set eval_every=75 --set save_every=50 --set log_every=10 --set seed=1
# Then 650 more iterations (a new warm-up + cosine at lr 5e-4, another shuffle) on the same prepared data.
mkdir -p runs/code-ft2/data && cp runs/code-ft/data/* runs/code-ft2/data/
$BIN/dinollama train code --init runs/code-ft/model --data "$CORPUS" --output runs/code-ft2 --seq-len 512 \
    --max-doc-chars 1200 --set max_iters=650 --set batch_size=16 --set lr=5e-4 --set warmup_iters=20 \
    --set eval_every=325 --set save_every=50 --set log_every=10 --set seed=2
# Then 1,800 more (warm-up + cosine at lr 5e-4, another shuffle) on the same prepared data.
mkdir -p runs/code-ft3/data && cp runs/code-ft2/data/* runs/code-ft3/data/
$BIN/dinollama train code --init runs/code-ft2/model --data "$CORPUS" --output runs/code-ft3 --seq-len 512 \
    --max-doc-chars 1200 --set max_iters=1800 --set batch_size=16 --set lr=5e-4 --set warmup_iters=20 \
    --set eval_every=600 --set save_every=50 --set log_every=10 --set seed=3
$BIN/python scripts/code_model_report.py runs/code-ft3 "$CORPUS" \
    --snippets src/dinollama/codellama/weights/default/heldout_snippets.json
$BIN/python scripts/export_code_model.py runs/code-ft3/model src/dinollama/codellama/weights/default
