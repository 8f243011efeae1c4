"""Data parallelism across the processes ``torchrun`` starts (one per rank).

Every rank holds the same weights: the same seed initialises them, each rank trains on its own
shard of every epoch, and after each backward pass the gradients are averaged over the ranks
(one all-reduce of all gradients, the semantics of PyTorch's DistributedDataParallel, with no
wrapper around the model, so that any objective may call into any part of it). Rank 0 alone
validates, and broadcasts the figures and its normalisation statistics, so that every rank
takes the same decisions (best epoch, early stop). Not under ``torchrun``, everything here is a
no-op and a stage runs as one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``): gloo on CPU, nccl on CUDA. False when this
    process was not started by ``torchrun`` with more than one rank."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not active():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def backend() -> str:
    """The process group's backend: ``gloo`` (CPU) or ``nccl`` (CUDA)."""
    return dist.get_backend() if active() else "none"


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks, in one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not active():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) to every rank."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def collective_device(backend_name: str, current_cuda: int | None) -> torch.device:
    """Where a collective's tensors live: nccl moves CUDA tensors only, and each rank's on
    its own GPU (``current_cuda``, set by ``graftline.train.set_up``); gloo moves CPU ones.
    Plain ``"cuda"`` would be cuda:0 on every rank."""
    if backend_name == "nccl":
        return torch.device("cuda", current_cuda or 0)
    return torch.device("cpu")


def broadcast_floats(*values: float) -> tuple[float, ...]:
    """Rank 0's ``values`` on every rank."""
    if not active():
        return values
    current = torch.cuda.current_device() if torch.cuda.is_available() else None
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(backend(), current))
    dist.broadcast(t, 0)
    return tuple(t.tolist())
