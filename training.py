"""What every entrypoint shares: run set-up, the optimizer, the training loop and validation.

The entrypoints (`train_fsdp2.py`, ...) only wrap the model for their parallelism strategy and pick a checkpoint
flavour; they hand the loop a `grad_sync` function saying how to skip gradient reduction on accumulation
micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torchmetrics.aggregation import SumMetric
from transformers import AutoTokenizer, EsmConfig

from checkpoint import Checkpointer, StateDictFlavour, check_writable
from collator import IGNORE_INDEX
from config_validation import validate_config
from dataset import EpochLoader, build_dataloaders, resolve_path
from distributed import DistributedContext, destroy_distributed, init_distributed
from model import load_model_config, resolve_use_te
from parallel import local_gradients, parameter_memory_gib
from perf_logger import PerfLogger
from precision import check_gpu_supports, fp8_enabled
from scheduler import build_esm2_scheduler

logger = logging.getLogger(__name__)

GradSync = Callable[[nn.Module, bool], AbstractContextManager]
ClipGrads = Callable[[nn.Module, float], torch.Tensor]


class StepHook(Protocol):
    """Called after every optimizer step (checkpointing); returning True ends training early (preemption)."""

    def __call__(self, step: int) -> bool: ...


@dataclass
class TrainResult:
    """Where training ended: the last step, whether it reached `num_train_steps`, and the last logged metrics."""

    step: int
    completed: bool
    metrics: dict[str, float]


@dataclass
class Run:
    """Everything an entrypoint needs before it builds and wraps its model."""

    cfg: DictConfig
    context: DistributedContext
    tokenizer: Any
    model_config: EsmConfig
    use_te: bool
    train_stream: EpochLoader
    validation_loader: Any


def setup_run(cfg: DictConfig) -> Run:
    """Validate the configuration, join the process group, and build tokenizer and data; fails before training."""
    model_config = load_model_config(cfg.model_tag)
    use_te, reason = resolve_use_te(cfg.use_te)
    validate_config(cfg, model_config, use_te)
    if cfg.checkpoint.ckpt_dir:
        check_writable(Path(cfg.checkpoint.ckpt_dir))
    context = init_distributed()
    if fp8_enabled(cfg):
        check_gpu_supports(cfg.fp8_config.recipe, context.device)
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    logger.info("Model: %s, %s.", cfg.model_tag, reason)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.tokenizer))
    train_stream, validation_loader = build_dataloaders(cfg, context, tokenizer)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    return Run(cfg, context, tokenizer, model_config, use_te, train_stream, validation_loader)


def build_optimizer(cfg: DictConfig, model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW as ESM-2 trained it (weight decay on all parameters); the fused CUDA kernel on GPU."""
    opt = cfg.optimizer
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=float(opt.lr),
        betas=tuple(opt.betas),
        eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        fused=device.type == "cuda",
    )


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    sched = cfg.lr_scheduler
    return build_esm2_scheduler(
        optimizer,
        warmup_steps=int(sched.warmup_steps),
        total_steps=int(cfg.num_train_steps),
        decay_fraction=float(sched.decay_fraction),
        min_lr_ratio=float(sched.min_lr_ratio),
    )


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over masked positions, in float32 whatever the logits' precision."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def no_grad_sync_needed(model: nn.Module, sync: bool) -> AbstractContextManager:
    """For a single process, or strategies that reduce gradients only at the optimizer step."""
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global norm with torch: right for replicated (DDP) and evenly sharded (FSDP2) gradients."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


@torch.no_grad()
def gradient_norms(model: nn.Module, device: torch.device) -> dict[str, float]:
    """Every parameter's gradient L2 norm over all ranks (0 where no rank has one), keyed by name without wrappers.

    A debugging aid that compares strategies and GPU counts parameter by parameter: with the same weights and global
    batch, DDP, FSDP2 and Megatron-FSDP on any number of ranks must agree. One collective and one host sync.
    """
    names = [name.removeprefix("module.") for name, _ in model.named_parameters()]  # the same list on every rank
    position = {name: index for index, name in enumerate(names)}
    sharded, replicated = (torch.zeros(len(names), device=device) for _ in range(2))
    for part in local_gradients(model):
        (sharded if part.sharded else replicated)[position[part.name]] = part.tensor.float().square().sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sharded)
    return dict(zip(names, (sharded + replicated).sqrt().tolist(), strict=True))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, max_batches: int) -> dict[str, float]:
    """Masked-token loss and perplexity over (the first `max_batches` batches of) this rank's validation share."""
    model.eval()
    loss_sum = SumMetric(nan_strategy="disable").to(device)
    token_count = SumMetric(nan_strategy="disable").to(device)
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        batch = to_device(batch, device)
        logits = model(**model_inputs(batch)).logits
        loss_sum.update(mlm_loss(logits, batch["labels"], reduction="sum"))
        token_count.update((batch["labels"] != IGNORE_INDEX).sum())
    model.train()
    loss = (loss_sum.compute() / token_count.compute()).item()  # compute() sums over ranks
    return {"val/loss": loss, "val/perplexity": float(torch.tensor(loss).exp())}


