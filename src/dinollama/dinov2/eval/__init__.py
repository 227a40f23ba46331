"""Evaluation protocols on frozen features (k-NN and retrieval so far)."""

from .knn import few_shot_indices, knn_predict, knn_topk, knn_votes, topk_accuracy
from .logreg import C_GRID, train_logreg
from .retrieval import retrieval_map

__all__ = ["C_GRID", "few_shot_indices", "knn_predict", "knn_topk", "knn_votes", "retrieval_map", "topk_accuracy",
           "train_logreg"]
