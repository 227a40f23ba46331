"""Code corpora for training: read, deduplicate, split by file, tokenise in worker processes,
apply FIM, pack into fixed-length sequences."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer
from .fim import document_tokens

CODE_EXTENSIONS = (".py",)


@dataclass
class Document:
    name: str
    text: str


def read_documents(source: str | os.PathLike, extensions: tuple[str, ...] = CODE_EXTENSIONS,
                   field: str | None = None) -> Iterator[Document]:
    """Source files under a folder (sorted, recursive), or rows of a JSONL/Parquet file (``text``
    or ``content`` column, or ``field``). Undecodable files are skipped by name."""
    path = Path(source)
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.suffix in extensions and p.is_file():
                try:
                    yield Document(str(p.relative_to(path)), p.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, OSError):
                    continue
        return
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or file (give a source folder, a .jsonl or a .parquet file)")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading .parquet needs pyarrow: pip install 'dinollama[parquet]'") from None

        table = pq.read_table(path)
        col = field or next((c for c in ("text", "content") if c in table.column_names), None)
        if col is None:
            raise ValueError(f"{path}: no 'text' or 'content' column; pass the column name")
        for i, text in enumerate(table.column(col).to_pylist()):
            yield Document(f"{path.name}:{i}", text or "")
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            col = field or next((c for c in ("text", "content") if c in row), None)
            if col is None:
                raise ValueError(f"{path}:{i + 1}: no 'text' or 'content' field")
            yield Document(str(row.get("path", row.get("name", f"{path.name}:{i}"))), row[col])


def deduplicate(docs: Iterable[Document]) -> Iterator[Document]:
    """Drop documents whose exact content (sha256) was seen before."""
    seen: set[bytes] = set()
    for d in docs:
        h = hashlib.sha256(d.text.encode()).digest()
        if h not in seen:
            seen.add(h)
            yield d


def is_heldout(name: str, fraction: float, seed: int = 0) -> bool:
    """A stable by-file split: the same file is held out whatever else is in the corpus."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_long(doc: Document, max_chars: int) -> list[Document]:
    """Cut a long file into pieces of about ``max_chars`` at blank lines: preferably before an
    unindented line (a top-level unit), else at any blank line once a piece has grown too long,
    so that short contexts still see whole units."""
    if len(doc.text) <= max_chars:
        return [doc]
    lines = doc.text.splitlines(keepends=True)
    pieces, cur, size = [], [], 0
    for i, line in enumerate(lines):
        after_blank = i > 0 and lines[i - 1].strip() == "" and line.strip() != ""
        top_level = line[:1] not in (" ", "\t")
        if cur and after_blank and ((top_level and size + len(line) > max_chars) or size > max_chars):
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    pieces.append("".join(cur))
    return [Document(f"{doc.name}#{j}", p) for j, p in enumerate(pieces) if p.strip()]


_TOKENIZER: Tokenizer | None = None


def _init_worker(model_file: str) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(model_file)


def _encode(item: tuple[int, str, str], seed: int, fim_rate: float, spm_rate: float, max_tokens: int) -> tuple[list[int], str]:
    index, name, text = item
    rng = random.Random(f"{seed}:{name}:{index}")
    return document_tokens(_TOKENIZER, text, rng, fim_rate, spm_rate, max_tokens)


def tokenize_documents(docs: list[Document], model_file: str, seq_len: int, seed: int = 0, fim_rate: float = 0.9,
                       spm_rate: float = 0.5, workers: int = 1) -> Iterator[tuple[list[int], str]]:
    """``(tokens, layout)`` per document in order; FIM draws are seeded by (seed, name, index)."""
    items = [(i, d.name, d.text) for i, d in enumerate(docs)]
    fn = partial(_encode, seed=seed, fim_rate=fim_rate, spm_rate=spm_rate, max_tokens=seq_len + 1)
    if workers <= 1:
        _init_worker(model_file)
        yield from map(fn, items)
        return
    with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(model_file,)) as pool:
        yield from pool.imap(fn, items, chunksize=16)


def pack(documents: Iterable[tuple[list[int], str]], seq_len: int) -> Iterator[np.ndarray]:
    """Fixed windows of ``seq_len + 1`` tokens (inputs and shifted targets) over the concatenated
    documents. Plain documents may be cut across windows; a FIM document never is: if it does not
    fit the current window it waits and opens the next one, ahead of the cut plain document's tail
    (which has lost its context at the window edge anyway)."""
    width = seq_len + 1
    cur: list[int] = []
    waiting: deque[list[int]] = deque()
    for tokens, layout in documents:
        if layout != "plain" and len(tokens) > width:
            raise ValueError(f"a {layout} document of {len(tokens)} tokens cannot fit a {width}-token window; "
                             "documents longer than one context must stay plain")
        if layout != "plain" and len(cur) + len(tokens) > width:
            waiting.append(tokens)
            continue
        cur += tokens
        while len(cur) >= width:
            yield np.asarray(cur[:width], dtype=np.int32)
            tail, cur = cur[width:], []
            while waiting and len(cur) + len(waiting[0]) <= width:
                cur += waiting.popleft()
            cur += tail
    while waiting:  # the end of the corpus: the last partial window is dropped, as usual
        if len(cur) + len(waiting[0]) > width:
            cur = []
        cur += waiting.popleft()
        if len(cur) == width:
            yield np.asarray(cur, dtype=np.int32)
            cur = []


