"""Report of a code-model run: held-out perplexity (trained, untrained, unigram) and infilling
exact match and edit similarity on held-out single lines; optionally writes held-out snippets for the demo.

    python scripts/code_model_report.py RUN_DIR CORPUS_DIR [--lines 200] [--snippets OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dinollama.codellama import Transformer, load
from dinollama.codellama.train.report import (
    heldout_lines, infilled_lines, infilling_scores, model_perplexity, unigram_perplexity,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("corpus", type=Path)
    p.add_argument("--lines", type=int, default=200)
    p.add_argument("--max-windows", type=int, default=400)
    p.add_argument("--snippets", type=Path)
    args = p.parse_args()
    stats = json.loads((args.run / "data" / "stats.json").read_text())
    train = np.load(args.run / "data" / "train.npy", mmap_mode="r")
    val = np.load(args.run / "data" / "val.npy", mmap_mode="r")[: args.max_windows]
    model, tok = load(args.run / "model")
    torch.manual_seed(0)
    untrained = Transformer(model.params)
    report = {
        "heldout_files": len(stats["heldout_files"]), "val_windows": int(len(val)), "seq_len": stats["seq_len"],
        "train_tokens": stats["train_tokens"],
        "ppl_unigram": unigram_perplexity(np.asarray(train), np.asarray(val), model.params.vocab_size),
        "ppl_untrained": model_perplexity(untrained, val),
        "ppl_trained": model_perplexity(model, val),
    }
    texts = [(args.corpus / f).read_text() for f in stats["heldout_files"]]
    tasks = heldout_lines(texts, args.lines, seed=0, context_chars=350)
    report["infill_lines"] = len(tasks)
    for key, scores in (("", infilling_scores(infilled_lines(model, tok, tasks), tasks)),
                        ("_untrained", infilling_scores(infilled_lines(untrained, tok, tasks[:50]), tasks[:50]))):
        report[f"infill_exact_match{key}"] = scores["exact_match"]
        report[f"infill_edit_similarity{key}"] = scores["edit_similarity"]
    print(json.dumps(report, indent=2))
    (args.run / "report.json").write_text(json.dumps(report, indent=2))
    if args.snippets:
        picks = heldout_lines(texts, 6, seed=1, context_chars=300)
        args.snippets.write_text(json.dumps([t.__dict__ for t in picks], indent=1))


if __name__ == "__main__":
    main()
