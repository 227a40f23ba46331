"""The DINOv2 k-NN classifier: cosine similarity, top-k neighbours weighted by softmax(sim / T)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_topk(train: Tensor, test: Tensor, k: int, test_chunk: int = 1024, train_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Top-``k`` cosine similarities and train indices per test row, in bounded memory.

    Both sets are L2-normalised here; the similarity matrix is never held whole: a running top-k is
    merged over train chunks, so 1M x 50k features need about ``test_chunk x train_chunk`` floats
    beyond the inputs.
    """
    test = F.normalize(test.float(), dim=1)
    k = min(k, len(train))
    sims_out, idx_out = [], []
    for t0 in range(0, len(test), test_chunk):
        q = test[t0 : t0 + test_chunk]
        best_s = q.new_full((len(q), 0), float("-inf"))
        best_i = torch.zeros(len(q), 0, dtype=torch.long, device=q.device)
        for r0 in range(0, len(train), train_chunk):
            # Normalised chunk by chunk (no full copy of train); each chunk's own top-k is merged
            # into the running one, so only (len(q), 2k) candidates are ever sorted together.
            s = q @ F.normalize(train[r0 : r0 + train_chunk].float(), dim=1).T
            s_top, i_top = s.topk(min(k, s.shape[1]), dim=1)
            cand_s, cand_i = torch.cat([best_s, s_top], dim=1), torch.cat([best_i, i_top + r0], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


def knn_votes(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    test_chunk: int = 1024,
) -> dict[int, Tensor]:
    """Class votes ``(n_test, C)`` per ``k``, as the official ``KnnModule``.

    Vote weights are ``softmax(topk_sims / T)`` over the ``max(ks)`` nearest neighbours; the votes
    for ``k`` sum the weights of the first ``k`` of them per class.
    """
    labels = train_labels.long()
    c = num_classes or int(labels.max()) + 1
    max_k = min(max(ks), len(train_features))
    out: dict[int, list[Tensor]] = {k: [] for k in ks}
    for t0 in range(0, len(test_features), test_chunk):
        sims, idx = knn_topk(train_features, test_features[t0 : t0 + test_chunk], max_k, test_chunk)
        weights = (sims / temperature).softmax(dim=1)
        neighbour_labels = labels[idx]
        for k in ks:
            kk = min(k, max_k)
            out[k].append(weights.new_zeros(len(weights), c).scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk]))
    return {k: torch.cat(v) for k, v in out.items()}


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    test_chunk: int = 1024,
) -> dict[int, Tensor]:
    """Predicted labels per ``k``: the argmax of :func:`knn_votes`."""
    votes = knn_votes(train_features, train_labels, test_features, ks, temperature, num_classes, test_chunk)
    return {k: v.argmax(dim=1) for k, v in votes.items()}


def topk_accuracy(votes: Tensor, labels: Tensor, k: int = 5) -> float:
    """Share of rows whose true label is among the ``k`` highest votes."""
    top = votes.topk(min(k, votes.shape[1]), dim=1).indices
    return (top == labels.view(-1, 1)).any(dim=1).float().mean().item()


def few_shot_indices(labels: Tensor, n_per_class: int, seed: int) -> Tensor:
    """``n_per_class`` random training indices of every class (all of a smaller class), as a sorted index."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:n_per_class]])
    return torch.cat(picks).sort().values
