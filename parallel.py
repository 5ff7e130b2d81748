"""Strategy-neutral pieces the parallelism entrypoints share (`train_ddp.py`, `train_fsdp2.py`, `train_mfsdp.py`).

Everything here works the same whatever wraps the model; what differs between strategies stays in their entrypoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from model import transformer_layers


def use_torch_compile(cfg: Any) -> bool:
    """The `use_torch_compile` switch (off unless set, so configurations written before it existed still run)."""
    return bool(cfg.get("use_torch_compile", False))


def compile_transformer_layers(model: nn.Module) -> None:
    """`torch.compile` each transformer layer in place, before the strategy wraps the model.

    Compiling the repeated block rather than the whole model keeps the strategy's own hooks (DDP's gradient buckets,
    FSDP's all-gathers) outside the compiled graphs, and all layers share one compiled graph, so compile time does
    not grow with depth.
    """
    for layer in transformer_layers(model):
        layer.compile()


@dataclass(frozen=True)
class LocalGradient:
    """The part of one parameter's gradient held by this rank.

    `sharded`: the ranks' parts together make up the gradient (FSDP2, Megatron-FSDP), so sums of squares add up over
    ranks; otherwise every rank holds all of it (DDP, one process, replicated DTensors).
    """

    name: str
    tensor: torch.Tensor
    sharded: bool


def local_gradients(model: nn.Module) -> list[LocalGradient]:
    """The gradient parts this rank holds, whatever the strategy; parameters with no gradient here are left out.

    Megatron-FSDP shards unevenly: a rank may hold nothing of a parameter and then has no gradient for it at all, so
    ranks can return different lists. Names drop the wrappers' `module.` prefix, so strategies compare directly.
    """
    parts = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        sharded = isinstance(grad, DTensor) and any(placement.is_shard() for placement in grad.placements)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        parts.append(LocalGradient(name.removeprefix("module."), local, sharded))
    return parts


def parameter_memory_gib(model: nn.Module) -> tuple[float, float]:
    """(GiB of parameters this rank stores, GiB of the whole model's parameters): what sharding saves per GPU.

    Counts the parameters the optimizer steps (FP32 master weights where the strategy keeps them), each tied weight
    once; a sharded parameter counts its local shard on this rank and its full size in the total.
    """
    local = whole = 0
    for param in model.parameters():
        stored = param.to_local() if isinstance(param, DTensor) else param
        local += stored.numel() * stored.element_size()
        whole += param.numel() * param.element_size()
    return local / 2**30, whole / 2**30


@torch.no_grad()
def normal_init_(param: torch.Tensor, std: float) -> None:
    """Fill `param` from N(0, std) with the values it would get unsharded, whatever the number of ranks.

    Every rank draws the whole tensor from the (identically seeded) global generator and keeps its own shard, so an
    FSDP2-sharded model starts from the same weights on 1, 2 or N GPUs. DTensor's own random ops do not promise
    that: on GPU each shard gets a different part of the random stream depending on how many shards there are, and
    on CPU every rank draws the same numbers for its shard. One parameter at a time is whole on each rank.
    """
    if not isinstance(param, DTensor):
        param.normal_(mean=0.0, std=std)
        return
    local = param.to_local()
    full = torch.empty(param.shape, dtype=local.dtype, device=local.device).normal_(mean=0.0, std=std)
    local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
