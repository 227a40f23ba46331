"""Training runs: kill and resume, 1 vs 2 processes, export, NaN detection, distillation, fine-tune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_process import kill_at_first_checkpoint

import dinollama.dinov2 as d2
from dinollama.dinov2.train import Trainer, TrainingError, load_config
from dinollama.dinov2.train.data import ArraySource, ImageSource, open_source

CLI = [sys.executable, "-m", "dinollama.cli.main"]
TINY = ["--preset", "test-tiny", "--data", "fashion-mnist:mini", "--quiet"]


def _env(threads: int = 2) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _backbone(path: Path) -> dict:
    return d2.load(path).state_dict()


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    args = [*TINY, "--set", "train.max_iterations=20", "--set", "train.saveckp_every=2"]
    subprocess.run([*CLI, "train", "ssl", *args, "--output", str(tmp_path / "full")], check=True, env=_env())
    run = tmp_path / "killed"
    kill_at_first_checkpoint([*CLI, "train", "ssl", *args, "--output", str(run)], run, _env())
    assert not (run / "backbone.safetensors").exists(), "the run finished before it could be killed"
    saved = torch.load(run / "checkpoint.pth", weights_only=True)["iteration"]
    assert 0 < saved < 20
    subprocess.run([*CLI, "train", "ssl", *args, "--output", str(run)], check=True, env=_env())
    a, b = _backbone(tmp_path / "full" / "backbone.safetensors"), _backbone(run / "backbone.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(run / "checkpoint.pth", weights_only=True)
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    # KoLeo is per process in the official recipe (not a global-batch term), so it is off here; no warm-up, so
    # that the 3 steps move the weights.
    common = ["--set", "train.max_iterations=3", "--set", "dino.koleo_loss_weight=0", "--set", f"train.parallel={parallel}",
              "--set", "optim.warmup_epochs=0", "--set", "teacher.momentum_teacher=0.9"]
    subprocess.run([*CLI, "train", "ssl", *TINY, *common, "--set", "train.batch_size_per_gpu=8", "--output",
                    str(tmp_path / "one")], check=True, env=_env())
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                    "-m", "dinollama.cli.main", "train", "ssl", *TINY, *common, "--set", "train.batch_size_per_gpu=4",
                    "--output", str(tmp_path / "two")], check=True, env=_env(1))
    a, b = _backbone(tmp_path / "one" / "backbone.safetensors"), _backbone(tmp_path / "two" / "backbone.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-4, rtol=1e-3), k
    one = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)["model"]
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-4, rtol=1e-3), k


def test_export_loads_strict_and_logs(tmp_path):
    cfg = load_config(preset="test-tiny", overrides=["train.knn_holdout=200", "train.knn_train=300", "train.knn_every=2"])
    path = Trainer(cfg, "fashion-mnist:mini", tmp_path, progress=False).run(stop_at=4)
    model = d2.load(path)
    assert model.default_image_size == 28 and model.embed_dim == 32
    assert d2.default_transform(model).crop_size == 28
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in steps] == [0, 1, 2, 3]
    for key in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "teacher_entropy", "lr"):
        assert key in steps[0]
    assert any("knn20_top1" in r for r in records)
    assert (tmp_path / "config.json").exists()


class NaNSource(ImageSource):
    def __len__(self):
        return 16

    def image(self, i):
        return torch.full((3, 28, 28), float("nan"))


def test_nan_is_reported_before_the_step(tmp_path):
    cfg = load_config(preset="test-tiny")
    trainer = Trainer(cfg, NaNSource(), tmp_path, progress=False)
    before = [p.clone() for p in trainer.objective.student.parameters()]
    with pytest.raises(TrainingError, match="non-finite loss at iteration 0"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.objective.student.parameters()))


def test_config_files(tmp_path):
    yaml_text = ("student:\n  arch: vit_small\n  block_chunks: 4\n  qkv_bias: true\ntrain:\n  OFFICIAL_EPOCH_LENGTH: 1250\n"
                 "  batch_size_per_gpu: 32\noptim:\n  epochs: 5\ncompute_precision:\n  grad_scaler: true\n")
    (tmp_path / "c.yaml").write_text(yaml_text)
    cfg = load_config(tmp_path / "c.yaml", overrides=["optim.base_lr=0.001", "crops.global_crops_scale=[0.3,1]"])
    assert cfg.train.epoch_length == 1250 and cfg.train.batch_size_per_gpu == 32 and cfg.optim.epochs == 5
    assert cfg.optim.base_lr == 0.001 and cfg.crops.global_crops_scale == (0.3, 1)
    assert cfg.scaled_lr(1) == pytest.approx(0.001 * (32 / 1024) ** 0.5)
    with pytest.raises(ValueError, match="unknown config key optim.lrr"):
        load_config(overrides=["optim.lrr=1"])
    r = subprocess.run([*CLI, "train", "ssl", "--data", "fashion-mnist:mini", "--output", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--preset" in r.stderr and "Traceback" not in r.stderr


def test_distill_and_finetune(tmp_path):
    teacher_run = tmp_path / "teacher"
    subprocess.run([*CLI, "train", "ssl", *TINY, "--set", "train.max_iterations=2", "--output", str(teacher_run)],
                   check=True, env=_env())
    subprocess.run([*CLI, "train", "distill", *TINY, "--teacher", str(teacher_run / "checkpoint.pth"),
                    "--set", "train.max_iterations=2", "--output", str(tmp_path / "student")], check=True, env=_env())
    state = torch.load(tmp_path / "student" / "checkpoint.pth", weights_only=True)["model"]
    assert any(k.startswith("student_ema.") for k in state)
    t_sd = torch.load(teacher_run / "checkpoint.pth", weights_only=True)["model"]
    for k, v in state.items():
        if k.startswith("teacher."):
            assert torch.equal(v, t_sd[k]), k  # the distillation teacher stays frozen
    assert d2.load(tmp_path / "student" / "backbone.safetensors").embed_dim == 32
    subprocess.run([*CLI, "train", "finetune", "--model", str(teacher_run / "backbone.safetensors"),
                        "--data", "fashion-mnist:mini", "--epochs", "2", "--batch-size", "32", "--holdout", "200",
                        "--output", str(tmp_path / "ft"), "--quiet"], check=True, env=_env(), capture_output=True, text=True)
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert result["holdout_top1_after"] > 0.3  # 10 classes: chance is 0.1
    assert d2.load(tmp_path / "ft" / "backbone.safetensors").embed_dim == 32


def test_sources(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 16), (i * 100, 50, 0)).save(tmp_path / cls / f"{i}.png")
    src = open_source(str(tmp_path))
    assert len(src) == 4 and src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 0, 1, 1]
    assert src.image(0).shape == (3, 16, 20)
    mini = open_source("fashion-mnist:mini", "test")
    assert isinstance(mini, ArraySource) and len(mini) == 1000 and mini.image(0).shape == (1, 28, 28)
