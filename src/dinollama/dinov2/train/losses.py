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


def _row_chunks(n_rows: int, n_cols: int) -> list[slice]:
    """Row slices of about 1 MiB of fp32 each, so that a chunk stays in cache between passes."""
    step = max(1, (1 << 18) // max(n_cols, 1))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


def _scaled(logits: Tensor, temp: float) -> Tensor:
    return logits.to(torch.float32, copy=True).div_(temp)  # a copy even from fp32: the input is not ours


class _SoftCrossEntropy(torch.autograd.Function):
    """Row-wise ``-sum(t * log_softmax(s / temp))`` = ``lse(s / temp) * sum(t) - t . s / temp``.

    With 65,536 prototypes the plain expression makes about ten fp32 passes over ``N x K`` in
    memory (cast, divide, log-softmax, multiply and their gradients, each a fresh 100+ MB tensor).
    Here each chunk of rows goes through all of them while it is in cache, and the backward
    recomputes the softmax from the saved logits instead of keeping fp32 log-probabilities.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temp: float) -> Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for j in _row_chunks(*logits.shape):
            x, t = _scaled(logits[j], temp), targets[j].float()
            out[j] = torch.logsumexp(x, dim=-1) * t.sum(-1) - (t * x).sum(-1)
        ctx.save_for_backward(logits, targets)
        ctx.temp = temp
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, targets = ctx.saved_tensors
        g = torch.empty_like(logits)
        for j in _row_chunks(*logits.shape):
            p, t = torch.softmax(_scaled(logits[j], ctx.temp), dim=-1), targets[j].float()
            g[j] = p.mul_(t.sum(-1, keepdim=True)).sub_(t).mul_((grad[j] / ctx.temp).unsqueeze(-1))
        return g, None, None


def soft_cross_entropy(logits: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Per-row ``-sum(targets * log_softmax(logits / temp))`` in fp32, computed in cache-sized chunks."""
    return _SoftCrossEntropy.apply(logits, targets.detach(), temp)


class _Centered(nn.Module):
    """Teacher-side normalisation shared by the DINO and iBOT losses."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        out = torch.empty(teacher_logits.shape, dtype=torch.float32, device=teacher_logits.device)
        for j in _row_chunks(*teacher_logits.shape):  # in cache, as in soft_cross_entropy
            torch.softmax((teacher_logits[j].float() - self.center).div_(teacher_temp), dim=-1, out=out[j])
        return out

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        total = _all_reduce(teacher_logits.sum(dim=0, keepdim=True, dtype=torch.float32))
        count = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=total.device))
        batch_center = total / count.clamp(min=1)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def cross_entropy(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """Per-row ``-sum(t * log_softmax(s / T_s))``."""
        return soft_cross_entropy(student_logits, teacher_probs, self.student_temp)


class DINOLoss(_Centered):
    """Cross-entropy between each student view and each teacher view (summed over pairs)."""

    def forward(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        # The cross-entropy is linear in the target: one pass per student view against the summed
        # teacher views equals the sum over all (student, teacher) pairs.
        summed = sum(teacher[1:], teacher[0])
        return sum(self.cross_entropy(s, summed).mean() for s in student)


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
