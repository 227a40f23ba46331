"""Image retrieval scored with the revisited Oxford/Paris protocol (Radenovic et al. 2018).

Ground truth per query, in the revisited ``gnd`` format: ``{"easy": [...], "hard": [...], "junk": [...]}``
(database indices). Setups: Easy (positives easy; hard and junk ignored), Medium (easy + hard; junk
ignored), Hard (hard; easy and junk ignored). A query with no positives is left out of the mean.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SETUPS = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)), "hard": (("hard",), ("junk", "easy"))}


def average_precision(pos_ranks: np.ndarray, n_positives: int) -> float:
    """AP by the trapezoid rule over 0-based ranks of the positives (junk already removed)."""
    ap = 0.0
    for j, rank in enumerate(pos_ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / (2.0 * n_positives)
    return ap


def _query_scores(order: np.ndarray, ok: Sequence[int], junk: Sequence[int], kappas: Sequence[int]) -> tuple[float, list[float]]:
    is_ok, is_junk = np.isin(order, list(ok)), np.isin(order, list(junk))
    pos = np.flatnonzero(is_ok)
    junk_before = np.cumsum(is_junk)[pos] if len(pos) else pos  # junk ranked above each positive
    pos = pos - junk_before
    if not len(pos):  # no positive within a truncated ranking
        return 0.0, [0.0] * len(kappas)
    ap = average_precision(pos, len(ok))
    pos1 = pos + 1
    prs = [float((pos1 <= min(pos1.max(), k)).sum() / min(pos1.max(), k)) for k in kappas]
    return ap, prs


def retrieval_map(scores_or_ranks, ground_truth: list[dict], kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP and mP@k for the Easy/Medium/Hard setups.

    ``scores_or_ranks``: similarity scores ``(n_queries, n_db)`` (higher is better), or integer
    ranks ``(n_queries, n_db)`` listing database indices best first. A ground-truth entry with an
    ``"ok"`` key instead is scored as one setup, ``"custom"``.
    """
    x = torch.as_tensor(scores_or_ranks)
    order = (x.argsort(dim=1, descending=True, stable=True) if x.is_floating_point() else x).cpu().numpy()
    if len(order) != len(ground_truth):
        raise ValueError(f"{len(order)} queries in the scores but {len(ground_truth)} ground-truth entries")
    setups = {"custom": (("ok",), ("junk",))} if "ok" in ground_truth[0] else SETUPS
    report = {}
    for name, (ok_keys, junk_keys) in setups.items():
        aps, prs = [], []
        for row, g in zip(order, ground_truth):
            ok = [i for key in ok_keys for i in g.get(key, [])]
            if not ok:
                continue
            ap, pr = _query_scores(row, ok, [i for key in junk_keys for i in g.get(key, [])], kappas)
            aps.append(ap)
            prs.append(pr)
        mean_pr = np.mean(prs, axis=0) if prs else [float("nan")] * len(kappas)
        report[name] = {"mAP": float(np.mean(aps)) if aps else float("nan"), "queries": len(aps),
                        **{f"mP@{k}": float(v) for k, v in zip(kappas, mean_pr)}}
    return report


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a ground-truth file must not run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a ground-truth file")
        return super().find_class(module, name)


@dataclass
class GroundTruth:
    """Query and database image paths, per-query ``easy/hard/junk`` lists and optional query boxes."""

    query_paths: list[Path]
    db_paths: list[Path]
    entries: list[dict]
    boxes: list[list[float]] | None


def _find(folder: Path, name: str, where: str) -> Path:
    for candidate in (folder / name, *(folder / f"{name}{ext}" for ext in (".jpg", ".jpeg", ".png"))):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{where}: image {name!r} not found in {folder}")


def load_ground_truth(gnd_file: str | os.PathLike, queries_dir: str | os.PathLike,
                      database_dir: str | os.PathLike) -> GroundTruth:
    """A revisited ``gnd_<dataset>.pkl`` (or the same structure as JSON): ``qimlist``, ``imlist`` and ``gnd``
    (per query ``easy``/``hard``/``junk`` database indices and a ``bbx`` crop box), images found by name."""
    gnd_file = Path(gnd_file)
    if gnd_file.suffix == ".json":
        cfg = json.loads(gnd_file.read_text())
    else:
        with open(gnd_file, "rb") as f:
            cfg = _PlainUnpickler(f).load()
    missing = [k for k in ("qimlist", "imlist", "gnd") if k not in cfg]
    if missing:
        raise ValueError(f"{gnd_file}: missing {missing} (expected the revisited gnd format)")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{gnd_file}: {len(cfg['gnd'])} ground-truth entries for {len(cfg['qimlist'])} queries")
    entries = [{k: [int(i) for i in np.asarray(g[k]).ravel()] for k in ("easy", "hard", "junk", "ok") if k in g}
               for g in cfg["gnd"]]
    boxes = [[float(v) for v in np.asarray(g["bbx"]).ravel()] for g in cfg["gnd"]] if all(
        g.get("bbx") is not None for g in cfg["gnd"]) else None
    return GroundTruth([_find(Path(queries_dir), q, str(gnd_file)) for q in cfg["qimlist"]],
                       [_find(Path(database_dir), d, str(gnd_file)) for d in cfg["imlist"]], entries, boxes)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def rank_database(queries: torch.Tensor, database: torch.Tensor, topk: int | None = None, backend: str = "auto",
                  chunk: int = 1024) -> torch.Tensor:
    """Database indices best first per query, by cosine similarity (features L2-normalised here).

    ``backend="auto"`` uses faiss's exact inner-product index when faiss is installed and the database
    holds at least 50,000 images, chunked torch matmuls otherwise; ``topk`` truncates the ranking (positives
    beyond it count as not retrieved).
    """
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    db = torch.nn.functional.normalize(database.float(), dim=1)
    k = len(db) if topk is None else min(topk, len(db))
    faiss = _faiss()
    if backend == "auto":
        backend = "faiss" if faiss is not None and len(db) >= 50_000 else "torch"
    if backend == "faiss":
        if faiss is None:
            raise ValueError("backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu)")
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db.numpy())
        return torch.from_numpy(index.search(q.numpy(), k)[1]).long()
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', not {backend!r}")
    out = []
    for start in range(0, len(q), chunk):
        scores = q[start : start + chunk] @ db.T
        out.append(scores.topk(k, dim=1).indices if k < len(db) else scores.argsort(dim=1, descending=True, stable=True))
    return torch.cat(out)
