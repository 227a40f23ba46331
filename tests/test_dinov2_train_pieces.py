"""Each piece of the DINOv2 recipe against an independent formula."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinollama.dinov2.train import (
    BlockMasking, CosineSchedule, DINOHead, DINOLoss, MultiCrop, MultiCropConfig, SSLObjective, batch_masks,
    iBOTPatchLoss, koleo_loss, load_config, param_groups, sinkhorn_knopp,
)
from dinollama.dinov2.train.augment import color_jitter, crop_params, gaussian_blur
from dinollama.dinov2.train.ssl import Batch


def official_cosine(base, final, total, warmup=0, start=0.0, freeze=0):
    """The official CosineScheduler, written with numpy as it is there."""
    freeze_s = np.zeros(freeze)
    warm = np.linspace(start, base, warmup)
    iters = np.arange(total - warmup - freeze)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze_s, warm, cos))


def test_cosine_schedule_matches_official():
    for kw in ({"warmup": 10}, {"warmup": 0}, {"warmup": 5, "start": 0.04, "freeze": 3}):
        ref = official_cosine(1.0, 0.1, 50, **kw)
        s = CosineSchedule(1.0, 0.1, 50, **kw)
        assert [s[i] for i in range(50)] == pytest.approx(ref.tolist(), abs=1e-12)
        assert s[50] == s[1000] == 0.1


def test_param_group_multipliers():
    cfg = load_config(preset="test-tiny")
    obj = SSLObjective(cfg)
    depth = len(obj.student.backbone.blocks)
    groups = param_groups(obj.student, depth, layer_decay=0.9, patch_embed_lr_mult=0.2)
    found = {name: g for g in groups for name in g["names"]}
    assert set(found) == {n for n, _ in obj.student.named_parameters()}
    assert found["backbone.cls_token"]["lr_multiplier"] == pytest.approx(0.9 ** (depth + 1))
    assert found["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.9 ** (depth + 1))
    assert found["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9**depth)
    assert found[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert found["backbone.norm.weight"]["lr_multiplier"] == found["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for name, g in found.items():
        no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
        assert g["wd_multiplier"] == (0.0 if no_wd else 1.0), name
        assert g["is_last_layer"] == ("last_layer" in name)


def test_dino_loss_against_formula_and_init_value():
    torch.manual_seed(0)
    loss = DINOLoss(64)
    s = [torch.randn(5, 64) for _ in range(3)]
    t = [torch.softmax(torch.randn(5, 64), -1) for _ in range(2)]
    ref = 0.0
    for si in s:
        for ti in t:
            ref += -(ti * torch.log_softmax(si / 0.1, -1)).sum(-1).mean()
    assert loss(s, t) == pytest.approx(float(ref), rel=1e-6)
    # At initialisation the head's prototypes are near-orthogonal to its outputs: CE ~ ln K per pair.
    head = DINOHead(32, 4096, hidden_dim=256, bottleneck_dim=256)
    out = head(torch.randn(64, 32))
    uniform = torch.full((64, 4096), 1 / 4096)
    assert float(loss([out.detach()], [uniform])) == pytest.approx(math.log(4096), rel=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_soft_cross_entropy_matches_autograd_formula(dtype):
    from dinollama.dinov2.train.losses import soft_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(200, 3000) * 0.3).to(dtype)  # 87 rows per chunk: three chunks, the last partial
    t = torch.softmax(torch.randn(200, 3000) * 3, -1)
    weights = torch.rand(200)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = soft_cross_entropy(ours_in, t, 0.1)
    ref = -(t * torch.log_softmax(ref_in.float() / 0.1, -1)).sum(-1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), atol=1e-5, rtol=1e-3 if dtype == torch.float32 else 2e-2)


def test_centering():
    loss = DINOLoss(4, center_momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    p = loss.softmax_center_teacher(t, 0.5)
    assert torch.allclose(p, torch.softmax(t / 0.5, -1))
    loss.update_center(t)
    assert torch.allclose(loss.center, 0.1 * t.mean(0, keepdim=True))
    assert torch.allclose(loss.softmax_center_teacher(t, 0.5), torch.softmax((t - loss.center) / 0.5, -1))


def official_sinkhorn(logits: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """The official sinkhorn_knopp_teacher (one process), in float64 numpy."""
    q = np.exp(logits / temp).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_matches_official_and_balances():
    torch.manual_seed(0)
    logits = torch.randn(32, 16) * 0.2
    q = sinkhorn_knopp(logits, 0.1, n_iterations=3)
    assert np.allclose(q.numpy(), official_sinkhorn(logits.double().numpy(), 0.1, 3), atol=1e-5)
    assert torch.allclose(q.sum(-1), torch.ones(32), atol=1e-5)  # each row a distribution
    q50 = sinkhorn_knopp(logits * 10, 0.1, n_iterations=200)  # the max shift keeps huge logits finite
    assert torch.isfinite(q50).all()
    assert torch.allclose(q50.sum(0), torch.full((16,), 2.0), atol=0.05)  # prototypes share the batch (nearly) equally


def test_ibot_loss_formula():
    torch.manual_seed(0)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = True
    masks[2, 4:5] = True
    batch = Batch(torch.zeros(4, 3, 4, 4), torch.zeros(0), masks)
    s, t = torch.randn(4, 8), torch.softmax(torch.randn(4, 8), -1)
    ce = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    ref = (ce[:3].mean() + ce[3]) / 4  # per image mean over its masked patches, averaged over all 4 images
    assert float(iBOTPatchLoss(8)(s, t, batch.mask_weights, 4)) == pytest.approx(float(ref), rel=1e-6)


def test_koleo_against_formula_batch_one_and_duplicates():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    xn = F.normalize(x, dim=-1)
    d = torch.cdist(xn, xn) + torch.eye(16) * 10
    ref = -torch.log(d.min(dim=1).values + 1e-8).mean()
    assert float(koleo_loss(x)) == pytest.approx(float(ref), rel=1e-5)
    one = torch.randn(1, 8, requires_grad=True)
    assert float(koleo_loss(one).detach()) == 0.0
    dup = torch.randn(4, 8)
    dup = torch.cat([dup, dup[:1]]).requires_grad_()
    val = koleo_loss(dup)
    val.backward()
    assert math.isfinite(float(val)) and torch.isfinite(dup.grad).all() and dup.grad.abs().max() < 1e3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert koleo_loss(x).dtype == torch.float32


def test_block_masking_statistics():
    rng = random.Random(0)
    gen = BlockMasking(14)
    for target in (0, 4, 20, 49, 98):
        counts = [int(gen(target, rng).sum()) for _ in range(50)]
        assert max(counts) <= target
        assert np.mean(counts) >= 0.8 * target
    m = gen(40, rng)
    assert m.dtype == torch.bool and m.shape == (14, 14)
    masks = batch_masks(64, 196, gen, random.Random(1), 0.5, (0.1, 0.5))
    per_image = masks.sum(-1)
    assert int((per_image > 0).sum()) == 32
    ratios = sorted((per_image[per_image > 0] / 196).tolist())
    assert ratios[0] >= 0.05 and ratios[-1] <= 0.5
    assert np.mean(ratios) == pytest.approx(0.3, abs=0.06)  # stratified over [0.1, 0.5]


def test_multicrop_shapes_determinism_and_gray_path():
    cfg = MultiCropConfig(global_crops_size=28, local_crops_size=14, local_crops_number=3)
    mc = MultiCrop(cfg)
    gray = torch.rand(1, 40, 40)
    a = mc(gray, torch.Generator().manual_seed(3))
    b = mc(gray.expand(3, -1, -1).clone(), torch.Generator().manual_seed(3))
    assert [v.shape for v in a["global_crops"]] == [torch.Size([3, 28, 28])] * 2
    assert [v.shape for v in a["local_crops"]] == [torch.Size([3, 14, 14])] * 3
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.allclose(x, y, atol=1e-5)  # the one-channel fast path equals the RGB path
    c = mc(gray, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], c["local_crops"]))


def test_augment_ops():
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        top, left, h, w = crop_params(g, 30, 50, (0.05, 1.0))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50 and h > 0 and w > 0
    img = torch.rand(3, 20, 20)
    assert torch.allclose(gaussian_blur(torch.full((1, 9, 9), 0.5), 1.0), torch.full((1, 9, 9), 0.5), atol=1e-6)
    assert torch.equal(color_jitter(img, g, 0, 0, 0, 0), img)
    assert MultiCrop(MultiCropConfig()).blur_p == (1.0, 0.1, 0.5)
    assert MultiCrop(MultiCropConfig(official_blur_bug=True)).blur_p == pytest.approx((0.0, 0.9, 0.5))


def test_objective_terms_use_official_normalisation():
    cfg = load_config(preset="test-tiny", overrides=["dino.head_bottleneck_dim=256", "dino.head_n_prototypes=1024",
                                                     "dino.head_hidden_dim=64", "crops.local_crops_number=8"])
    torch.manual_seed(0)
    obj = SSLObjective(cfg)
    b = 6
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[0, :2] = True
    batch = Batch(torch.randn(2 * b, 3, 28, 28), torch.randn(8 * b, 3, 14, 14), masks)
    targets = obj.teacher_targets(batch, 0.04)
    out = obj.student(*obj.student_inputs(batch))
    total, terms = obj.losses(out, targets, batch)
    ce = lambda s, t: float(-(t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean())  # noqa: E731
    tviews = targets["cls"].chunk(2)
    local = sum(ce(s, t) for s in out["local_logits"].chunk(8) for t in tviews) / 18
    glob = 2 * ce(out["global_logits"], targets["cls"]) / 18
    assert terms["dino_local_crops_loss"] == pytest.approx(local, rel=1e-5)
    assert terms["dino_global_crops_loss"] == pytest.approx(glob, rel=1e-5)
    assert terms["official_ibot_loss"] == pytest.approx(terms["ibot_loss"] / 2)
    expected = local + glob + terms["koleo_loss"] + terms["ibot_loss"]
    assert float(total) == pytest.approx(expected, rel=1e-5)
    # The teacher's first global view is matched with the student's second: swapped chunks.
    t_logits = obj.teacher(batch.global_crops, None, None, batch.mask_index)["global_logits"]
    assert torch.allclose(obj.dino_loss.center, 0.1 * t_logits.mean(0, keepdim=True), atol=1e-6)


def test_ema_update():
    cfg = load_config(preset="test-tiny")
    obj = SSLObjective(cfg)
    with torch.no_grad():
        for p in obj.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.teacher.parameters()]
    obj.update_teacher(obj.student, 0.9)
    for t0, t1, s in zip(before, obj.teacher.parameters(), obj.student.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)


_FAULTS = """
import resource, sys, torch
from dinollama.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(50_000_000).sum()  # 200 MB, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(49_000_000).sum()  # a little smaller, so it fits the freed block wherever that lies
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_avoids_page_faults_on_reuse():
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 40_000  # 196 MB in 4 KiB pages, mapped again
    assert faults["keep"] < 5_000, faults
