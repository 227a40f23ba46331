"""Evaluation protocols on frozen features: k-NN, logistic regression, the linear-probe grid, retrieval,
and the dense (depth, segmentation) linear probes."""

from .features import FeatureSet, extract_features
from .knn import few_shot_indices, knn_predict, knn_topk, knn_votes, topk_accuracy
from .linear import LEARNING_RATES, InputKind, LinearProbe, linear_probe
from .logreg import C_GRID, train_logreg
from .retrieval import load_ground_truth, rank_database, retrieval_map

__all__ = ["C_GRID", "LEARNING_RATES", "FeatureSet", "InputKind", "LinearProbe", "extract_features",
           "few_shot_indices", "knn_predict", "knn_topk", "knn_votes", "linear_probe", "load_ground_truth",
           "rank_database", "retrieval_map", "topk_accuracy", "train_logreg"]
