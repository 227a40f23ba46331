"""Evaluation protocols on frozen features (k-NN and retrieval so far)."""

from .knn import knn_predict, knn_topk
from .logreg import C_GRID, train_logreg
from .retrieval import retrieval_map

__all__ = ["C_GRID", "knn_predict", "knn_topk", "retrieval_map", "train_logreg"]