def count_tokens(batch: dict[str, Any], pad_token_id: int) -> tuple[int, int]:
    """(real, padded) token counts of a host-side batch: no device sync."""
    input_ids = batch["input_ids"]
    return int((input_ids != pad_token_id).sum()), input_ids.numel()


def train_loop(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    grad_sync: GradSync = no_grad_sync_needed,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    clip_grads: ClipGrads = clip_grad_norm,
    start_step: int = 0,
    after_step: StepHook | None = None,
) -> TrainResult:
    """Train from `start_step` until `num_train_steps`, or until `after_step` asks to stop.

    Per step: `grad_acc_steps` micro-batches forward and backward (gradient reduction only on the last), gradient
    clipping, optimizer and scheduler step. Loss and grad norm stay on the device; the host reads them at log steps.
    """
    cfg, device = run.cfg, run.context.device
    grad_acc = int(cfg.grad_acc_steps)
    max_grad_norm = float(cfg.optimizer.max_grad_norm)
    pad_id = run.tokenizer.pad_token_id
    grad_norms_file = cfg.logger.get("grad_norms_file")
    perf = PerfLogger(cfg, run.context, start_step=start_step)
    batches: Iterator[dict[str, Any]] = iter(run.train_stream)
    model.train()
    step = start_step
    try:
        while step < cfg.num_train_steps:
            host_batches = [next(batches) for _ in range(grad_acc)]
            tokens, padded_tokens = map(sum, zip(*(count_tokens(b, pad_id) for b in host_batches), strict=True))
            micro_batches = [to_device(b, device) for b in host_batches]
            loss_scale = global_loss_scale(micro_batches, run.context.world_size)
            step_loss = torch.zeros((), device=device)
            for micro_step, batch in enumerate(micro_batches):
                with grad_sync(model, micro_step == grad_acc - 1):
                    with forward_context():
                        logits = model(**model_inputs(batch)).logits
                        loss = mlm_loss(logits, batch["labels"], reduction="sum") * loss_scale
                    loss.backward()
                step_loss += loss.detach()
            if grad_norms_file and step == start_step:  # the run's first step, before clipping
                norms = gradient_norms(model, device)
                if run.context.is_main:
                    Path(grad_norms_file).write_text(json.dumps({"step": step + 1, "grad_norms": norms}, indent=1))
            grad_norm = clip_grads(model, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            perf.log_step(step, step_loss, grad_norm, scheduler.get_last_lr()[0], tokens, padded_tokens)
            if _due(step, cfg.validation.every_n_steps, cfg.num_train_steps) and run.validation_loader is not None:
                perf.log_validation(
                    step, evaluate(model, run.validation_loader, device, int(cfg.validation.max_batches))
                )
            if after_step is not None and after_step(step):
                break
    finally:
        perf.close()
    return TrainResult(step=step, completed=step >= cfg.num_train_steps, metrics=perf.last_metrics)


def train(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    checkpoint_flavour: StateDictFlavour,
    *,
    grad_sync: GradSync = no_grad_sync_needed,
    forward_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    clip_grads: ClipGrads = clip_grad_norm,
) -> TrainResult:
    """Everything after wrapping: resume from the newest checkpoint, train, save, export, leave the process group."""
    local_gib, whole_gib = parameter_memory_gib(model)
    logger.info("Parameters stored on this rank: %.4g GiB of the model's %.4g GiB.", local_gib, whole_gib)
    checkpointer = Checkpointer(run.cfg, run, model, optimizer, scheduler, checkpoint_flavour)
    result = train_loop(
        run,
        model,
        optimizer,
        scheduler,
        grad_sync=grad_sync,
        forward_context=forward_context,
        clip_grads=clip_grads,
        start_step=checkpointer.resume(),
        after_step=checkpointer.after_step,
    )
    checkpointer.finish(result.step, completed=result.completed)
    destroy_distributed()
    return result


def global_loss_scale(micro_batches: list[dict[str, Any]], world_size: int) -> torch.Tensor:
    """Factor turning a micro-batch's summed token loss into its share of the step's global mean loss.

    Every masked token of the optimizer step, on every rank and micro-batch, weighs the same: the loss is divided by
    the global count of masked tokens (all-reduced on the device, so the host never waits), and multiplied by the
    world size because data-parallel gradient reduction averages over ranks. A run on N ranks then computes exactly
    the gradients of one rank holding the whole global batch, and gradient accumulation matches a larger batch.
    """
    count = sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches).float()
    if world_size > 1:
        dist.all_reduce(count)
    return world_size / count


def _due(step: int, every: int, last_step: int) -> bool:
    return every > 0 and (step % every == 0 or step == last_step)
