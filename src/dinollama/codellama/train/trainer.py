"""Code Llama training: code pre-training with FIM, long-context fine-tuning, instruction tuning.

One loop serves all three: token windows (and optional loss targets) from ``prepare`` files,
AdamW (0.9, 0.95), linear warm-up then cosine to ``lr / 30``, clipping 1.0, bf16 autocast,
gradient accumulation, optional activation checkpointing and LoRA, torchrun with DDP or FSDP2,
exact resume from ``checkpoint.pth``, a JSONL log, a progress bar with tokens/s and a periodic
held-out loss.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ...distributed import setup
from ...memory import keep_freed_memory
from ...training import CosineSchedule, autocast_dtype, load_checkpoint, save_checkpoint
from ...training.options import checked
from ..model import ModelArgs, Transformer
from .lora import apply_lora, merge_lora
from .sft import IGNORE


@dataclass
class CodeTrainConfig:
    seq_len: int = 512
    batch_size: int = 16  # sequences per process and micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 1 / 30
    warmup_iters: int = 100
    max_iters: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0
    precision: str = "bf16"
    activation_checkpointing: bool = False
    lora_rank: int = 0  # > 0: train LoRA adapters only, merged into the weights at export
    lora_alpha: float = 32.0
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 200
    seed: int = 0
    parallel: str = "ddp"

    POSITIVE = ("seq_len", "batch_size", "grad_accum", "lr", "max_iters", "eval_batches", "log_every", "save_every")
    CHOICES = {"precision": ("bf16", "fp16", "fp32"), "parallel": ("ddp", "fsdp")}

    @classmethod
    def from_dict(cls, d: dict) -> CodeTrainConfig:
        """Options by name, type-checked (``--set max_iters=abc`` names the key and what it takes)."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown training option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return checked(cls(**d))


