"""Logistic regression on frozen class tokens, the DINOv2 protocol.

L2-regularised multinomial logistic regression (L-BFGS, scikit-learn) on raw float64 features; C is
chosen from ``10 ** linspace(-6, 5, 45)`` by accuracy on a 10% holdout of train (seed 0), then the
model is refit on all of train with that C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

C_GRID = 10 ** np.linspace(-6, 5, 45)


@dataclass
class LogregResult:
    C: float
    holdout_accuracy: dict[float, float]
    model: object

    def predict(self, features) -> np.ndarray:
        return self.model.predict(np.asarray(features, dtype=np.float64))


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, tol=1e-12, solver="lbfgs").fit(x, y)


def train_logreg(train_features, train_labels, c_grid=C_GRID, holdout: float = 0.1, seed: int = 0,
                 max_iter: int = 1000) -> LogregResult:
    """Select C on a stratification-free random holdout of train, refit on all of train."""
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(holdout * len(x))))
    val, fit = perm[:n_val], perm[n_val:]
    scores = {float(c): float((_fit(x[fit], y[fit], c, max_iter).predict(x[val]) == y[val]).mean()) for c in c_grid}
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return LogregResult(best, scores, _fit(x, y, best, max_iter))
