"""FSDP2-sharded initialisation gives the same weights on one and on two ranks (CPU, gloo)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from parallel import normal_init_

SEED, STD = 1234, 0.02


def build() -> nn.Module:
    # 7 and 5 rows: uneven shards over two ranks, as FSDP2 pads them.
    return nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 5))


def initialise(model: nn.Module) -> None:
    torch.manual_seed(SEED)
    for param in model.parameters():
        normal_init_(param, STD)


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with torch.device("meta"):
        model = build()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    initialise(model)
    full = {name: param.full_tensor().detach().clone() for name, param in model.named_parameters()}
    local = {name: param.to_local().numel() for name, param in model.named_parameters()}
    if rank == 0:
        results[world] = (full, local)
    dist.destroy_process_group()


def test_sharded_initialisation_does_not_depend_on_the_number_of_ranks():
    results = mp.Manager().dict()
    for world in (1, 2):
        mp.spawn(_worker, args=(world, free_port(), results), nprocs=world, join=True)
    unsharded = build()
    initialise(unsharded)
    (one, one_local), (two, two_local) = results[1], results[2]
    for name, param in unsharded.named_parameters():
        assert torch.equal(one[name], param.detach()), name
        assert torch.equal(two[name], param.detach()), name
        assert param.std() > 0.5 * STD  # really drawn, not zeros
    assert two_local["0.weight"] == 4 * 6 and one_local["0.weight"] == 7 * 6  # rank 0 of 2 holds only its rows
