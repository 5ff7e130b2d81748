"""Tensors across strategies: the gradients and parameters each rank holds, however the model is wrapped.

DDP replicates every tensor; FSDP2 shards each parameter evenly (DTensor `Shard(0)`); Megatron-FSDP shards unevenly,
and a rank may hold nothing of a parameter. Norms, clipping and memory counts here are right for all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from distributed import all_reduce_sum

WRAPPER_PREFIX = "module."  # what DDP and Megatron-FSDP put in front of the wrapped model's parameter names


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP or Megatron-FSDP wrapper (FSDP2 wraps in place: the model itself)."""
    return getattr(model, "module", model)


def plain_name(name: str) -> str:
    """A parameter's name without the wrapper's prefix, so strategies compare and export directly."""
    return name.removeprefix(WRAPPER_PREFIX)


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
    ranks can return different lists.
    """
    parts = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        sharded = isinstance(grad, DTensor) and any(placement.is_shard() for placement in grad.placements)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        parts.append(LocalGradient(plain_name(name), local, sharded))
    return parts


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by dtype, for foreach kernels.

    Over a list of mixed dtypes (BF16 weights beside FP32 ones) a CUDA foreach op falls back to one kernel per tensor.
    """
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    norms = [norm for group in _by_dtype(tensors) for norm in torch._foreach_norm(group, 2, dtype=torch.float32)]
    return torch.stack(norms).square().sum()


def _device_of(model: nn.Module) -> torch.device:
    local = next(model.parameters())
    return (local.to_local() if isinstance(local, DTensor) else local).device


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip every gradient by the global norm over all ranks; returns that norm (a device tensor: no host sync).

    Each rank adds up the squares of what it holds; one all-reduce sums the sharded part over ranks (replicated
    gradients count once), and every rank scales its own parts by the same factor. The number of collectives never
    depends on what a rank holds, so uneven Megatron-FSDP shards cannot hang it (torch's `clip_grad_norm_` did, on
    two H200s).
    """
    parts = local_gradients(model)
    device = _device_of(model)
    sharded = [part.tensor for part in parts if part.sharded]
    replicated = [part.tensor for part in parts if not part.sharded]
    total = (all_reduce_sum(_sum_of_squares(sharded, device)) + _sum_of_squares(replicated, device)).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for group in _by_dtype([grad for grad in sharded + replicated if grad.numel() > 0]):
        # In the group's dtype: a scale of another dtype sends the foreach op to one kernel per tensor as well. A BF16
        # scale is off by at most 2^-9 of itself; 1.0 (no clipping) stays exact.
        torch._foreach_mul_(group, scale.to(group[0].dtype))
    return total


@torch.no_grad()
def gradient_norms(model: nn.Module) -> dict[str, float]:
    """Every parameter's gradient L2 norm over all ranks (0 where no rank has one), keyed by name without wrappers.

    A debugging aid that compares strategies and GPU counts parameter by parameter: with the same weights and global
    batch, DDP, FSDP2 and Megatron-FSDP on any number of ranks must agree. One collective and one host sync.
    """
    names = [plain_name(name) for name, _ in model.named_parameters()]  # the same list on every rank
    position = {name: index for index, name in enumerate(names)}
    device = _device_of(model)
    sharded, replicated = (torch.zeros(len(names), device=device) for _ in range(2))
    for part in local_gradients(model):
        (sharded if part.sharded else replicated)[position[part.name]] = part.tensor.float().square().sum()
    return dict(zip(names, (all_reduce_sum(sharded) + replicated).sqrt().tolist(), strict=True))


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
