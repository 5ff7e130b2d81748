"""ESM-2's initial weights: the same on one and two FSDP2 ranks (CPU, gloo), and under Megatron-FSDP's protocol."""

import itertools
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose, free_port
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from initialization import esm2_init_on_materialisation, normal_init_
from model import build_model, load_model_config

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
    dist.barrier()  # no rank tears the group down while another still talks to it
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


def test_megatron_fsdp_meta_materialisation_gives_esm2_init():
    """Megatron-FSDP's meta-device protocol, replayed on CPU: per owning module, to_empty then reset_parameters."""
    cfg = compose("L0_sanity")
    model = build_model(cfg, load_model_config(cfg.model_tag), use_te=False, attn_input_format="bshd", device="meta")
    with esm2_init_on_materialisation(model, torch.device("cpu")):
        owner = {}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                owner[param] = module  # the last module holding a shared weight, as Megatron-FSDP records it
        for module in dict.fromkeys(owner.values()):
            module.to_empty(device="cpu", recurse=False)
            module.reset_parameters()

    named = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    assert not [name for name, tensor in named.items() if tensor.is_meta]
    assert model.lm_head.decoder.weight is model.esm.embeddings.word_embeddings.weight
    assert not [m for m in model.modules() if "reset_parameters" in vars(m)]  # the hooks are gone again
    std = model.config.initializer_range
    for name, tensor in model.named_parameters():
        if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight") or "layer_norm_after.w" in name:
            assert torch.all(tensor == 1), name
        elif name.endswith("bias"):
            assert torch.all(tensor == 0), name
        elif tensor.dim() == 2 and tensor.numel() > 1000:
            assert abs(tensor.std().item() - std) < 0.1 * std, name
    assert torch.all(model.esm.embeddings.word_embeddings.weight[model.config.pad_token_id] == 0)
    reference = type(model)(model.config)
    for name, buffer in reference.named_buffers():
        assert torch.equal(named[name], buffer), name
