"""Evaluation protocols on frozen features (k-NN and retrieval so far)."""

from .knn import knn_predict, knn_topk
from .retrieval import retrieval_map

__all__ = ["knn_predict", "knn_topk", "retrieval_map"]
