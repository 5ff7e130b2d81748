"""The process group and the few collectives the recipe uses, each a no-op in a single process.

The group comes from torchrun's environment, or is a one-rank group for a plain `python train_*.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# What a batch system sends before it ends a job (SLURM: SIGUSR1 ahead of the time limit if asked, SIGTERM at it;
# Kubernetes: SIGTERM). torchrun forwards SIGTERM to every rank; `scancel` and time limits signal every process.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For helper processes (DataLoader workers): leave shutdown to the main process, which stops them itself.

    A signal to the whole process group would otherwise kill the workers while the main process is still saving
    its checkpoint, and the DataLoader's worker watchdog would then abort the save.
    """
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job and which device it drives."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_cuda(self) -> bool:
        return self.device.type == "cuda"

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group torchrun describes: NCCL for CUDA tensors, gloo for CPU tensors (and CPU-only runs).

    A single process started without torchrun gets a one-rank group on a free local port, so the same FSDP2 and
    checkpoint code paths run everywhere.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    context = DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    logger.info("Rank %d/%d on %s (backend %s).", rank, world_size, device, backend)
    return context


def destroy_distributed() -> None:
    """Leave the process group once every rank is done (a rank tearing down mid-collective aborts the others)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(context: DistributedContext) -> Iterator[None]:
    """Let one process per node build node-local caches (tokenized datasets) before the others read them."""
    builds_first = context.local_rank == 0
    if not builds_first:
        context.barrier()
    try:
        yield
    finally:
        if builds_first:
            context.barrier()


def is_distributed() -> bool:
    """Whether collectives have anyone to talk to (a process group of more than one rank)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (on its own device: no host sync) and return it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on at least one rank: a CPU (gloo) collective, so the GPU is not waited for."""
    value = torch.tensor([1.0 if flag else 0.0])
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` (any picklable object) on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
