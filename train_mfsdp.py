"""Pretrain ESM-2 with Megatron-FSDP: NVIDIA's fully sharded data parallelism, with communication overlapped.

    torchrun --nproc_per_node=8 train_mfsdp.py --config-name L1_650M                    # one node, eight GPUs
    torchrun --nproc_per_node=8 train_mfsdp.py --config-name L1_3B mfsdp.zero_dp_strategy=optim_grads
    sbatch --nodes=4 slurm.sh train_mfsdp.py --config-name L1_15B                        # several nodes

Pick Megatron-FSDP, like FSDP2, for models whose weights, gradients and AdamW state do not fit on one GPU (650M to
15B). It keeps each transformer layer's weights and gradients in flat communication buffers, prefetches the next
layer's all-gather while the current one computes and reduce-scatters gradients during the backward pass; how much
is sharded (ZeRO-1, 2 or 3) is one setting, `mfsdp.zero_dp_strategy`. It needs CUDA GPUs: on CPU use
train_fsdp2.py or train_ddp.py.

Numerics match train_fsdp2.py: BF16 compute weights (all-gathered in BF16), FP32 main weights for the optimizer
(BF16 only with use_fp32_master_weights=false), gradients reduced and accumulated in FP32 (`mfsdp.grad_reduce_dtype`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import hydra
import torch
import torch.distributed as dist
from megatron_fsdp import MegatronFSDP, MixedPrecisionPolicy, fully_shard_model, fully_shard_optimizer
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from checkpoint import MegatronFSDPStateDict
from model import build_model, transformer_layers
from parallel import local_gradients, use_torch_compile
from precision import fp8_enabled
from training import Run, build_optimizer, build_scheduler, setup_run, train

logger = logging.getLogger(__name__)

ZERO_DP_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class MegatronFSDPError(RuntimeError):
    """Megatron-FSDP cannot run this configuration on this machine; the message lists every reason and its fix."""


@dataclass(frozen=True)
class MegatronFSDPOptions:
    """The `mfsdp:` section of the configuration, with its defaults (so a configuration without it runs too)."""

    zero_dp_strategy: str = "optim_grads_params"
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    grad_reduce_dtype: str = "float32"


def check_can_run(cfg: DictConfig) -> MegatronFSDPOptions:
    """The `mfsdp` options, once everything that stops Megatron-FSDP here is ruled out (before any data or model)."""
    problems = []
    if not torch.cuda.is_available():
        problems.append("Megatron-FSDP needs CUDA GPUs; use train_fsdp2.py or train_ddp.py on CPU.")
    if use_torch_compile(cfg):
        problems.append(
            "use_torch_compile=true is not supported with Megatron-FSDP (its hooks swap each layer's parameter storage "
            "around every call); set use_torch_compile=false, or compile with train_fsdp2.py or train_ddp.py."
        )
    section = dict(cfg.get("mfsdp") or {})
    known = [field.name for field in fields(MegatronFSDPOptions)]
    problems += [f"mfsdp.{key}: unknown key (known: {', '.join(known)})." for key in section if key not in known]
    options = MegatronFSDPOptions(**{key: value for key, value in section.items() if key in known})
    if options.zero_dp_strategy not in ZERO_DP_STRATEGIES:
        problems.append(f"mfsdp.zero_dp_strategy={options.zero_dp_strategy!r} must be one of {ZERO_DP_STRATEGIES}.")
    for key in ("overlap_grad_reduce", "overlap_param_gather"):
        if not isinstance(getattr(options, key), bool):
            problems.append(f"mfsdp.{key}={getattr(options, key)!r} must be true or false.")
    if options.grad_reduce_dtype not in REDUCE_DTYPES:
        problems.append(
            f"mfsdp.grad_reduce_dtype={options.grad_reduce_dtype!r} must be one of {sorted(REDUCE_DTYPES)}."
        )
    if problems:
        raise MegatronFSDPError("train_mfsdp.py cannot run here:\n  - " + "\n  - ".join(problems))
    return options


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters only: buffers such as rotary frequencies keep their FP32 precision."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def _reset_to_esm2(
    module: nn.Module,
    originals: dict[str, nn.Parameter],
    holders: dict[int, list[tuple[nn.Module, str]]],
    embedding_pads: dict[int, int | None],
    config: Any,
) -> None:
    """Initialise the parameters `module` owns as ESM-2 does, just after Megatron-FSDP gave them storage.

    Weights ~ N(0, initializer_range), biases 0, LayerNorm weights 1; an embedding table also gets its padding-token
    row and the rows past the real vocabulary zeroed. `to_empty` replaced `module`'s Parameters, so a weight it
    shares with other modules (the LM decoder tied to the word embeddings) is handed to them again.
    """
    std = config.initializer_range
    for name, param in module.named_parameters(recurse=False):
        original = originals[name]
        with torch.no_grad():
            if id(original) in embedding_pads:
                param.normal_(mean=0.0, std=std)
                param[config.vocab_size :] = 0.0
                if embedding_pads[id(original)] is not None:
                    param[embedding_pads[id(original)]] = 0.0
            elif name.endswith("bias"):
                param.zero_()
            elif isinstance(module, nn.LayerNorm):
                param.fill_(1.0)
            else:
                param.normal_(mean=0.0, std=std)
        for holder, attribute in holders[id(original)]:
            if holder is not module:
                setattr(holder, attribute, param)


@contextlib.contextmanager
def esm2_initialisation_on_materialisation(model: nn.Module, device: torch.device) -> Iterator[None]:
    """While wrapping a meta-device model, make Megatron-FSDP's materialisation produce ESM-2's initial weights.

    With `init_model_with_meta_device=True`, Megatron-FSDP allocates the model one module at a time: `to_empty` on a
    module that owns parameters, its `reset_parameters()`, then a copy into this rank's shard of the buffers, so no
    more than one module is ever whole on the GPU. Every rank draws the same numbers (same seed, same order), so the
    shards add up to one model. TransformerEngine modules initialise themselves with the init_method the TE model
    gives them (N(0, initializer_range), zero biases, unit LayerNorm weights); torch's own modules would use torch's
    defaults (Kaiming, N(0, 1) embeddings) and the LM head's bias has no `reset_parameters` at all, so those get
    ESM-2's rule (`_reset_to_esm2`) for the duration of the wrapping. Megatron-FSDP leaves buffers alone, so they
    are allocated and filled here first, by the model's own `init_weights()` (a no-op on the meta parameters).
    """
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.empty_like(buffer, device=device))
    model.init_weights()
    holders: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            holders[id(param)].append((module, name))
    embedding_pads = {id(m.weight): m.padding_idx for m in model.modules() if isinstance(m, nn.Embedding)}
    patched = [
        module
        for module in model.modules()
        if not type(module).__module__.startswith("transformer_engine")
        and next(module.parameters(recurse=False), None) is not None
    ]
    for module in patched:
        originals = dict(module.named_parameters(recurse=False))
        module.reset_parameters = functools.partial(
            _reset_to_esm2, module, originals, holders, embedding_pads, model.config
        )
    try:
        yield
    finally:
        for module in patched:
            del module.reset_parameters


class MaskedLMTuple(NamedTuple):
    """The model's output as a tuple: `.loss` and `.logits` read as before (see `return_tuple_outputs`)."""

    loss: torch.Tensor | None
    logits: torch.Tensor


