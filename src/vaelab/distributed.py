"""Several processes, one model: torchrun and DistributedDataParallel (DDP).

``torchrun --nproc-per-node N -m vaelab train ...`` (or ``vaelab train --nproc N``) starts N
processes with RANK / WORLD_SIZE / MASTER_ADDR in their environment; :func:`setup` joins
them into one process group (nccl on CUDA, gloo on CPU). Each rank takes its rows of every
global batch; DDP averages the gradients; epoch metrics are summed across ranks before
rank 0 logs them; only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device_kind: str) -> Context:
    """Join the process group that torchrun describes in the environment, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def current() -> Context:
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Context()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (``t`` itself when alone)."""
    if current().active:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated in rank order (``t`` itself when alone)."""
    if not current().active:
        return t
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts).to(t.device)


def barrier() -> None:
    if current().active:
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
