"""The SSL/distillation training loop: one process, or torchrun with DDP or FSDP2, CPU or CUDA."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from ...distributed import setup
from ...memory import keep_freed_memory
from ...nn import Attention
from ...training import autocast_dtype, load_checkpoint, save_checkpoint
from ..hub import save as save_backbone
from .augment import MultiCrop
from .config import SSLConfig
from .data import Collate, ImageSource, MultiCropDataset, StreamSampler, open_source
from .monitor import knn_check
from .schedules import CosineSchedule, apply_schedules, param_groups
from .ssl import Batch, SSLNetwork, SSLObjective, entropy_stats


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad data); the message says what to change."""


@dataclass
class Schedules:
    lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_lr: CosineSchedule

    @classmethod
    def build(cls, cfg: SSLConfig, iters_per_epoch: int, world: int) -> Schedules:
        o, t = cfg.optim, cfg.teacher
        total = max(1, round(o.epochs * iters_per_epoch))
        warm = round(o.warmup_epochs * iters_per_epoch)
        lr = cfg.scaled_lr(world)
        return cls(
            lr=CosineSchedule(lr, o.min_lr, total, warm),
            wd=CosineSchedule(o.weight_decay, o.weight_decay_end, total),
            momentum=CosineSchedule(t.momentum_teacher, t.final_momentum_teacher, total),
            teacher_temp=CosineSchedule(t.teacher_temp, t.teacher_temp, total,
                                        round(t.warmup_teacher_temp_epochs * iters_per_epoch), t.warmup_teacher_temp),
            last_layer_lr=CosineSchedule(lr, o.min_lr, total, warm, freeze=round(o.freeze_last_layer_epochs * iters_per_epoch)),
        )


