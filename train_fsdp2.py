"""Pretrain ESM-2 with FSDP2: each transformer layer, then the whole model, sharded across all ranks.

    python train_fsdp2.py --config-name L0_sanity                       # one process (GPU, or CPU with gloo)
    torchrun --nproc_per_node=8 train_fsdp2.py --config-name L1_650M    # one node, eight GPUs

Parameters, gradients and optimizer state are split across ranks; each layer's full weights exist only while it
runs (all-gathered before, freed after), so a model far larger than one GPU trains. On GPU, parameters are gathered
in BF16 and gradients reduced in FP32, with FP32 master weights kept in the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from checkpoint import DistributedStateDict
from model import build_model, materialize, transformer_layers
from parallel import compile_transformer_layers, use_torch_compile
from training import Run, build_optimizer, build_scheduler, setup_run, train


def shard_model(model: nn.Module, run: Run) -> None:
    """`fully_shard` every transformer layer (its own all-gather unit), then the root (embeddings, LM head)."""
    context = run.context
    mesh = init_device_mesh(context.device.type, (context.world_size,), mesh_dim_names=("dp",))
    if context.uses_cuda:
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp_policy = MixedPrecisionPolicy()  # CPU runs stay in FP32
    reshard = bool(run.cfg.fsdp.reshard_after_forward)
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)


@contextlib.contextmanager
def fsdp2_grad_sync(model: FSDPModule, sync: bool) -> Iterator[None]:
    """Skip the gradient reduce-scatter on gradient-accumulation micro-batches."""
    model.set_requires_gradient_sync(sync)
    yield


def build_sharded_model(run: Run) -> nn.Module:
    """The model as this strategy trains it: built (on meta where possible), compiled if asked, sharded, allocated."""
    cfg = run.cfg
    # The TE model is built on the meta device and each rank allocates only its shards; the small reference model
    # (CPU runs) is built whole, so its initial weights do not depend on the number of ranks.
    on_meta = bool(cfg.use_meta_device) and run.use_te and not cfg.pretrained
    model = build_model(cfg, run.model_config, use_te=run.use_te, device="meta" if on_meta else run.context.device)
    if use_torch_compile(cfg):
        compile_transformer_layers(model)  # before sharding: FSDP2's hooks stay outside the compiled graphs
    shard_model(model, run)
    if on_meta:
        materialize(model, run.context.device)  # allocates only this rank's shards
    return model


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run = setup_run(cfg)
    model = build_sharded_model(run)
    optimizer = build_optimizer(cfg, model, run.context.device)
    scheduler = build_scheduler(cfg, optimizer)
    train(run, model, optimizer, scheduler, DistributedStateDict(), grad_sync=fsdp2_grad_sync)  # sharded DCP


if __name__ == "__main__":
    main()
