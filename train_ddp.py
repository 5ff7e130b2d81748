"""Pretrain ESM-2 with DistributedDataParallel: a full replica of the model on every rank, gradients all-reduced.

    python train_ddp.py --config-name L0_sanity                        # one process (GPU, or CPU with gloo)
    torchrun --nproc_per_node=8 train_ddp.py --config-name L0_sanity   # one node, eight GPUs
    sbatch slurm.sh train_ddp.py --config-name L0_sanity               # several nodes

Pick DDP when the model, its gradients and its AdamW state fit on one GPU (16 bytes a parameter plus activations:
up to 650M with room to spare, 3B only just on an 80 GB GPU): it is the simplest strategy and, with no parameter
gathering, the fastest one there. Larger models need train_fsdp2.py or train_mfsdp.py, which shard that state.

Every rank holds FP32 weights; on GPU the forward runs under BF16 autocast, on CPU everything stays FP32. Gradients
are averaged over ranks in buckets that overlap the backward pass (one process runs the model unwrapped).
"""

from __future__ import annotations

import cli_help

cli_help.check_command_line(__doc__, __name__)  # --help and unknown keys at once, before torch's seconds
import contextlib
from contextlib import AbstractContextManager

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoint import DistributedStateDict
from model import build_model, capture_cuda_graphs, compile_transformer_layers
from training import Run, Strategy, run_entrypoint


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Replicate `model` (already on `device`) and average its gradients over all ranks (context-parallel ones too).

    Every trainable parameter takes part in the masked-LM loss (model.py freezes the reference model's contact head,
    the one part that does not), so DDP runs without `find_unused_parameters` and its extra graph traversal per step.
    One rank stays unwrapped: DDP would copy every gradient into its buckets (1.8% of an AMPLIFY 350M H100 step).
    """
    if torch.distributed.get_world_size() == 1:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets instead of a second copy
    )


def ddp_grad_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the all-reduce on gradient-accumulation micro-batches; gradients accumulate locally until the last one."""
    if sync or not isinstance(model, DistributedDataParallel):  # one rank: no wrapper, nothing to reduce
        return contextlib.nullcontext()
    return model.no_sync()


def bf16_autocast(device: torch.device) -> AbstractContextManager:
    """BF16 autocast around the forward on GPU (the weights and the optimizer stay in their own dtype); FP32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_replicated_model(run: Run) -> nn.Module:
    """The model built in place on this rank's device, compiled or CUDA-graphed if asked, replicated.

    A full replica lives on every rank anyway, so there is no meta device. Under DDP the plain module stays reachable
    as `.module` (export unwraps it).
    """
    cfg, device = run.cfg, run.context.device
    model = build_model(
        cfg, run.model_config, use_te=run.use_te, attn_input_format=run.layout.attn_input_format, device=device
    )
    if cfg.use_torch_compile:
        compile_transformer_layers(model)
    if cfg.cuda_graphs:
        capture_cuda_graphs(model, run.layout.static, torch.bfloat16)
    return apply_ddp(model, device)


STRATEGY = Strategy(
    name="ddp",
    build_model=build_replicated_model,
    state_dict=DistributedStateDict(),  # replicated state, saved once through DCP: resumes on any number of ranks
    grad_sync=ddp_grad_sync,
    forward_context=bf16_autocast,
    graphs=True,
    context_parallel=True,  # DDP averages over every rank, CP ranks included: gradients of the whole sequences
    optimizer_master_weights=True,  # TE FusedAdam over BF16 or FP8 replicas
    inert_keys=("use_meta_device", "fsdp", "mfsdp"),
)


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_entrypoint(cfg, STRATEGY)


if __name__ == "__main__":
    main()
