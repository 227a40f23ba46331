"""The DINOv2 self-distillation objective: student and EMA teacher (backbone + heads), the
teacher targets and the DINO/iBOT/KoLeo terms with the official normalisation."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model import DinoVisionTransformer, build_vit
from .config import SSLConfig
from .heads import DINOHead
from .losses import DINOLoss, iBOTPatchLoss, koleo_loss, sinkhorn_knopp


def build_backbone(cfg: SSLConfig, drop_path: bool = True) -> DinoVisionTransformer:
    """The student architecture at the global crop size (its ``default_image_size``)."""
    s = cfg.student
    overrides = {k: getattr(s, k) for k in ("embed_dim", "depth", "num_heads") if getattr(s, k) is not None}
    return build_vit(
        s.arch, patch_size=s.patch_size, drop_path_rate=s.drop_path_rate if drop_path else 0.0,
        init_values=s.layerscale or None, ffn_layer=s.ffn_layer, num_register_tokens=s.num_register_tokens,
        interpolate_antialias=bool(s.num_register_tokens), interpolate_offset=0.0 if s.num_register_tokens else 0.1,
        img_size=cfg.crops.global_crops_size, default_image_size=cfg.crops.global_crops_size,
        crop_pct=cfg.crops.eval_crop_pct, **overrides,
    )


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ a separate iBOT head): the student, and the teacher's copy of it.

    One forward call runs everything, so DDP/FSDP wrap this module once.
    """

    def __init__(self, backbone: DinoVisionTransformer, dino_head: DINOHead, ibot_head: DINOHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        if ibot_head is not None:
            self.ibot_head = ibot_head
        self.separate_ibot = ibot_head is not None

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor | None, mask_index: Tensor) -> dict[str, Tensor]:
        g = self.backbone.forward_features(global_crops, masks)
        g_cls = g["x_norm_clstoken"]
        patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_index)
        cls = [g_cls]
        if local_crops is not None and local_crops.numel():
            cls.insert(0, self.backbone.forward_features(local_crops)["x_norm_clstoken"])
        n_local = cls[0].shape[0] if len(cls) == 2 else 0
        # split(), not slicing: its backward concatenates the parts' gradients, where three slices
        # would each zero-fill a gradient of the whole (rows x 65,536) logits.
        sizes = [n_local, g_cls.shape[0]]
        if self.separate_ibot:
            local_logits, global_logits = self.dino_head(torch.cat(cls)).split(sizes)
            patch_logits = self.ibot_head(patches)
        else:
            logits = self.dino_head(torch.cat(cls + [patches]))
            local_logits, global_logits, patch_logits = logits.split(sizes + [patches.shape[0]])
        return {
            "global_cls": g_cls,
            "local_logits": local_logits,
            "global_logits": global_logits,
            "patch_logits": patch_logits,
        }


def build_network(cfg: SSLConfig, drop_path: bool = True) -> SSLNetwork:
    backbone = build_backbone(cfg, drop_path)
    d, i = cfg.dino, cfg.ibot
    dino_head = DINOHead(backbone.embed_dim, d.head_n_prototypes, d.head_hidden_dim, d.head_bottleneck_dim, d.head_nlayers)
    ibot_head = None
    if i.separate_head:
        ibot_head = DINOHead(backbone.embed_dim, i.head_n_prototypes, i.head_hidden_dim, i.head_bottleneck_dim, i.head_nlayers)
    return SSLNetwork(backbone, dino_head, ibot_head)


@dataclass
class Batch:
    """One rank's share of a global batch; crops are crop-major (all first global crops, then all second)."""

    global_crops: Tensor
    local_crops: Tensor
    masks: Tensor  # (2b, n_patches) bool
    labels: Tensor | None = None

    @property
    def mask_index(self) -> Tensor:
        return self.masks.flatten().nonzero().flatten()

    @property
    def mask_weights(self) -> Tensor:
        per_image = 1.0 / self.masks.sum(-1).clamp(min=1.0)
        return per_image.unsqueeze(-1).expand_as(self.masks)[self.masks]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.global_crops.to(device, non_blocking=True), self.local_crops.to(device, non_blocking=True),
                     self.masks.to(device, non_blocking=True), self.labels)


def entropy_stats(probs: Tensor) -> dict[str, float]:
    """Mean per-sample entropy and the entropy of the batch-mean assignment (nats)."""
    p = probs.float().clamp(min=1e-12)
    mean = probs.float().mean(0).clamp(min=1e-12)
    return {"teacher_entropy": float(-(p * p.log()).sum(-1).mean()), "teacher_batch_entropy": float(-(mean * mean.log()).sum())}


