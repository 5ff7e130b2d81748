"""Strategy-neutral pieces the parallelism entrypoints share (`train_ddp.py`, `train_fsdp2.py`, `train_mfsdp.py`).

Everything here works the same whatever wraps the model; what differs between strategies stays in their entrypoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

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
