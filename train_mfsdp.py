"""Pretrain ESM-2 with Megatron-FSDP: NVIDIA's fully sharded data parallelism, with communication overlapped.

    torchrun --nproc_per_node=8 train_mfsdp.py --config-name L1_650M                    # one node, eight GPUs
    torchrun --nproc_per_node=8 train_mfsdp.py --config-name L1_3B mfsdp.zero_dp_strategy=optim_grads
    sbatch --nodes=4 slurm.sh train_mfsdp.py --config-name L1_15B                        # several nodes

Pick Megatron-FSDP, like FSDP2, for models whose weights, gradients and AdamW state do not fit on one GPU (650M to
15B). It keeps each transformer layer's weights and gradients in flat communication buffers, prefetches the next
layer's all-gather while the current one computes and reduce-scatters gradients during the backward pass; how much
is sharded (ZeRO-1, 2 or 3) is one setting, `mfsdp.zero_dp_strategy`. It needs CUDA GPUs. Numerics match
train_fsdp2.py: BF16 compute weights, FP32 main weights (BF16 with use_fp32_master_weights=false), gradients reduced
and accumulated in FP32 (`mfsdp.grad_reduce_dtype`).
"""

from __future__ import annotations

import cli_help

cli_help.check_command_line(__doc__, __name__)  # --help and unknown keys at once, before torch's seconds
import contextlib
import logging
from collections.abc import Iterator

import hydra
import torch
from megatron_fsdp import MegatronFSDP, MixedPrecisionPolicy, fully_shard_model, fully_shard_optimizer
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from checkpoint import MegatronFSDPStateDict
from initialization import esm2_init_on_materialisation
from model import build_model, cast_parameters, return_tuple_outputs, transformer_layers
from precision import fp8_enabled
from training import Run, Strategy, run_entrypoint

logger = logging.getLogger(__name__)


def apply_megatron_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    device: torch.device,
    *,
    zero_dp_strategy: str,
    main_params_dtype: torch.dtype | None,
    main_grads_dtype: torch.dtype | None,
    overlap_grad_reduce: bool = True,
    overlap_param_gather: bool = True,
    on_meta: bool = False,
) -> MegatronFSDP:
    """Wrap `model` in Megatron-FSDP: one FSDP unit per transformer layer, embeddings and LM head in the rest.

    `mesh` has a data-parallel dimension "dp" and a trivial tensor-parallel one "tp" (Megatron-FSDP wants one for TE
    layers). The model's weights become the BF16 compute weights, all-gathered and multiplied; Megatron-FSDP keeps
    `main_params_dtype` main weights for the optimizer, copied from them (None: the optimizer steps the compute
    weights), and accumulates gradients in `main_grads_dtype` (None: the weights' dtype), so a model built whole in
    FP32 starts from BF16-rounded weights, unlike FSDP2. `on_meta`: Megatron-FSDP materialises the meta-device model
    module by module, with ESM-2's initial weights.
    """
    cast_parameters(model, torch.bfloat16)
    return_tuple_outputs(model)
    initialisation = esm2_init_on_materialisation(model, device) if on_meta else contextlib.nullcontext()
    with initialisation:
        return fully_shard_model(
            module=model,
            device_mesh=mesh,
            dp_shard_dim="dp",
            tp_dim="tp",
            fsdp_unit_modules=list({type(layer) for layer in transformer_layers(model)}),
            zero_dp_strategy=zero_dp_strategy,
            device=device,
            init_model_with_meta_device=on_meta,
            # Gradients travel in the dtype they are accumulated in: a narrower grad_comm_dtype inflated the gradient
            # norm 3-4x under optim_grads_params with megatron-fsdp 0.6.1, so it is left at its default.
            mixed_precision_policy=MixedPrecisionPolicy(
                main_params_dtype=main_params_dtype, main_grads_dtype=main_grads_dtype
            ),
            overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather,
            # training.global_loss_scale assumes the strategy AVERAGES gradients over ranks, as DDP and FSDP2 do: with
            # calculate_per_token_loss=False Megatron-FSDP scales by 1/world_size and sums (True would only sum).
            # average_in_collective=True fails in megatron-fsdp 0.6.1 without an expert-parallel group.
            calculate_per_token_loss=False,
            average_in_collective=False,
            # Reduce at the end of each backward (off on accumulation micro-batches) so clipping sees reduced grads.
            sync_model_each_microbatch=True,
        )


