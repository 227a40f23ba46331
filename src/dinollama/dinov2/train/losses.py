"""DINO, iBOT and KoLeo losses with the teacher's centering or Sinkhorn-Knopp normalisation.

Teacher statistics (centers, Sinkhorn sums) are all-reduced, so a sharded batch gives the same
targets as one process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _all_reduce(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, n_iterations: int = 3, n_total: Tensor | int | None = None) -> Tensor:
    """Soft assignments ``(B, K)`` whose columns (prototypes) get equal mass over the global batch
    and whose rows sum to 1 (after the last iteration); ``n_total`` is the global row count."""
    shift = logits.float().max()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((logits.float() - shift) / temp).t()  # (K, B); a global shift cancels out, avoids overflow
    k = q.shape[0]
    b = n_total if n_total is not None else q.shape[1] * _world()
    b = b.float() if isinstance(b, Tensor) else float(b)
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


class _Centered(nn.Module):
    """Teacher-side normalisation shared by the DINO and iBOT losses."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        total = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=total.device))
        batch_center = total / count.clamp(min=1)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def cross_entropy(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """Per-row ``-sum(t * log_softmax(s / T_s))``."""
        return -(teacher_probs * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)


class DINOLoss(_Centered):
    """Cross-entropy between each student view and each teacher view (summed over pairs)."""

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        return sum(self.cross_entropy(s, t).mean() for s in student for t in teacher)


class iBOTPatchLoss(_Centered):
    """Cross-entropy on masked patches, each image's masked patches weighted ``1/n_masked``,
    averaged over all images (``n_images``; unmasked images contribute zero)."""

    def forward(self, student: Tensor, teacher: Tensor, weights: Tensor, n_images: int) -> Tensor:
        return (self.cross_entropy(student, teacher) * weights).sum() / n_images


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimate ``-mean(log d_nn)`` on L2-normalised rows, in fp32.

    Returns 0 for fewer than two rows; exact duplicates get distance ``eps`` with no gradient
    (the reference's ``1/(d + eps)`` gradient would be ~1e8 there).
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)
            nn_index = dots.argmax(dim=1)
        d = (x - x[nn_index]).norm(dim=-1)
        return -torch.log(d.clamp(min=eps) + eps).mean()
