"""torchrun setup shared by every command: process group, device, and CPU threads per process."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def setup() -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; joins the process group when started by ``torchrun``.

    On CPU each process gets ``cores // processes`` threads: oversubscribed OpenMP threads spin
    against each other and can be many times slower.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return int(os.environ.get("RANK", "0")), world, device


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the joined process group, ``(0, 1)`` outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown(synchronize: bool = False) -> None:
    """Leave the process group before the interpreter exits.

    A gloo group still alive at exit can abort a process ("terminate called without an active
    exception") after its work is done, which torchrun reports as a failed run; so can a rank that
    closes its connections while another is still leaving (seen once, FSDP under load). So after a
    command that succeeded (``synchronize``) the ranks first meet, for at most a minute; after an
    error on one rank the others must not wait for it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:  # a rank that never came: leave anyway
            pass
    dist.destroy_process_group()
