"""k-NN accuracy of a backbone during training, on labelled images held out of training."""

from __future__ import annotations

import torch

from ..eval import knn_predict
from ..transforms import default_transform
from .data import ImageSource


@torch.no_grad()
def embed_source(backbone, source: ImageSource, ids: list[int], device: torch.device, amp: torch.dtype | None,
                 batch_size: int = 256) -> torch.Tensor:
    """Final-norm cls features of ``source[ids]`` with the model's evaluation preprocessing."""
    transform = default_transform(backbone)
    was_training = backbone.training
    backbone.eval()
    feats = []
    for start in range(0, len(ids), batch_size):
        x = torch.stack([transform(source.pil(i)) for i in ids[start : start + batch_size]]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            feats.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(feats)


def knn_check(backbone, source: ImageSource, train_ids: list[int], test_ids: list[int], device: torch.device,
              amp: torch.dtype | None = None, k: int = 20) -> float:
    """20-NN top-1 (official vote weights) of ``test_ids`` against ``train_ids``."""
    ftr = embed_source(backbone, source, train_ids, device, amp)
    fte = embed_source(backbone, source, test_ids, device, amp)
    pred = knn_predict(ftr, source.labels[train_ids], fte, ks=(k,))[k]
    return float((pred == source.labels[test_ids]).float().mean())
