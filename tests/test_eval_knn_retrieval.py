"""k-NN vs brute force and scikit-learn; retrieval mAP on hand-made cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from dinollama.dinov2.eval import knn_predict, knn_topk, retrieval_map


def brute_force(train, labels, test, k, max_k, T):
    tr, te = F.normalize(train, dim=1), F.normalize(test, dim=1)
    sims = te @ tr.T
    preds = []
    for row in sims:
        order = torch.argsort(row, descending=True)[:max_k]
        w = torch.softmax(row[order] / T, 0)
        votes = torch.zeros(int(labels.max()) + 1)
        for j in range(k):
            votes[labels[order[j]]] += w[j]
        preds.append(int(votes.argmax()))
    return torch.tensor(preds)


def test_knn_equals_brute_force_with_chunking():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 16, generator=g), torch.randn(60, 16, generator=g)
    labels = torch.randint(0, 7, (500,), generator=g)
    got = knn_predict(train, labels, test, ks=(1, 10, 20, 100), test_chunk=17)
    for k in (1, 10, 20, 100):
        assert torch.equal(got[k], brute_force(train, labels, test, k, 100, 0.07))
    s_full, i_full = knn_topk(train, test, 30)
    s_chunk, i_chunk = knn_topk(train, test, 30, test_chunk=7, train_chunk=33)
    assert torch.allclose(s_full, s_chunk) and torch.equal(i_full, i_chunk)


def test_knn_matches_sklearn_where_they_coincide():
    """k=1 is the nearest neighbour for any weighting; sklearn's cosine 1-NN must agree."""
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 8, generator=g), torch.randn(80, 8, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    ours = knn_predict(train, labels, test, ks=(1,))[1]
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(train.numpy(), labels.numpy())
    assert np.array_equal(ours.numpy(), sk.predict(test.numpy()))
    # With a huge temperature the weights are uniform: majority vote = sklearn's uniform k-NN (no ties here).
    ours10 = knn_predict(train, labels, test, ks=(10,), temperature=1e9)[10]
    sk10 = KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute").fit(train.numpy(), labels.numpy())
    proba = sk10.predict_proba(test.numpy())
    unique = (np.sort(proba, 1)[:, -1] > np.sort(proba, 1)[:, -2])
    assert np.array_equal(ours10.numpy()[unique], sk10.predict(test.numpy())[unique])


def test_average_precision_hand_cases():
    # db order for the query: [p, n, p, n]: AP = ((1+1)/2 + (1/2 + 2/3)/2) / 2 = 0.7916...
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    r = retrieval_map(scores, [{"ok": [0, 2], "junk": []}])
    assert r["custom"]["mAP"] == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)
    assert r["custom"]["mP@1"] == 1.0 and r["custom"]["mP@5"] == pytest.approx(2 / 3)
    # a junk image ranked first is ignored: same AP as a perfect ranking of [p, n]
    r = retrieval_map(torch.tensor([[1, 0, 2]]), [{"ok": [0], "junk": [1]}])
    assert r["custom"]["mAP"] == 1.0


def test_revisited_setups():
    # ranking: easy, hard, negative, junk, easy
    ranks = torch.tensor([[0, 1, 2, 3, 4]])
    gnd = [{"easy": [0, 4], "hard": [1], "junk": [3]}]
    r = retrieval_map(ranks, gnd)
    # Easy: positives {0,4}, ignore {1,3} -> order [0, 2, 4]: ranks 0 and 2 -> AP = (1 + (1/2 + 2/3)/2)/2
    assert r["easy"]["mAP"] == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    # Medium: positives {0,1,4}, ignore {3} -> order [0,1,2,4]: ranks 0,1,3
    ap_med = (1 + 1 + (2 / 3 + 3 / 4) / 2) / 3
    assert r["medium"]["mAP"] == pytest.approx(ap_med)
    # Hard: positive {1}, ignore {0,3,4} -> order [1, 2]: rank 0 -> AP 1
    assert r["hard"]["mAP"] == pytest.approx(1.0)
    empty = retrieval_map(ranks, [{"easy": [], "hard": [], "junk": []}])
    assert np.isnan(empty["easy"]["mAP"]) and empty["easy"]["queries"] == 0


def test_logreg_selects_c_on_holdout_and_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    from dinollama.dinov2.eval import C_GRID, train_logreg

    assert len(C_GRID) == 45 and C_GRID[0] == pytest.approx(1e-6) and C_GRID[-1] == pytest.approx(1e5)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 10)) * 2
    y = rng.integers(0, 4, 400)
    x = centers[y] + rng.normal(size=(400, 10))
    grid = C_GRID[::8]
    res = train_logreg(x, y, c_grid=grid)
    perm = np.random.default_rng(0).permutation(400)
    val, fit = perm[:40], perm[40:]
    expected = {c: (LogisticRegression(C=c, max_iter=1000, tol=1e-12).fit(x[fit], y[fit]).predict(x[val]) == y[val]).mean()
                for c in grid}
    assert res.holdout_accuracy == pytest.approx(expected)
    assert res.holdout_accuracy[res.C] == max(expected.values())
    ref = LogisticRegression(C=res.C, max_iter=1000, tol=1e-12).fit(x, y)
    assert np.array_equal(res.predict(x), ref.predict(x))
    assert (res.predict(x) == y).mean() > 0.9


def test_top5_and_few_shot():
    from dinollama.dinov2.eval import few_shot_indices, knn_votes, topk_accuracy

    votes = torch.tensor([[0.1, 0.5, 0.2, 0.01, 0.02, 0.03, 0.3], [0.9, 0.0, 0.05, 0.01, 0.02, 0.03, 0.1]])
    labels = torch.tensor([0, 3])
    assert topk_accuracy(votes, labels, 1) == 0.0
    assert topk_accuracy(votes, labels, 5) == 0.5  # row 0: class 0 ranks 4th; row 1: class 3 ranks 6th
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = few_shot_indices(y, 5, seed=0)
    assert torch.bincount(y[idx]).tolist() == [5, 3, 5]
    assert torch.equal(idx, few_shot_indices(y, 5, seed=0)) and not torch.equal(idx, few_shot_indices(y, 5, seed=1))
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(100, 8, generator=g), torch.randn(10, 8, generator=g)
    v = knn_votes(train, torch.randint(0, 4, (100,), generator=g), test, ks=(5, 20))
    assert v[5].shape == (10, 4) and torch.allclose(v[20].sum(1), torch.ones(10) * v[20].sum(1)[0], atol=1e-5)
