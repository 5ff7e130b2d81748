"""Pretrain ESM-2 with FSDP2: each transformer layer, then the whole model, sharded across all ranks.

    python train_fsdp2.py --config-name L0_sanity                       # one process (GPU, or CPU with gloo)
    torchrun --nproc_per_node=8 train_fsdp2.py --config-name L1_650M    # one node, eight GPUs

Parameters, gradients and optimizer state are split across ranks; each layer's full weights exist only while it
runs (all-gathered before, freed after), so a model far larger than one GPU trains. On GPU, parameters are gathered
in BF16 and gradients reduced in FP32, with FP32 master weights kept in the optimizer.
"""

from __future__ import annotations

import cli_help

cli_help.check_command_line(__doc__, __name__)  # --help and unknown keys at once, before torch's seconds
import contextlib
from collections.abc import Iterator

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from checkpoint import DistributedStateDict
from distributed import sharding_mesh
from model import build_model, compile_transformer_layers, materialize, transformer_layers
from training import Run, Strategy, run_entrypoint


def apply_fsdp2(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None, reshard: bool
) -> None:
    """`fully_shard` every transformer layer (its own all-gather unit), then the root (embeddings, LM head).

    `param_dtype`: what weights are all-gathered and computed in (None: their own dtype); `reduce_dtype`: what
    gradients are reduced in; `reshard`: free gathered weights after the forward (less memory, one more all-gather).
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)


@contextlib.contextmanager
def fsdp2_grad_sync(model: FSDPModule, sync: bool) -> Iterator[None]:
    """Skip the gradient reduce-scatter on gradient-accumulation micro-batches."""
    model.set_requires_gradient_sync(sync)
    yield


def build_sharded_model(run: Run) -> nn.Module:
    """The model built (on meta where possible), compiled if asked, sharded, then allocated."""
    cfg, context = run.cfg, run.context
    # The TE model is built on the meta device and each rank allocates only its shards; the small reference model
    # (CPU runs) is built whole, so its initial weights do not depend on the number of ranks.
    on_meta = cfg.use_meta_device and run.use_te and not cfg.pretrained
    device = "meta" if on_meta else context.device
    model = build_model(
        cfg, run.model_config, use_te=run.use_te, attn_input_format=run.layout.attn_input_format, device=device
    )
    if cfg.use_torch_compile:
        compile_transformer_layers(model)  # before sharding: FSDP2's hooks stay outside the compiled graphs
    mesh = sharding_mesh(context)  # every rank: data- and context-parallel ranks reduce gradients together
    on_gpu = context.uses_cuda  # CPU runs stay in FP32
    apply_fsdp2(
        model,
        mesh,
        param_dtype=torch.bfloat16 if on_gpu else None,
        reduce_dtype=torch.float32 if on_gpu else None,
        reshard=cfg.fsdp.reshard_after_forward,
    )
    if on_meta:
        materialize(model, context.device)  # allocates only this rank's shards
    return model


STRATEGY = Strategy(
    name="fsdp2",
    build_model=build_sharded_model,
    state_dict=DistributedStateDict(),  # sharded DCP: each rank writes its shards, resharded on load
    grad_sync=fsdp2_grad_sync,
    context_parallel=True,
    inert_keys=("mfsdp",),
)


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entrypoint(cfg, STRATEGY)


if __name__ == "__main__":
    main()
