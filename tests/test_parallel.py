"""Norms and clipping across strategies: replicated gradients, and Megatron-FSDP's uneven shards on two CPU ranks."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

# Full gradients of three parameters, laid out as Megatron-FSDP shards them over two ranks: uneven row ranges of the
# first (rank 0 rows 0-2, rank 1 row 3), the second held by rank 0 alone (rank 1 has no gradient for it), the third
# replicated on both ranks.
FULL = {
    "weight": torch.arange(1.0, 9.0).reshape(4, 2),
    "bias": torch.tensor([3.0, -4.0]),
    "scale": torch.tensor([0.5, 0.5]),
}
ROWS = {0: {"weight": slice(0, 3), "bias": slice(0, 2)}, 1: {"weight": slice(3, 4), "bias": None}}


def _worker(rank: int, port: int, max_norm: float, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from parallel import clip_grad_norm_

    mesh = init_device_mesh("cpu", (2,))
    model = nn.Module()
    for name, full in FULL.items():
        setattr(model, name, nn.Parameter(torch.zeros_like(full)))
    for name in ("weight", "bias"):
        rows = ROWS[rank][name]
        if rows is not None:
            local = FULL[name][rows].clone()
            param = getattr(model, name)
            shape, stride = FULL[name].shape, FULL[name].stride()
            param.grad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
    model.scale.grad = DTensor.from_local(FULL["scale"].clone(), mesh, [Replicate()], run_check=False)
    norm = clip_grad_norm_(model, max_norm)
    shards = {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.grad is not None}
    results[rank] = (float(norm), shards)
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


@pytest.mark.parametrize("max_norm", [1.0, 1000.0])
def test_clipping_uses_the_global_norm_of_uneven_shards(max_norm):
    expected_norm = torch.cat([t.flatten() for t in FULL.values()]).norm().item()
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), max_norm, results), nprocs=2, join=True)
    factor = min(1.0, max_norm / (expected_norm + 1e-6))
    for rank in (0, 1):
        norm, shards = results[rank]
        assert norm == pytest.approx(expected_norm, rel=1e-6)  # both ranks, although rank 1 has no `bias` gradient
        for name, rows in ROWS[rank].items():
            if rows is None:
                assert name not in shards
            else:
                torch.testing.assert_close(shards[name], FULL[name][rows] * factor)
        torch.testing.assert_close(shards["scale"], FULL["scale"] * factor)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_replicated_gradients_matches_torch(max_norm):
    from parallel import clip_grad_norm_

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    inputs = torch.randn(7, 5)
    for model in models:
        model(inputs).square().sum().backward()
    ours = clip_grad_norm_(models[0], max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(models[1].parameters(), max_norm)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for mine, reference in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-6, atol=0)


def test_clipping_gradients_of_mixed_dtypes_uses_float32_norms():
    """BF16 gradients beside FP32 ones (BF16 weights, FP32 norms): the norm is summed in float32 from every
    gradient, and each gradient is scaled by the same factor, rounded to its own dtype."""
    from parallel import clip_grad_norm_

    torch.manual_seed(1)
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(5, 4))
    model.b = nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    grads = {"a": torch.randn(5, 4), "b": torch.randn(300).to(torch.bfloat16)}
    for name, grad in grads.items():
        getattr(model, name).grad = grad.clone()
    total = torch.cat([grad.double().flatten() for grad in grads.values()]).norm()
    norm = clip_grad_norm_(model, max_norm=0.5)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), total, rtol=1e-6, atol=0)
    scale = 0.5 / (norm + 1e-6)
    for name, grad in grads.items():
        clipped = getattr(model, name).grad
        assert clipped.dtype == grad.dtype
        expected = (grad.float() * scale.to(grad.dtype).float()).to(grad.dtype)
        torch.testing.assert_close(clipped, expected, rtol=0, atol=0)