class TokenWindows:
    """``(N, seq_len + 1)`` int32 windows (memory-mapped ``.npy``) and optional loss targets."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no token windows (run 'dinollama train code --prepare' or prepare_corpus first)")
        self.tokens = np.load(path, mmap_mode="r")
        tpath = path.with_name(path.stem + ".targets.npy")
        self.targets = np.load(tpath, mmap_mode="r") if tpath.exists() else None

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.tokens[i] for i in ids]).astype(np.int64))
        if self.targets is None:
            return w[:, :-1], w[:, 1:]
        t = torch.from_numpy(np.stack([self.targets[i] for i in ids]).astype(np.int64))
        return w[:, :-1], t[:, 1:]


@lru_cache(maxsize=2)
def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of one epoch (cached: every sample of a batch asks for it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


class CodeTrainer:
    """``CodeTrainer(model, cfg, data_dir, output_dir).run()``; ``data_dir`` holds ``train.npy``
    (and ``val.npy``) token windows."""

    def __init__(self, model: Transformer, cfg: CodeTrainConfig, data_dir: str | Path, output_dir: str | Path,
                 tokenizer_file: str | Path | None = None, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(output_dir), progress
        self.tokenizer_file = tokenizer_file
        keep_freed_memory()
        self.rank, self.world, self.device = setup()
        torch.manual_seed(cfg.seed + self.rank)
        self.train = TokenWindows(Path(data_dir) / "train.npy")
        val = Path(data_dir) / "val.npy"
        self.val = TokenWindows(val) if val.exists() else None
        if self.train.tokens.shape[1] - 1 < cfg.seq_len:
            raise ValueError(f"{data_dir}/train.npy has windows of {self.train.tokens.shape[1] - 1} tokens, fewer than "
                             f"seq_len={cfg.seq_len}; prepare the data again with this length")
        model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
        self.model = model.to(self.device).train()
        if self.world > 1:  # every rank starts from rank 0's weights, however the model was made
            for t in self.model.state_dict().values():
                dist.broadcast(t, 0)
        self.wrapped = self._parallelize()
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2))
        self.lr = CosineSchedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.max_iters, cfg.warmup_iters)
        self.amp = autocast_dtype(cfg.precision)
        self.global_batch = cfg.batch_size * self.world
        self.iteration = 0

    def _parallelize(self) -> nn.Module:
        if self.world == 1:
            return self.model
        if self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.layers:
                fully_shard(layer)
            fully_shard(self.model)
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _micro_ids(self, micro: int) -> list[int]:
        """Rank's window indices at micro-step ``micro`` of the seeded, epoch-wise shuffled stream."""
        n, b = len(self.train), self.cfg.batch_size
        out = []
        for pos in range(micro * self.global_batch + self.rank * b, micro * self.global_batch + (self.rank + 1) * b):
            epoch, off = divmod(pos, n)
            out.append(_order(n, self.cfg.seed, epoch)[off])
        return out

    def loss(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = model or self.wrapped
        x, y = x[:, : self.cfg.seq_len].to(self.device), y[:, : self.cfg.seq_len].to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            logits = model(x, train=True)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)

    def step(self) -> dict:
        it, cfg = self.iteration, self.cfg
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr[it]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for a in range(cfg.grad_accum):
            x, y = self.train.batch(self._micro_ids(it * cfg.grad_accum + a))
            sync = a == cfg.grad_accum - 1
            ctx = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) else nullcontext()
            with ctx:
                loss = self.loss(x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at iteration {it}; lower lr (now {self.lr[it]:.3g}) "
                                             f"or raise warmup_iters; last checkpoint: {self.out / 'checkpoint.pth'}")
                (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad)
        self.optimizer.step()
        self.iteration += 1
        return {"iteration": it, "lr": self.lr[it], "loss": total,
                "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first ``eval_batches`` held-out batches (the same every time)."""
        if self.val is None:
            return None
        self.model.eval()
        losses = []
        b = self.cfg.batch_size
        for i in range(min(self.cfg.eval_batches, math.ceil(len(self.val) / b))):
            x, y = self.val.batch(list(range(i * b, min(len(self.val), (i + 1) * b))))
            losses.append(float(self.loss(x, y, self.model)))
        self.model.train()
        return sum(losses) / len(losses)

    def _log(self, rec: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save(self) -> None:
        save_checkpoint(self.out / "checkpoint.pth", self.model, self.model, self.optimizer,
                        {"iteration": self.iteration, "config": asdict(self.cfg), "model_args": self.model.params.to_dict()})

    def run(self, stop_at: int | None = None) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.out / "checkpoint.pth"
        if ckpt.exists():
            self.iteration = int(load_checkpoint(ckpt, self.model, self.model, self.optimizer)["iteration"])
        stop = min(self.cfg.max_iters, stop_at or self.cfg.max_iters)
        bar = tqdm(total=stop, initial=self.iteration, disable=not self.progress or self.rank != 0, unit="it", desc="train")
        tokens_per_step = self.global_batch * self.cfg.grad_accum * self.cfg.seq_len
        while self.iteration < stop:
            t0 = time.perf_counter()
            rec = self.step()
            rec["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if self.iteration % self.cfg.log_every == 0 or self.iteration == stop:
                self._log(rec)
            if self.cfg.eval_every and self.iteration % self.cfg.eval_every == 0:
                self._log({"iteration": self.iteration, "val_loss": self.evaluate()})
            if self.iteration % self.cfg.save_every == 0 or self.iteration == stop:
                self.save()
        bar.close()
        return self.export()

    def export(self) -> Path:
        """The trained weights as a native model folder (``dinollama.codellama.load`` reads it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..checkpoint import save_native
        from ..tokenizer import Tokenizer

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        folder = self.out / "model"
        if self.rank == 0:
            model = Transformer(self.model.params)
            if self.cfg.lora_rank:
                apply_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha)
            model.load_state_dict(sd)
            merge_lora(model)
            tok = Tokenizer(self.tokenizer_file) if self.tokenizer_file else None
            save_native(model, folder, tok)
        if dist.is_initialized():
            dist.barrier()
        return folder


def with_context(model: Transformer, rope_theta: float, max_seq_len: int) -> Transformer:
    """Long-context fine-tuning starts here: the same weights, a new RoPE base and context length."""
    new = Transformer(replace(model.params, rope_theta=rope_theta, max_seq_len=max_seq_len))
    new.load_state_dict(model.state_dict())
    return new


def model_args_from(d: dict) -> ModelArgs:
    return ModelArgs(**{k: v for k, v in d.items() if k in ModelArgs.__dataclass_fields__})