def return_tuple_outputs(model: nn.Module) -> None:
    """Make `model(...)` return a `MaskedLMTuple` instead of transformers' `MaskedLMOutput` (a dict).

    Megatron-FSDP starts each backward pass with a hook on the gradient of the root module's output, and only finds
    output tensors in a tensor, tuple or list. With a dict output that hook never fires; megatron-fsdp 0.6.1 then
    falls back to a hook on the last submodule it registered (the LM decoder), which fires after the LM-head bias
    already has its gradient. On more than one GPU that (a) zeroed the LM-head bias gradient and (b) reduced the
    gradient bucket of every parameter outside the transformer layers twice, so embeddings, final LayerNorm and LM
    head got the sum over ranks instead of the mean. benchmarks/mfsdp_gradient_check.py shows both, and the fix.
    """
    forward = model.forward

    def forward_returning_tuple(*args: Any, **kwargs: Any) -> MaskedLMTuple:
        output = forward(*args, **kwargs)
        return MaskedLMTuple(output.loss, output.logits)

    model.forward = forward_returning_tuple


def shard_model(model: nn.Module, run: Run, options: MegatronFSDPOptions, on_meta: bool) -> MegatronFSDP:
    """Wrap `model` in Megatron-FSDP: one FSDP unit per transformer layer, embeddings and LM head in the rest."""
    context = run.context
    # A trivial tensor-parallel dimension beside data parallelism: Megatron-FSDP wants one for TE layers (TP=1).
    mesh = init_device_mesh("cuda", (context.world_size, 1), mesh_dim_names=("dp", "tp"))
    fp32_main_weights = bool(run.cfg.get("use_fp32_master_weights", True))
    # The model's weights become the BF16 compute weights, all-gathered and multiplied; Megatron-FSDP copies its FP32
    # main weights from them. So a model built whole in FP32 (pretrained=true, or use_meta_device=false) starts
    # training from BF16-rounded weights, unlike FSDP2, which keeps its FP32 values.
    cast_parameters(model, torch.bfloat16)
    # Without FP32 main weights (use_fp32_master_weights=false) the optimizer steps the BF16 weights themselves, and
    # Megatron-FSDP then keeps their gradients in BF16 too (None: the weights' dtype). Gradients travel in the dtype
    # they are accumulated in: a narrower grad_comm_dtype inflated the gradient norm 3-4x under optim_grads_params
    # with megatron-fsdp 0.6.1, so it is left at its default.
    precision = MixedPrecisionPolicy(
        main_params_dtype=torch.float32 if fp32_main_weights else None,
        main_grads_dtype=REDUCE_DTYPES[options.grad_reduce_dtype] if fp32_main_weights else None,
    )
    return_tuple_outputs(model)
    initialisation = (
        esm2_initialisation_on_materialisation(model, context.device) if on_meta else contextlib.nullcontext()
    )
    with initialisation:
        return fully_shard_model(
            module=model,
            device_mesh=mesh,
            dp_shard_dim="dp",
            tp_dim="tp",
            fsdp_unit_modules=list({type(layer) for layer in transformer_layers(model)}),
            zero_dp_strategy=options.zero_dp_strategy,
            device=context.device,
            init_model_with_meta_device=on_meta,
            mixed_precision_policy=precision,
            overlap_grad_reduce=options.overlap_grad_reduce,
            overlap_param_gather=options.overlap_param_gather,
            # training.global_loss_scale assumes the strategy AVERAGES gradients over ranks, as DDP and FSDP2 do.
            # With calculate_per_token_loss=False Megatron-FSDP averages: it scales gradients by 1/world_size (within
            # NCCL's reduction where it can) and sums them over ranks.
            # calculate_per_token_loss=True would only sum (for losses normalised by the global token count alone)
            # and make every gradient world_size times too large here. average_in_collective=True (an averaging
            # collective instead) fails in megatron-fsdp 0.6.1 without an expert-parallel group, so it stays off.
            calculate_per_token_loss=False,
            average_in_collective=False,
            # Finish gradient reduction at the end of each backward (mfsdp_grad_sync turns this off on accumulation
            # micro-batches), so the loop's gradient clipping sees reduced gradients.
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
    next micro-batch, and `no_sync` keeps `no_shard`/`optim` from reducing the accumulating buffer more than once.
    (Those two strategies log a warning each time auto-sync is switched back on; harmless here, since the loop zeroes
    the gradient buffers after every step.)
    """
    if model.model_auto_sync != sync:
        model.set_model_auto_sync(sync)
    with contextlib.nullcontext() if sync else model.no_sync():
        yield


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([norm.float() for norm in torch._foreach_norm(tensors)]).square().sum()


@torch.no_grad()
def clip_sharded_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm, computed from the (uneven) shards each rank holds.

    Megatron-FSDP's gradients are DTensors whose shards differ in size between ranks, and a rank whose shard of a
    parameter is empty has no gradient for it at all. torch's `clip_grad_norm_` would then run a different number of
    collectives on different ranks and hang (it did, on two H200s). Here each rank adds up the squares of what it
    holds, one all-reduce sums the sharded part over ranks (replicated gradients count once), and every rank scales
    its own shards by the same factor. Returns the global norm, as `clip_grad_norm_` does.
    """
    parts = local_gradients(model)
    sharded = [part.tensor for part in parts if part.sharded]
    replicated = [part.tensor for part in parts if not part.sharded]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    squares = _sum_of_squares(sharded, device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(squares)
    total = (squares + _sum_of_squares(replicated, device)).sqrt()
    grads = [grad for grad in sharded + replicated if grad.numel() > 0]
    if grads:
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    options = check_can_run(cfg)  # fails here on CPU, before any data or model is built
    run = setup_run(cfg)
    if run.context.world_size > 1 and fp8_enabled(cfg):
        logger.warning(
            "Open problem: Megatron-FSDP with FP8 on several GPUs diverged for a while in our 2-GPU test run (the same "
            "run in BF16, and FSDP2 or DDP in FP8, did not); prefer train_fsdp2.py for multi-GPU FP8 (README: "
            "Parallelism)."
        )
    # Megatron-FSDP refuses meta-device models with no_shard (nothing to shard); pretrained weights are loaded whole.
    on_meta = bool(cfg.use_meta_device) and not cfg.pretrained and options.zero_dp_strategy != "no_shard"
    model = build_model(cfg, run.model_config, use_te=run.use_te, device="meta" if on_meta else run.context.device)
    mfsdp_model = shard_model(model, run, options, on_meta)
    # Built after sharding: the optimizer steps Megatron-FSDP's (sharded) main weights, which exist only now.
    optimizer = shard_optimizer(build_optimizer(cfg, mfsdp_model, run.context.device))
    scheduler = build_scheduler(cfg, optimizer)
    train(
        run,
        mfsdp_model,
        optimizer,
        scheduler,
        MegatronFSDPStateDict(),
        grad_sync=mfsdp_grad_sync,
        clip_grads=clip_sharded_grad_norm,
    )


if __name__ == "__main__":
    main()
