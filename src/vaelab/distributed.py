"""Several processes, one model: torchrun and DistributedDataParallel (DDP).

``torchrun --nproc-per-node N -m vaelab train ...`` (or ``vaelab train --nproc N``) starts N
processes with RANK / WORLD_SIZE / MASTER_ADDR in their environment; :func:`setup` joins
them into one process group (nccl on CUDA, gloo on CPU). Each rank takes its rows of every
global batch; DDP averages the gradients; epoch metrics are summed across ranks before
rank 0 logs them; only rank 0 writes files.

Shutting down cleanly. A gloo worker thread that drops the last reference to a
collective's tensor must take the GIL to free the tensor's Python object; if that happens
while the interpreter is finalising, the thread cannot take it and the process aborts
("terminate called without an active exception", SIGABRT), typically on a rank that exits
right after its last collective. :func:`teardown` destroys the process group, which joins
its worker threads, so none is left at exit. DistributedDataParallel keeps the group it is
given alive after ``destroy_process_group`` (its C++ reducer holds it), so DDP gets a group
of its own (:func:`gradient_group`): it carries only DDP's bucket tensors, which have no
Python objects, and the default group, which carries vaelab's own collectives, is really
destroyed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vaelab.errors import UserError


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


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (a CUDA GPU where PyTorch sees one, else the CPU), cpu or cuda."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rank_device(device: torch.device, ctx: Context) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU of its local rank (made current)."""
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device_kind: str) -> Context:
    """Join the process group that torchrun describes in the environment, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        store, rank, world = next(dist.rendezvous("env://"))
        # torchrun --max-restarts starts the workers again against the same key-value store (the
        # agent's, shared across rounds); without a prefix of its own, a restarted rank can read the
        # address a dead rank of the last attempt published and fail to connect to it
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"vaelab/attempt_{attempt}", store), rank=rank, world_size=world
        )
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def session(device_kind: str) -> Iterator[Context]:
    """:func:`setup` on entry, :func:`teardown` on every way out (errors included)."""
    try:
        yield setup(device_kind)
    finally:
        teardown()


def gradient_group():
    """A process group for DistributedDataParallel's gradient all-reduce (see the module docstring).

    A collective: every rank calls it, in the same order."""
    return dist.new_group(backend=dist.get_backend())


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
    """Destroy every process group (a no-op when there is none): this joins the gloo worker threads."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
