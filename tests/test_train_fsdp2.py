"""train_fsdp2.py's wrapping on one CPU rank (gloo, in this process): what `fsdp.reshard_after_forward` changes."""

import pytest
import torch
import torch.distributed as dist
from conftest import compose, tiny_esm_config
from torch.distributed.tensor import DTensor

import train_fsdp2
from collator import BatchLayout
from distributed import DistributedContext
from training import Run

TINY_ESM = tiny_esm_config()


@pytest.fixture
def one_rank():
    """A one-rank gloo process group in this process (FSDP2 needs one), left again after the test."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    dist.destroy_process_group()


def sharded(module):
    """Whether each of the module's parameters is the sharded DTensor (not the gathered full weight)."""
    return {isinstance(param, DTensor) for param in module.parameters()}


@pytest.mark.parametrize("reshard", [True, False])
def test_reshard_after_forward_decides_whether_the_gathered_weights_stay_for_the_backward(one_rank, reshard):
    cfg = compose("L0_sanity", [f"fsdp.reshard_after_forward={str(reshard).lower()}"])
    run = Run(cfg=cfg, context=one_rank, tokenizer=None, model_config=TINY_ESM, use_te=False,
              layout=BatchLayout.from_config(cfg), train_stream=None, validation_loader=None)  # fmt: skip
    model = train_fsdp2.build_sharded_model(run)
    layers = model.esm.encoder.layer
    assert all(sharded(layer) == {True} for layer in layers)  # at rest: shards only
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 2]])
    output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    # true: each layer frees its gathered weights after its forward (the backward gathers them again); false: kept
    assert all(sharded(layer) == {reshard} for layer in layers)
    output.logits.square().mean().backward()
    assert all(sharded(layer) == {True} for layer in layers)  # the backward always ends sharded
    assert all(param.grad is not None for param in layers[0].parameters())
