"""The shipped default models: sizes, preprocessing, and that they beat their untrained selves."""

from __future__ import annotations

import json

import numpy as np
import torch

import dinollama.codellama as cl
import dinollama.dinov2 as d2
from dinollama.codellama.checkpoint import default_model_dir
from dinollama.data.mnist import load_fashion_mnist
from dinollama.dinov2.eval import knn_predict
from dinollama.dinov2.hub import default_weights_path, saved_config
from dinollama.dinov2.train.data import ArraySource
from dinollama.dinov2.train.monitor import embed_source


def test_default_backbone():
    model = d2.load("default")
    assert model.default_image_size == 56 and d2.default_transform(model).crop_size == 56
    assert default_weights_path().stat().st_size <= 15 * 2**20
    xtr, ytr = load_fashion_mnist("train", "mini")
    xte, yte = load_fashion_mnist("test", "mini")
    accs = {}
    torch.manual_seed(0)
    for name, m in {"trained": model, "random": d2.DinoVisionTransformer(saved_config(default_weights_path())).eval()}.items():
        ftr = embed_source(m, ArraySource(xtr, ytr), list(range(len(xtr))), torch.device("cpu"), None)
        fte = embed_source(m, ArraySource(xte, yte), list(range(len(xte))), torch.device("cpu"), None)
        accs[name] = float((knn_predict(ftr, torch.tensor(ytr), fte, ks=(20,))[20] == torch.tensor(yte)).float().mean())
    assert accs["trained"] > accs["random"] + 0.1, accs
    assert accs["trained"] > 0.7, accs
    rand = d2.load("default", weights=None)
    assert rand.embed_dim == model.embed_dim and not torch.equal(rand.pos_embed, model.pos_embed)


def test_default_code_model():
    folder = default_model_dir()
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 40 * 2**20
    model, tok = cl.load("default")
    assert tok is not None and tok.supports_infilling and 10e6 <= sum(p.numel() for p in model.parameters()) <= 30e6
    model = model.float().eval()
    snippets = json.loads((folder / "heldout_snippets.json").read_text())
    text = "".join(snippets[0][k] for k in ("prefix", "middle", "suffix"))
    ids = torch.tensor([tok.encode(text, True, False)[:256]])
    torch.manual_seed(0)
    untrained = cl.Transformer(model.params).eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(m.forward_train(ids[:, :-1])[0].float(), ids[0, 1:]).item()
                  for m in (model, untrained)]
    assert losses[0] < losses[1] - 2.0, losses  # held-out code is far more predictable after training
    gen = cl.Generator(model, tok)
    out = gen.text_infilling([snippets[0]["prefix"]], [snippets[0]["suffix"]], cl.SamplingParams(max_gen_len=24))[0]
    assert isinstance(out, str) and "<EOT>" not in out
    assert np.isfinite(losses).all()


def test_default_code_model_through_the_eval_pipeline(tmp_path, capsys):
    from dinollama.cli.main import main

    out = tmp_path / "he.jsonl"
    assert main(["eval", "humaneval", "--model", "default", "--limit", "4", "--max-new-tokens", "96", "--quiet",
                 "--output", str(out)]) == 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["n_tasks"] == 4 and sum(summary["statuses"].values()) == 4
