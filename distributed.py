"""The process group, the (data-parallel, context-parallel) mesh, and the few collectives the recipe uses.

The group comes from torchrun's environment, or is a one-rank group for a plain `python train_*.py`; every collective
is a no-op in a single process. With context parallelism (`cp_size` > 1) the ranks form a (dp, cp) grid, row-major:
rank r is data-parallel rank r // cp_size and context-parallel rank r % cp_size, so a CP group is cp_size
neighbouring ranks (one node's NVLink for cp_size up to the GPUs of a node).
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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

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
    cp_size: int = 1  # ranks that split each sequence between them (context parallelism); 1: none

    def __post_init__(self) -> None:
        if self.cp_size < 1 or self.world_size % self.cp_size:
            raise ValueError(f"cp_size={self.cp_size} must divide the world size {self.world_size}")

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: groups of `cp_size` ranks, each group training on its own batches."""
        return self.world_size // self.cp_size

    @property
    def dp_rank(self) -> int:
        """Which batches this rank's CP group reads: every rank of one CP group builds the same batch."""
        return self.rank // self.cp_size

    @property
    def cp_rank(self) -> int:
        """Which chunks of every sequence this rank keeps (context_parallel.rank_chunks)."""
        return self.rank % self.cp_size

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


def init_distributed(timeout_minutes: float = 30.0, cp_size: int = 1) -> DistributedContext:
    """Join the process group torchrun describes: NCCL for CUDA tensors, gloo for CPU tensors (and CPU-only runs).

    A single process started without torchrun gets a one-rank group on a free local port, so the same FSDP2 and
    checkpoint code paths run everywhere. `cp_size` splits the ranks into a (dp, cp) grid (config_validation has
    checked that it divides the world size).
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
    context = DistributedContext(rank, local_rank, world_size, device, cp_size)
    logger.info("Rank %d/%d on %s (backend %s).", rank, world_size, device, backend)
    if cp_size > 1:
        grid = (context.dp_rank, context.dp_size, context.cp_rank, context.cp_size)
        logger.info("Context parallelism: data-parallel rank %d/%d, CP rank %d/%d.", *grid)
    return context


_MESHES: dict[int, DeviceMesh] = {}  # cp_size -> the job's (dp, cp) mesh, built once per process group


def parallel_mesh(cp_size: int) -> DeviceMesh:
    """The job's (dp, cp) device mesh, row-major over the ranks (built once: it creates process groups).

    `mesh["cp"].get_group()` is this rank's CP group (TE's ring attention, token-dropout counts); gradients are
    reduced over all dp x cp ranks, the whole world (see `sharding_mesh`).
    """
    if cp_size not in _MESHES:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"  # as init_distributed chose the backend
        shape = (world_size() // cp_size, cp_size)
        _MESHES[cp_size] = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "cp"))
    return _MESHES[cp_size]


def sharding_mesh(context: DistributedContext) -> DeviceMesh:
    """The 1-D mesh FSDP2 shards and reduces gradients over: every rank, the (dp, cp) grid flattened.

    CP ranks hold different tokens of the same batch, so their gradients must be summed like data-parallel ones
    (torchtitan's `dp_shard_cp`); averaging over all dp x cp ranks, with `training.global_loss_scale`, gives the
    gradients of one GPU holding every sequence whole. Row-major flattening is the global rank order.
    """
    name = "dp_cp" if context.cp_size > 1 else "dp"
    return init_device_mesh(context.device.type, (context.world_size,), mesh_dim_names=(name,))


def destroy_distributed() -> None:
    """Leave the process group once every rank is done (a rank tearing down mid-collective aborts the others)."""
    if dist.is_initialized():
        dist.barrier()
        _MESHES.clear()
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