def shard_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Hook the optimizer (built on Megatron-FSDP's main weights) into Megatron-FSDP.

    Its step() then copies the updated main weights into the compute weights, and zero_grad() also clears the
    gradient buffers. `fully_shard_optimizer` creates the optimizer state eagerly by stepping once on zero
    gradients; at the configured learning rate AdamW's weight decay would shrink the weights, and the step count
    left behind would change Adam's bias correction on the real first steps. So that step runs at learning rate 0
    and the counts are reset: the state is then exactly what a fresh AdamW builds on its first step.
    """
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    fully_shard_optimizer(optimizer)
    for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
        group["lr"] = lr
    for state in optimizer.state.values():
        state["step"].zero_()
    return optimizer


@contextlib.contextmanager
def mfsdp_grad_sync(model: MegatronFSDP, sync: bool) -> Iterator[None]:
    """Finish gradient reduction only on a step's last micro-batch.

    On earlier micro-batches auto-sync is off, so sharded-gradient strategies overlap their reduce-scatter with the
    next micro-batch, and `no_sync` keeps `no_shard`/`optim` from reducing the accumulating buffer more than once
    (they warn when auto-sync comes back on: harmless, the loop zeroes the gradient buffers after every step).
    """
    if model.model_auto_sync != sync:
        model.set_model_auto_sync(sync)
    with contextlib.nullcontext() if sync else model.no_sync():
        yield


def build_mfsdp_model(run: Run) -> MegatronFSDP:
    """The model built (on meta where Megatron-FSDP allows), then wrapped; main weights as the config asks."""
    cfg, context, options = run.cfg, run.context, run.cfg.mfsdp
    if context.world_size > 1 and fp8_enabled(cfg):
        logger.warning(
            "Open problem: Megatron-FSDP in FP8 diverged for a time on 2 GPUs; use train_fsdp2.py (see README)."
        )
    # Megatron-FSDP refuses meta-device models with no_shard (nothing to shard); pretrained weights are loaded whole.
    on_meta = cfg.use_meta_device and not cfg.pretrained and options.zero_dp_strategy != "no_shard"
    device = "meta" if on_meta else context.device
    model = build_model(
        cfg, run.model_config, use_te=run.use_te, attn_input_format=run.layout.attn_input_format, device=device
    )
    fp32_main = cfg.use_fp32_master_weights
    return apply_megatron_fsdp(
        model,
        init_device_mesh("cuda", (context.world_size, 1), mesh_dim_names=("dp", "tp")),
        context.device,
        zero_dp_strategy=options.zero_dp_strategy,
        main_params_dtype=torch.float32 if fp32_main else None,
        main_grads_dtype=getattr(torch, options.grad_reduce_dtype) if fp32_main else None,
        overlap_grad_reduce=options.overlap_grad_reduce,
        overlap_param_gather=options.overlap_param_gather,
        on_meta=on_meta,
    )


STRATEGY = Strategy(
    name="mfsdp",
    build_model=build_mfsdp_model,
    state_dict=MegatronFSDPStateDict(),
    prepare_optimizer=shard_optimizer,  # the optimizer steps Megatron-FSDP's (sharded) main weights
    grad_sync=mfsdp_grad_sync,
    needs_cuda=True,
    compiles=False,  # its hooks swap each layer's parameter storage around every call
    inert_keys=("fsdp",),
)


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entrypoint(cfg, STRATEGY)


if __name__ == "__main__":
    main()
