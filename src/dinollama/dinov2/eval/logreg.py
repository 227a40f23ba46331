"""Logistic regression on frozen class tokens, the DINOv2 protocol.

L2-regularised multinomial logistic regression (L-BFGS) on raw float64 features; C is chosen from
``10 ** linspace(-6, 5, 45)`` by accuracy on a 10% holdout of train (seed 0), then the model is refit
on all of train with that C. Two solvers of the same objective (``0.5 |W|^2 + C sum_i CE_i``, bias
not penalised): scikit-learn on CPU, and ``torch.optim.LBFGS`` for GPUs (the official code uses
cuML there), chosen by ``backend`` ("auto": torch when ``device`` is a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

C_GRID = 10 ** np.linspace(-6, 5, 45)


@dataclass
class LogregResult:
    C: float
    holdout_accuracy: dict[float, float]
    model: object

    def predict(self, features) -> np.ndarray:
        return self.model.predict(np.asarray(features, dtype=np.float64))


def _fit_sklearn(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, tol=1e-12, solver="lbfgs").fit(x, y)


@dataclass
class TorchLogreg:
    """A multinomial logistic regression fitted with ``torch.optim.LBFGS`` (float64, strong-Wolfe line search)."""

    coef_: torch.Tensor
    intercept_: torch.Tensor
    classes_: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float, max_iter: int, device: str = "cpu") -> TorchLogreg:
        classes, yi = np.unique(y, return_inverse=True)
        xt = torch.as_tensor(x, dtype=torch.float64, device=device)
        yt = torch.as_tensor(yi, device=device)
        w = torch.zeros(len(classes), xt.shape[1], dtype=torch.float64, device=device, requires_grad=True)
        b = torch.zeros(len(classes), dtype=torch.float64, device=device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                                history_size=10, line_search_fn="strong_wolfe")
        scale = 0.5 / (c * len(xt))  # the sklearn objective divided by C * N: same minimiser, O(1) values

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w.T + b, yt) + scale * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach(), b.detach(), classes)

    def predict(self, x: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(x, dtype=torch.float64, device=self.coef_.device)
        return self.classes_[(xt @ self.coef_.T + self.intercept_).argmax(1).cpu().numpy()]


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, backend: str, device: str):
    if backend == "torch":
        return TorchLogreg.fit(x, y, c, max_iter, device)
    if backend == "sklearn":
        return _fit_sklearn(x, y, c, max_iter)
    raise ValueError(f"backend must be 'auto', 'sklearn' or 'torch', not {backend!r}")


def train_logreg(train_features, train_labels, c_grid=C_GRID, holdout: float = 0.1, seed: int = 0,
                 max_iter: int = 1000, backend: str = "auto", device: str = "cpu") -> LogregResult:
    """Select C on a stratification-free random holdout of train, refit on all of train."""
    if backend == "auto":
        backend = "sklearn" if torch.device(device).type == "cpu" else "torch"
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(holdout * len(x))))
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}
    for c in c_grid:
        model = _fit(x[fit], y[fit], c, max_iter, backend, device)
        scores[float(c)] = float((model.predict(x[val]) == y[val]).mean())
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return LogregResult(best, scores, _fit(x, y, best, max_iter, backend, device))
