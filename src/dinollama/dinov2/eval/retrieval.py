"""Image retrieval scored with the revisited Oxford/Paris protocol (Radenovic et al. 2018).

Ground truth per query, in the revisited ``gnd`` format: ``{"easy": [...], "hard": [...], "junk": [...]}``
(database indices). Setups: Easy (positives easy; hard and junk ignored), Medium (easy + hard; junk
ignored), Hard (hard; easy and junk ignored). A query with no positives is left out of the mean.
"""

from __future__ import annotations

from typing import Sequence

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