class SSLObjective(nn.Module):
    """DINO + iBOT + KoLeo between a student and a teacher network.

    With ``distill=True`` the teacher is a frozen pretrained network, the student sees unmasked
    crops (iBOT then matches the teacher on the selected patches) and ``student_ema`` tracks the
    student for export.
    """

    def __init__(self, cfg: SSLConfig, teacher: SSLNetwork | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.distill = teacher is not None
        self.student = build_network(cfg, drop_path=not self.distill)
        self.teacher = teacher if teacher is not None else copy.deepcopy(self.student)
        self.teacher.requires_grad_(False).eval()
        if self.distill:
            self.student_ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        k_dino = cfg.dino.head_n_prototypes
        k_ibot = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else k_dino
        self.dino_loss = DINOLoss(k_dino)
        self.ibot_loss = iBOTPatchLoss(k_ibot)

    @torch.no_grad()
    def teacher_targets(self, batch: Batch, teacher_temp: float) -> dict[str, Tensor]:
        out = self.teacher(batch.global_crops, None, None, batch.mask_index)
        g = out["global_logits"]
        g = torch.cat(g.chunk(2)[::-1])  # swapped, so student crop A is matched with teacher crop B
        p = out["patch_logits"]
        if self.cfg.train.centering == "sinkhorn_knopp":
            n_patches = torch.tensor(float(p.shape[0]), device=p.device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(n_patches)
            cls_t = sinkhorn_knopp(g, teacher_temp)
            patch_t = sinkhorn_knopp(p, teacher_temp, n_total=n_patches) if p.shape[0] else p.float()
        elif self.cfg.train.centering == "centering":
            cls_t = self.dino_loss.softmax_center_teacher(g, teacher_temp)
            patch_t = self.ibot_loss.softmax_center_teacher(p, teacher_temp)
            self.dino_loss.update_center(g)
            self.ibot_loss.update_center(p)
        else:
            raise ValueError(f"train.centering must be 'centering' or 'sinkhorn_knopp', not {self.cfg.train.centering!r}")
        return {"cls": cls_t, "patch": patch_t}

    def losses(self, out: dict[str, Tensor], targets: dict[str, Tensor], batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The total loss and each term, with the official 18-pair normalisation (2 globals, 8 locals)."""
        n_local = self.cfg.crops.local_crops_number if out["local_logits"].numel() else 0
        n_terms = 2 * 1 + 2 * n_local
        teacher_views = list(targets["cls"].chunk(2))
        total = out["global_cls"].new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        if n_local:
            terms["dino_local_crops_loss"] = self.dino_loss(list(out["local_logits"].chunk(n_local)), teacher_views) / n_terms
            total = total + self.cfg.dino.loss_weight * terms["dino_local_crops_loss"]
        terms["dino_global_crops_loss"] = self.dino_loss([out["global_logits"]], [targets["cls"]]) * 2 / n_terms
        total = total + self.cfg.dino.loss_weight * terms["dino_global_crops_loss"]
        if self.cfg.dino.koleo_loss_weight:
            koleo = self.cfg.dino.koleo_loss_weight * sum(koleo_loss(c) for c in out["global_cls"].chunk(2))
            terms["koleo_loss"] = koleo
            total = total + koleo
        if self.cfg.ibot.loss_weight and out["patch_logits"].shape[0]:
            terms["ibot_loss"] = self.ibot_loss(out["patch_logits"], targets["patch"], batch.mask_weights, batch.masks.shape[0])
            total = total + self.cfg.ibot.loss_weight * terms["ibot_loss"]
        logged = {k: float(v.detach()) for k, v in terms.items()}
        # The values the official trainer prints: KoLeo and iBOT halved ("as before").
        for k in ("koleo_loss", "ibot_loss"):
            if k in logged:
                logged[f"official_{k}"] = logged[k] / 2
        return total, logged

    def student_inputs(self, batch: Batch) -> tuple:
        masks = None if self.distill else batch.masks
        return batch.global_crops, batch.local_crops, masks, batch.mask_index

    @torch.no_grad()
    def update_teacher(self, student: nn.Module, momentum: float) -> None:
        """EMA ``t = m * t + (1 - m) * s`` (the distillation teacher stays frozen; its student EMA moves)."""
        target = self.student_ema if self.distill else self.teacher
        for net in (target, student):
            if hasattr(net, "reshard"):  # FSDP2 keeps a root's gathered weights after a forward with no backward
                net.reshard()
        t_params = list(target.parameters())
        s_params = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

    def export_backbone(self) -> DinoVisionTransformer:
        """The model to ship: the teacher (SSL) or the student EMA (distillation)."""
        return (self.student_ema if self.distill else self.teacher).backbone


def expected_ce_at_init(n_prototypes: int) -> float:
    """Per-pair cross-entropy of uniform teacher/student distributions: ln K."""
    return math.log(n_prototypes)