def _save_windows(windows: list[np.ndarray], path: Path, width: int) -> int:
    arr = np.stack(windows) if windows else np.zeros((0, width), dtype=np.int32)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return len(arr)


def prepare_corpus(source: str | os.PathLike, tokenizer_file: str | os.PathLike, out_dir: str | os.PathLike,
                   seq_len: int = 512, heldout: float = 0.05, max_doc_chars: int | None = None, seed: int = 0,
                   fim_rate: float = 0.9, spm_rate: float = 0.5, workers: int = 1, progress: bool = True) -> dict:
    """Read, deduplicate, split by file, tokenise (with FIM for training), pack, and write
    ``train.npy`` / ``val.npy`` windows of ``seq_len + 1`` tokens plus ``stats.json``.

    Held-out windows are plain code (no FIM): their loss is the perplexity the README reports.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = [], []
    n_files = 0
    for d in tqdm(deduplicate(read_documents(source)), desc="read", disable=not progress, unit="file"):
        n_files += 1
        pieces = split_long(d, max_doc_chars) if max_doc_chars else [d]
        (val_docs if is_heldout(d.name, heldout, seed) else train_docs).extend(pieces)
    if not train_docs:
        raise ValueError(f"{source}: no training documents found")
    layouts: dict[str, int] = {}

    def counted(stream):
        for tokens, layout in stream:
            layouts[layout] = layouts.get(layout, 0) + 1
            yield tokens, layout

    model_file = str(tokenizer_file)
    order = random.Random(seed).sample(range(len(train_docs)), len(train_docs))  # mix files across the corpus
    train_docs = [train_docs[i] for i in order]
    bar = tqdm(desc="tokenize", total=len(train_docs) + len(val_docs), disable=not progress, unit="doc")
    stream = tokenize_documents(train_docs, model_file, seq_len, seed, fim_rate, spm_rate, workers)
    train = list(pack(counted(_ticking(stream, bar)), seq_len))
    val_stream = tokenize_documents(val_docs, model_file, seq_len, seed, 0.0, 0.0, workers)
    val = list(pack(_ticking(val_stream, bar), seq_len))
    bar.close()
    stats = {"files": n_files, "train_documents": len(train_docs), "val_documents": len(val_docs),
             "train_windows": _save_windows(train, out / "train.npy", seq_len + 1),
             "val_windows": _save_windows(val, out / "val.npy", seq_len + 1), "seq_len": seq_len,
             "train_tokens": len(train) * (seq_len + 1), "val_tokens": len(val) * (seq_len + 1),
             "layouts": layouts, "heldout_files": sorted({d.name.split("#")[0] for d in val_docs}),
             "tokenizer": model_file, "fim_rate": fim_rate, "spm_rate": spm_rate}
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def _ticking(stream, bar):
    for item in stream:
        bar.update(1)
        yield item


def prepare_dialogs(dialogs_file: str | os.PathLike, tokenizer_file: str | os.PathLike, out_dir: str | os.PathLike,
                    seq_len: int = 512, heldout: float = 0.05, seed: int = 0) -> dict:
    """One dialog per window (cut to ``seq_len + 1`` tokens, padded with ``</s>`` that carries no
    loss): ``train.npy`` / ``val.npy`` tokens and ``*.targets.npy`` with -100 outside answers."""
    from .sft import IGNORE, dialog_tokens, read_dialogs

    tok = Tokenizer(tokenizer_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = seq_len + 1
    split: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for i, dialog in enumerate(read_dialogs(dialogs_file)):
        tokens, targets = dialog_tokens(tok, dialog)
        tokens, targets = tokens[:width], targets[:width]
        pad = width - len(tokens)
        which = "val" if is_heldout(f"dialog:{i}", heldout, seed) else "train"
        split[which][0].append(np.asarray(tokens + [tok.eos_id] * pad, dtype=np.int32))
        split[which][1].append(np.asarray(targets + [IGNORE] * pad, dtype=np.int32))
    counts = {}
    for name, (toks, tgts) in split.items():
        counts[f"{name}_windows"] = _save_windows(toks, out / f"{name}.npy", width)
        _save_windows(tgts, out / f"{name}.targets.npy", width)
    (out / "stats.json").write_text(json.dumps({**counts, "seq_len": seq_len, "tokenizer": str(tokenizer_file)}))
    return counts


def train_tokenizer(source: str | os.PathLike, model_prefix: str | os.PathLike, vocab_size: int = 16000,
                    max_sentences: int = 2_000_000, threads: int | None = None) -> Path:
    """A SentencePiece BPE tokenizer with the Llama 2 settings (byte fallback, split digits,
    identity normalisation, whitespace kept) plus the Code Llama infilling pieces as control symbols
    (never produced from text, only by id)."""
    import sentencepiece as spm

    lines = (line for d in deduplicate(read_documents(source)) for line in d.text.splitlines() if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(model_prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, character_coverage=0.99995,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=4096,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"],
        num_threads=threads or os.cpu_count() or 1, minloglevel=2,
    )
    return Path(f"{model_prefix}.model")