def split_holdout(source: ImageSource, n_holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Training indices and the labelled images held out for the k-NN check."""
    n = len(source)
    if not n_holdout or source.labels is None:
        return list(range(n)), []
    if n_holdout >= n:
        raise TrainingError(f"train.knn_holdout={n_holdout} holds out all {n} images; use a smaller number or 0")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_holdout:]), sorted(perm[:n_holdout])


def use_bmm_attention(model: nn.Module) -> None:
    """Attention as two batched matmuls: on CPU the fused bf16 kernels are several times slower
    for the short token sequences of small crops (forward and backward)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.bmm_attention = True


class Trainer:
    """``Trainer(cfg, data, output_dir).run()`` trains and exports ``backbone.safetensors``.

    ``output_dir/checkpoint.pth`` is written every ``train.saveckp_every`` iterations and a run
    restarted on the same folder continues from it exactly.
    """

    def __init__(self, cfg: SSLConfig, data: str | ImageSource, output_dir: str | Path,
                 teacher: SSLNetwork | None = None, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(output_dir), progress
        keep_freed_memory()
        self.rank, self.world, self.device = setup()
        self.source = open_source(data) if isinstance(data, str) else data
        self.train_ids, self.holdout_ids = split_holdout(self.source, cfg.train.knn_holdout, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # the same initial student, heads and teacher on every rank
        self.objective = SSLObjective(cfg, teacher).to(self.device)
        torch.manual_seed(cfg.train.seed + 1 + self.rank)  # per-rank streams (drop-path) from here on
        if self.device.type == "cpu":
            use_bmm_attention(self.objective)
        self.student = self._parallelize()
        t = cfg.train
        groups = param_groups(self.objective.student, len(self.objective.student.backbone.blocks),
                              cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        self.global_batch = t.batch_size_per_gpu * self.world
        self.iters_per_epoch = t.epoch_length or len(self.train_ids) // (self.global_batch * t.grad_accum)
        if self.iters_per_epoch < 1:
            raise TrainingError(f"{len(self.train_ids)} training images are fewer than one global batch "
                                f"({self.global_batch * t.grad_accum}); lower train.batch_size_per_gpu")
        self.sched = Schedules.build(cfg, self.iters_per_epoch, self.world)
        self.total = self.sched.lr.total
        self.amp = autocast_dtype(t.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.iteration = 0

    # -- setup ----------------------------------------------------------------------------------

    def _parallelize(self) -> nn.Module:
        obj = self.objective
        if self.world == 1:
            return obj.student
        if self.cfg.train.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for net in (obj.student, obj.teacher) + ((obj.student_ema,) if obj.distill else ()):
                for block in net.backbone.blocks:
                    fully_shard(block)
                fully_shard(net)
            return obj.student
        if self.cfg.train.parallel != "ddp":
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', not {self.cfg.train.parallel!r}")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(obj.student, device_ids=ids)

    def _loader(self, start_micro: int, stop_micro: int):
        t, c = self.cfg.train, self.cfg.crops
        dataset = MultiCropDataset(self.source, MultiCrop(c), t.seed)
        sampler = StreamSampler(self.train_ids, self.global_batch, self.rank, self.world, t.seed, start_micro, stop_micro)
        collate = Collate(c.global_crops_size // self.cfg.student.patch_size, self.global_batch, self.rank, self.world,
                          t.seed, self.cfg.ibot.mask_sample_probability, tuple(self.cfg.ibot.mask_ratio_min_max))
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=t.num_workers,
                                           pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4 if t.num_workers else None)

    # -- one step -------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def _micro_step(self, batch: Batch, sync: bool) -> dict[str, float]:
        obj = self.objective
        temp = self.sched.teacher_temp[self.iteration]
        with self._autocast():
            targets = obj.teacher_targets(batch, temp)
        no_sync = self.student.no_sync if (not sync and hasattr(self.student, "no_sync")) else nullcontext
        with no_sync():
            with self._autocast():
                out = self.student(*obj.student_inputs(batch))
                loss, terms = obj.losses(out, targets, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss at iteration {self.iteration} ({', '.join(f'{k}={v:.4g}' for k, v in terms.items())}); "
                    f"lower optim.base_lr, raise optim.warmup_epochs or use train.precision=bf16; the last checkpoint "
                    f"is {self.out / 'checkpoint.pth'}")
            self.scaler.scale(loss / self.cfg.train.grad_accum).backward()
        return {**terms, "total_loss": float(loss.detach()), **entropy_stats(targets["cls"])}

    def _clip(self) -> dict[str, float]:
        """Clip each submodule (backbone, heads) separately, as the official trainer does."""
        clip = self.cfg.optim.clip_grad
        if not clip:
            return {}
        self.scaler.unscale_(self.optimizer)
        norms = {}
        for name, module in self.objective.student.named_children():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                norms[f"grad_norm_{name}"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return norms

    def step(self, micro_batches: list[Batch]) -> dict[str, float]:
        it = self.iteration
        apply_schedules(self.optimizer, self.sched.lr[it], self.sched.wd[it], self.sched.last_layer_lr[it])
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            terms = self._micro_step(batch.to(self.device), sync=i == len(micro_batches) - 1)
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v / len(micro_batches)
        logs.update(self._clip())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.objective.update_teacher(self.objective.student, self.sched.momentum[it])
        self.iteration += 1
        return {"iteration": it, "lr": self.sched.lr[it], "wd": self.sched.wd[it], "momentum": self.sched.momentum[it],
                "teacher_temp": self.sched.teacher_temp[it], **logs}

    # -- the run --------------------------------------------------------------------------------

    def _checkpoint_extra(self) -> dict:
        return {"iteration": self.iteration, "scaler": self.scaler.state_dict(), "config": self.cfg.to_dict(),
                "world_size": self.world}

    def save(self) -> None:
        save_checkpoint(self.out / "checkpoint.pth", self.objective, self.objective.student, self.optimizer,
                        self._checkpoint_extra())

    def resume(self) -> bool:
        path = self.out / "checkpoint.pth"
        if not path.exists():
            return False
        state = load_checkpoint(path, self.objective, self.objective.student, self.optimizer)
        self.iteration = int(state["iteration"])
        self.scaler.load_state_dict(state["scaler"])
        return True

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _warn_collapse(self, logs: dict) -> None:
        k = self.cfg.dino.head_n_prototypes
        if logs["teacher_batch_entropy"] < 1.0:
            tqdm.write(f"warning: iteration {logs['iteration']}: teacher outputs collapsed onto few prototypes "
                       f"(batch entropy {logs['teacher_batch_entropy']:.2f} nats of {math.log(k):.2f})", file=sys.stderr)
        elif self.iteration > self.sched.lr.warmup and logs["teacher_entropy"] > 0.98 * math.log(k):
            tqdm.write(f"warning: iteration {logs['iteration']}: teacher outputs are uniform (entropy "
                       f"{logs['teacher_entropy']:.2f} of {math.log(k):.2f} nats), a collapse", file=sys.stderr)

    def knn(self) -> float | None:
        if not self.holdout_ids:
            return None
        t = self.cfg.train
        ids = self.train_ids[:: max(1, len(self.train_ids) // t.knn_train)][: t.knn_train]
        return knn_check(self.objective.export_backbone(), self.source, ids, self.holdout_ids, self.device, self.amp)

    def run(self, stop_at: int | None = None) -> Path:
        """Train to the end (or to ``stop_at`` / ``train.max_iterations``) and export the backbone."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        resumed = self.resume()
        stop = min(x for x in (self.total, stop_at, self.cfg.train.max_iterations) if x is not None)
        accum = self.cfg.train.grad_accum
        loader = iter(self._loader(self.iteration * accum, stop * accum))
        bar = tqdm(total=stop, initial=self.iteration, disable=not self.progress or self.rank != 0,
                   desc="resumed" if resumed else "train", unit="it", dynamic_ncols=True)
        t_data = t_step = 0.0
        while self.iteration < stop:
            t0 = time.perf_counter()
            micro = [next(loader) for _ in range(accum)]
            t1 = time.perf_counter()
            logs = self.step(micro)
            t2 = time.perf_counter()
            t_data, t_step = t_data + t1 - t0, t_step + t2 - t1
            bar.update(1)
            bar.set_postfix(loss=f"{logs['total_loss']:.3f}", img_s=f"{self.global_batch * accum / (t2 - t0):.0f}")
            t = self.cfg.train
            if self.iteration % t.log_every == 0 or self.iteration == stop:
                logs.update(epoch=logs["iteration"] / self.iters_per_epoch, data_share=t_data / max(t_data + t_step, 1e-9),
                            images_per_s=self.global_batch * accum * t.log_every / max(t_data + t_step, 1e-9))
                t_data = t_step = 0.0
                self._warn_collapse(logs)
                self._log(logs)
            if t.knn_every and self.iteration % t.knn_every == 0 and self.iteration < stop:
                self._log({"iteration": self.iteration, "knn20_top1": self.knn()})
            if self.iteration % t.saveckp_every == 0 or self.iteration == stop:
                self.save()
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        path = self.out / "backbone.safetensors"
        acc = self.knn()
        backbone = self.objective.export_backbone()
        sd = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            if acc is not None:
                self._log({"iteration": self.iteration, "knn20_top1": acc, "final": True})
            export = type(backbone)(backbone.cfg)
            export.load_state_dict(sd)
            save_backbone(export, path)
        if dist.is_initialized():
            dist.barrier()
        return path
