"""``dinollama train code|lcft|sft|tokenizer``: the Code Llama training recipes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import output_file, output_folder, positive_float, positive_int, unit_interval


def _overrides(pairs: list[str]) -> dict:
    from ..training import overrides_to_dict

    return overrides_to_dict(pairs)


def _prepare(args, tokenizer: Path) -> Path:
    from ..codellama.train import prepare_corpus, prepare_dialogs

    data = Path(args.output) / "data"
    if (data / "stats.json").exists():
        stats = json.loads((data / "stats.json").read_text())
        if stats.get("seq_len") != args.seq_len:
            raise ValueError(f"{data} was prepared for seq_len {stats.get('seq_len')}; use that or a new --output")
        return data
    if args.kind == "sft":
        prepare_dialogs(args.data, tokenizer, data, args.seq_len, args.heldout)
    else:
        prepare_corpus(args.data, tokenizer, data, args.seq_len, args.heldout, args.max_doc_chars,
                       fim_rate=0.0 if args.kind == "lcft" else args.fim_rate, workers=args.workers, progress=not args.quiet)
    return data


def _model(args):
    from ..codellama import ModelArgs, Transformer, load
    from ..codellama.train import with_context

    if args.init:
        model, tok = load(args.init)
        if tok is None:
            raise FileNotFoundError(f"{args.init}/tokenizer.model: the model folder needs its tokenizer")
        if args.kind == "lcft":
            model = with_context(model, args.rope_theta, args.seq_len)
        return model.float(), Path(tok.model_file)
    if args.kind != "code":
        raise ValueError(f"train {args.kind} continues from a model: pass --init MODEL_FOLDER")
    if not args.tokenizer:
        raise ValueError("a new model needs --tokenizer (train one with 'dinollama train tokenizer')")
    import torch

    from ..codellama import Tokenizer

    tok = Tokenizer(args.tokenizer)
    torch.manual_seed(int(_overrides(args.set).get("seed", 0)))  # a reproducible initialisation
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      vocab_size=tok.n_words, multiple_of=64, rope_theta=args.rope_theta, max_seq_len=args.seq_len)
    return Transformer(margs), Path(args.tokenizer)


def cmd_train_code(args) -> int:
    from ..codellama.train import CodeTrainConfig, CodeTrainer

    model, tokenizer = _model(args)
    data = _prepare(args, tokenizer)
    if args.prepare_only:
        print(f"prepared: {data}", file=sys.stderr)
        return 0
    cfg = CodeTrainConfig.from_dict({"seq_len": args.seq_len, **_overrides(args.set)})
    folder = CodeTrainer(model, cfg, data, args.output, tokenizer, progress=not args.quiet).run()
    print(f"model: {folder}", file=sys.stderr)
    return 0


def cmd_train_tokenizer(args) -> int:
    from ..codellama.train import train_tokenizer

    print(train_tokenizer(args.data, args.output, args.vocab_size))
    return 0


def register(kinds) -> None:
    helps = {"code": "code pre-training with fill-in-the-middle (new model, or continue with --init)",
             "lcft": "long-context fine-tuning: same weights, new rope_theta and longer sequences",
             "sft": "instruction tuning on chat JSONL ({'messages': [...]}), loss on assistant tokens"}
    for kind, text in helps.items():
        q = kinds.add_parser(kind, help=text, description=text)
        q.add_argument("--data", required=True, help="source folder, .jsonl or .parquet" if kind != "sft" else "dialogs .jsonl")
        q.add_argument("--output", required=True, type=output_folder, help="run folder: data/, checkpoint.pth (resumed), log.jsonl, model/")
        q.add_argument("--init", help="model folder to continue from (official, Hugging Face or ours)")
        q.add_argument("--seq-len", type=positive_int, default=16384 if kind == "lcft" else 512)
        q.add_argument("--rope-theta", type=positive_float, default=1e6 if kind == "lcft" else 1e4)
        q.add_argument("--heldout", type=unit_interval, default=0.05, help="fraction of files (dialogs) held out")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="training options, e.g. --set lr=3e-4 --set max_iters=2000 --set lora_rank=16 "
                            "--set parallel=fsdp --set activation_checkpointing=true")
        q.add_argument("--prepare-only", action="store_true", help="tokenise and pack the data, then stop")
        q.add_argument("--quiet", action="store_true")
        if kind == "code":
            q.add_argument("--tokenizer", help="SentencePiece model for a new model")
            q.add_argument("--dim", type=positive_int, default=384)
            q.add_argument("--layers", type=positive_int, default=6)
            q.add_argument("--heads", type=positive_int, default=6)
            q.add_argument("--kv-heads", type=positive_int, default=None)
            q.add_argument("--fim-rate", type=unit_interval, default=0.9)
        else:
            q.set_defaults(fim_rate=0.0, tokenizer=None)
        q.add_argument("--max-doc-chars", type=positive_int, default=None, help="cut long files at top-level boundaries")
        q.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
        q.set_defaults(func=cmd_train_code)
    q = kinds.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer (Llama 2 settings + infilling pieces)")
    q.add_argument("--data", required=True, help="source folder, .jsonl or .parquet")
    q.add_argument("--output", required=True, type=output_file, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    q.add_argument("--vocab-size", type=positive_int, default=16000)
    q.set_defaults(func=cmd_train_tokenizer)
