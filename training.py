"""What every entrypoint shares: the `Strategy` value, run set-up, the training loop, validation and `run`.

An entrypoint (`train_ddp.py`, `train_fsdp2.py`, `train_mfsdp.py`) defines how its strategy wraps the model, bundles
that with the rest of what differs into one `STRATEGY`, and calls `run(cfg, STRATEGY)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

import quant_stats
from activation_checkpointing import resolve_checkpoint_plan
from checkpoint import (
    Checkpointer,
    CheckpointParts,
    ModelAndOptimizer,
    Preemption,
    StateDictFlavour,
    TEExtraState,
    check_writable,
)
from collator import IGNORE_INDEX, BatchLayout
from config_validation import log_inert_keys, validate_config
from convert import export_final_model
from dataset import resolve_path
from distributed import DistributedContext, all_reduce_sum, destroy_distributed, init_distributed
from errors import refusals_exit_cleanly
from families import max_positions, model_family
from loader import EpochLoader, build_dataloaders, shutdown_workers
from memory_model import estimate_memory
from model import load_model_config, resolve_use_te
from parallel import clip_grad_norm_, gradient_norms, parameter_memory_gib, unwrap
from perf_logger import PerfLogger, configure_process_logs
from precision import check_gpu_supports, fp4_enabled, fp8_enabled, resolve_plan
from run_lock import RunLock
from scheduler import ScheduledLR, build_esm2_scheduler

if TYPE_CHECKING:
    from model import ModelConfig

logger = logging.getLogger(__name__)

GradSync = Callable[[nn.Module, bool], AbstractContextManager]


def no_grad_sync_needed(model: nn.Module, sync: bool) -> AbstractContextManager:
    """For strategies that reduce gradients only when asked (or a single process): nothing to skip."""
    return contextlib.nullcontext()


def no_autocast(device: torch.device) -> AbstractContextManager:
    """For strategies whose mixed-precision policy casts the weights themselves: the forward runs as it is."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Strategy:
    """Everything that differs between parallelism strategies; the loop, data and checkpoints are shared.

    `build_model` builds the model and wraps it (from the `Run`, whose configuration it reads);
    `prepare_optimizer` hooks an optimizer built on the wrapped model's parameters into the strategy;
    `grad_sync(model, sync)` skips gradient reduction on accumulation micro-batches (`sync=False`);
    `forward_context(device)` is the precision context around each forward; `clip_grads(model, max_norm)` clips by
    the global norm and returns it; `state_dict` presents model and optimizer state to DCP and the export.
    `needs_cuda`, `compiles`, `graphs` (can run `cuda_graphs`), `context_parallel` (reduces gradients over every
    rank, so `cp_size` > 1 works) and `optimizer_master_weights` (can keep the FP32 master weights in TE's FusedAdam
    over BF16/FP8 parameters) are checked at start-up; `inert_keys` are
    configuration keys (or sections) this strategy does not read: one changed from its default is named once in
    the log.
    """

    name: str
    build_model: Callable[[Run], nn.Module]
    state_dict: StateDictFlavour
    prepare_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] = lambda optimizer: optimizer
    grad_sync: GradSync = no_grad_sync_needed
    forward_context: Callable[[torch.device], AbstractContextManager] = no_autocast
    clip_grads: Callable[[nn.Module, float], torch.Tensor] = clip_grad_norm_
    needs_cuda: bool = False
    compiles: bool = True
    graphs: bool = False
    context_parallel: bool = False
    optimizer_master_weights: bool = False
    inert_keys: tuple[str, ...] = ()


class StepHook(Protocol):
    """Called after every optimizer step (checkpointing); returning True ends training early (preemption)."""

    def __call__(self, step: int) -> bool: ...


@dataclass
class TrainResult:
    """Where training ended: the last step, whether it reached `num_train_steps`, and the last logged metrics."""

    step: int
    completed: bool
    metrics: dict[str, float]
    tokens: int = 0  # real tokens this rank trained on in this call


@dataclass
class Run:
    """Everything a strategy needs before it builds and wraps its model, and the loop needs besides the model."""

    cfg: DictConfig
    context: DistributedContext
    tokenizer: Any
    model_config: ModelConfig
    use_te: bool
    layout: BatchLayout
    train_stream: EpochLoader
    validation_loader: Any
    lock: RunLock | None = None  # rank 0's hold on checkpoint.ckpt_dir


def take_checkpoint_dir(cfg: DictConfig) -> RunLock | None:
    """Rank 0 makes the checkpoint folder this run's alone (refused while another live run holds it)."""
    if not cfg.checkpoint.ckpt_dir:
        return None
    ckpt_dir = Path(cfg.checkpoint.ckpt_dir)
    check_writable(ckpt_dir)
    is_rank_0 = int(os.environ.get("RANK", 0)) == 0  # before the process group exists
    return RunLock(ckpt_dir).acquire() if is_rank_0 else None


def setup_run(cfg: DictConfig, strategy: Strategy) -> Run:
    """Validate the configuration, take the checkpoint folder, join the process group, build tokenizer and data.

    Everything that can fail before training fails here, in this order, before any model is built.
    """
    configure_process_logs(int(os.environ.get("RANK", 0)))  # before the process group: it logs too
    model_config = load_model_config(cfg.model_tag)
    use_te, reason = resolve_use_te(cfg.use_te, model_family(model_config))
    validate_config(cfg, model_config, use_te, strategy)
    layout = BatchLayout.from_config(cfg)
    lock = take_checkpoint_dir(cfg)
    try:
        context = init_distributed(cp_size=int(cfg.cp_size))
        check_gpu_supports(cfg, context.device)
        logger.info("Model: %s, %s.", cfg.model_tag, reason)
        if use_te:
            plan = resolve_plan(cfg, model_config.num_hidden_layers).describe()
            logger.info("Precision plan: %s; embeddings and LM head: BF16.", plan)
        log_memory_plan(cfg, model_config, use_te, strategy.name, context, layout)
        log_inert_keys(cfg, strategy)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.tokenizer))
        train_stream, validation_loader = build_dataloaders(cfg, layout, context, tokenizer)
    except BaseException:
        shutdown_workers()
        if lock is not None:
            lock.release()
        raise
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    return Run(cfg, context, tokenizer, model_config, use_te, layout, train_stream, validation_loader, lock)


def log_memory_plan(
    cfg: DictConfig, model_config: ModelConfig, use_te: bool, strategy: str, context: DistributedContext, layout: Any
) -> None:
    """Say before the first step what sequences beyond the model's positions mean, and whether the run will fit."""
    length, positions = int(cfg.dataset.max_seq_length), max_positions(model_config)
    if length > positions:  # ESM-2 only: config_validation refuses it for AMPLIFY
        logger.info(
            "dataset.max_seq_length=%d is beyond the %d positions %s was trained with: its rotary positions extend "
            "to any length (quality beyond them comes from this training); the exported config records %d.",
            length,
            positions,
            cfg.model_tag,
            length,
        )
    checkpointing = resolve_checkpoint_plan(cfg.activation_checkpointing, model_config.num_hidden_layers)
    logger.info("%s.", checkpointing.describe(model_config.num_hidden_layers).capitalize())
    tokens = layout.token_budget if layout.packed else int(cfg.dataset.micro_batch_size) * length
    tokens //= context.cp_size  # each GPU of a CP group holds its share of every sequence
    estimate = estimate_memory(
        cfg,
        model_config,
        use_te=use_te,
        strategy=strategy,
        world_size=context.world_size,
        tokens=tokens,
        on_gpu=context.uses_cuda,
    )
    logger.info("%s.", estimate.describe())
    if context.uses_cuda:
        capacity = torch.cuda.get_device_properties(context.device).total_memory
        if estimate.total > 0.95 * capacity:
            logger.warning(
                "The estimate is above this GPU's %.1f GiB: expect an out-of-memory error. Activations grow with "
                "tokens per micro-batch x layers; activation_checkpointing.mode=full keeps only each layer's input.",
                capacity / 2**30,
            )


def build_optimizer(
    optimizer_cfg: Any, model: nn.Module, device: torch.device, master_weights: str = "model"
) -> torch.optim.Optimizer:
    """AdamW as ESM-2 trained it (weight decay on all parameters); the fused CUDA kernel on GPU.

    With `master_weights="optimizer"` it is TE's FusedAdam in AdamW mode holding an FP32 copy of every parameter:
    the model's BF16 (or FP8) parameters are rewritten from those copies after each step, inside the same kernel.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = {
        "lr": float(optimizer_cfg.lr),
        "betas": tuple(optimizer_cfg.betas),
        "eps": float(optimizer_cfg.eps),
        "weight_decay": float(optimizer_cfg.weight_decay),
    }
    if master_weights == "optimizer":
        return master_weights_adam(params, hyper)
    return torch.optim.AdamW(params, **hyper, fused=device.type == "cuda")


def master_weights_adam(params: list[nn.Parameter], hyper: dict[str, Any]) -> torch.optim.Optimizer:
    """TE's FusedAdam (AdamW mode) with FP32 master weights, safe for FP8 primary weights.

    Its FP8 kernel rewrites an FP8 weight's data but not the transposed copy that Hopper's backward GEMMs read, and
    that copy would stay valid for TE; marking it stale after each step makes the next backward rebuild it.
    """
    from transformer_engine.pytorch.optimizers import FusedAdam

    class MasterWeightsAdam(FusedAdam):
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            result = super().step(closure)
            for param in self.quantized_params:
                param._reset_caches()
            return result

    optimizer = MasterWeightsAdam(params, **hyper, adam_w_mode=True, master_weights=True)
    optimizer.quantized_params = [p for p in params if hasattr(p, "_reset_caches")]
    return optimizer


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> ScheduledLR:
    sched = cfg.lr_scheduler
    return build_esm2_scheduler(
        optimizer,
        warmup_steps=int(sched.warmup_steps),
        total_steps=int(cfg.num_train_steps),
        decay_fraction=float(sched.decay_fraction),
        min_lr_ratio=float(sched.min_lr_ratio),
        kind=str(sched.kind),
        on_resume_change=str(sched.on_resume_change),
    )


def build_training(
    run: Run, strategy: Strategy
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The wrapped model, its optimizer (built after wrapping: it steps the strategy's parameters) and schedule."""
    stats = quant_stats.start(run.cfg, run.context, run.model_config.num_hidden_layers)  # before any TE module
    model = strategy.build_model(run)
    if stats is not None:
        quant_stats.name_layers(unwrap(model))  # the names its config selects, before the first forward
    optimizer = build_optimizer(run.cfg.optimizer, model, run.context.device, run.cfg.master_weights)
    optimizer = strategy.prepare_optimizer(optimizer)
    return model, optimizer, build_scheduler(run.cfg, optimizer)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over masked positions, in float32 whatever the logits' precision."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def global_loss_scale(micro_batches: list[dict[str, Any]], world_size: int) -> torch.Tensor:
    """Factor turning a micro-batch's summed token loss into its share of the step's global mean loss.

    Every masked token of the optimizer step, on every rank and micro-batch, weighs the same: the loss is divided by
    the global count of masked tokens (all-reduced on the device, so the host never waits), and multiplied by the
    world size because data-parallel gradient reduction averages over ranks. A run on N ranks then computes exactly
    the gradients of one rank holding the whole global batch, and gradient accumulation matches a larger batch.
    With context parallelism the ranks of a CP group hold disjoint chunks of one batch, so the world sum still
    counts each masked token once, and their gradients (TE's ring attention sends each key's and value's gradient
    back to the rank that holds it) are averaged over all dp x cp ranks too (DDP over the world, FSDP2 on the
    flattened mesh): N-way CP gives the gradients of one GPU holding every sequence whole.
    """
    count = all_reduce_sum(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches).float())
    return world_size / count


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, max_batches: int) -> dict[str, float]:
    """Masked-token loss and perplexity over (the first `max_batches` batches of) every rank's validation share."""
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # summed token loss, masked-token count
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        batch = to_device(batch, device)
        logits = model(**model_inputs(batch)).logits
        sums[0] += mlm_loss(logits, batch["labels"], reduction="sum")
        sums[1] += (batch["labels"] != IGNORE_INDEX).sum()
    model.train()
    loss = (all_reduce_sum(sums)[0] / sums[1]).item()
    return {"val/loss": loss, "val/perplexity": float(torch.tensor(loss).exp())}


def count_tokens(batch: dict[str, Any], pad_token_id: int) -> tuple[int, int]:
    """(real, padded) token counts of a host-side batch: no device sync."""
    input_ids = batch["input_ids"]
    return int((input_ids != pad_token_id).sum()), input_ids.numel()


def forward_backward(
    model: nn.Module, strategy: Strategy, micro_batches: list[dict[str, Any]], world_size: int
) -> torch.Tensor:
    """Forward and backward over one step's micro-batches, reducing gradients on the last; the step's loss."""
    device = micro_batches[0]["input_ids"].device
    loss_scale = global_loss_scale(micro_batches, world_size)
    step_loss = torch.zeros((), device=device)
    for micro_step, batch in enumerate(micro_batches):
        with strategy.grad_sync(model, micro_step == len(micro_batches) - 1):
            with strategy.forward_context(device):
                logits = model(**model_inputs(batch)).logits
                loss = mlm_loss(logits, batch["labels"], reduction="sum") * loss_scale
            loss.backward()
        step_loss += loss.detach()
    return step_loss


def write_gradient_norms(model: nn.Module, path: str, step: int, is_main: bool) -> None:
    norms = gradient_norms(model)  # a collective: every rank takes part
    if is_main:
        Path(path).write_text(json.dumps({"step": step, "grad_norms": norms}, indent=1))


def train_loop(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    strategy: Strategy,
    *,
    start_step: int = 0,
    after_step: StepHook | None = None,
) -> TrainResult:
    """Train from `start_step` until `num_train_steps`, or until `after_step` asks to stop.

    Per step: `grad_acc_steps` micro-batches forward and backward (gradient reduction only on the last), gradient
    clipping, optimizer and scheduler step. Loss and grad norm stay on the device; the host reads them at log steps.
    """
    cfg, context = run.cfg, run.context
    perf = PerfLogger(cfg, context, start_step=start_step)
    batches: Iterator[dict[str, Any]] = iter(run.train_stream)
    model.train()
    step = start_step
    stats = quant_stats.active()  # the nvdlfw-inspect session build_training opened (quant_stats.enabled), or None
    if stats is not None:
        stats.begin(start_step)
    try:
        while step < cfg.num_train_steps:
            host_batches = [next(batches) for _ in range(cfg.grad_acc_steps)]
            counts = [count_tokens(b, run.tokenizer.pad_token_id) for b in host_batches]
            tokens, padded = sum(real for real, _ in counts), sum(total for _, total in counts)
            micro_batches = [to_device(b, context.device) for b in host_batches]
            step_loss = forward_backward(model, strategy, micro_batches, context.world_size)
            if cfg.logger.grad_norms_file and step == start_step:  # the run's first step, before clipping
                write_gradient_norms(model, cfg.logger.grad_norms_file, step + 1, context.is_main)
            grad_norm = strategy.clip_grads(model, float(cfg.optimizer.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if stats is not None:
                stats.after_step(step, perf)  # TE's statistics of this step; to the metrics at log steps
            perf.log_step(step, step_loss, grad_norm, scheduler.get_last_lr()[0], tokens, padded)
            if _due(step, cfg.validation.every_n_steps, cfg.num_train_steps) and run.validation_loader is not None:
                metrics = evaluate(model, run.validation_loader, context.device, int(cfg.validation.max_batches))
                perf.log_validation(step, metrics)
            if after_step is not None and after_step(step):
                break
        if stats is not None:
            stats.flush(perf)  # what an early stop left since the last log step
    finally:
        perf.close()
    return TrainResult(step, step >= cfg.num_train_steps, perf.last_metrics, perf.total_tokens)


def run(cfg: DictConfig, strategy: Strategy, exit_after_teardown_s: float | None = None) -> TrainResult:
    """An entrypoint's whole job: set up, wrap, resume, train, checkpoint, export, leave the process group.

    `exit_after_teardown_s` (entrypoints only, never in-process callers): once everything is written, the process
    ends with status 0 if releasing the run's objects has not finished by then (`TeardownGuard`).
    """
    setup = setup_run(cfg, strategy)
    guard = TeardownGuard(exit_after_teardown_s)
    try:
        return _train(setup, strategy, guard)
    finally:
        shutdown_workers()
        if setup.lock is not None:
            setup.lock.release()
        guard.cancel()  # reached: the teardown did finish


TEARDOWN_LIMIT_S = 30.0  # a finished run's normal teardown takes a second or two


@refusals_exit_cleanly
def run_entrypoint(cfg: DictConfig, strategy: Strategy) -> None:
    """An entrypoint's task: `run`, a refusal ending the process in one message with status 1 (errors.py)."""
    run(cfg, strategy, exit_after_teardown_s=TEARDOWN_LIMIT_S)


class TeardownGuard:
    """Ends the process with status 0 if a finished run's teardown does not end within `seconds`.

    The teardown of finished 2-rank CPU runs blocked for good now and then (1 run in 40 outside CI, more often under
    CI's load): once a futex wait while `_train`'s frame was torn down, its DataLoader worker still waiting for
    indices; once in the closing barrier. Which wait blocks is not known yet. A batch job must not hang past its last
    checkpoint, so a daemon timer, armed once everything is written and cancelled when the teardown is over, ends it.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self.seconds is not None:
            self._timer = threading.Timer(self.seconds, self._leave)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _leave(self) -> None:
        logger.warning("Teardown of the finished run did not end within %g s; exiting (all is saved).", self.seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _train(setup: Run, strategy: Strategy, guard: TeardownGuard) -> TrainResult:
    cfg = setup.cfg
    model, optimizer, scheduler = build_training(setup, strategy)
    local_gib, whole_gib = parameter_memory_gib(model)
    logger.info("Parameters stored on this rank: %.4g GiB of the model's %.4g GiB.", local_gib, whole_gib)
    parts = CheckpointParts(
        model_optim=ModelAndOptimizer(model, optimizer, strategy.state_dict),
        scheduler=scheduler,
        data=setup.train_stream,
        fp8=TEExtraState(model),
        facts={
            "model": cfg.model_tag,
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_workers": cfg.dataset.num_workers,
            "precision_plan": resolve_plan(cfg, setup.model_config.num_hidden_layers).as_dict(),
            "packing": setup.layout.packing_facts(),
        },
    )
    checkpointer = Checkpointer(cfg.checkpoint, setup.context, parts)
    preemption = Preemption().install()
    started = time.perf_counter()
    start_step = checkpointer.resume()
    after_step = lambda step: checkpointer.after_step(step, preemption.any_rank())  # noqa: E731
    result = train_loop(setup, model, optimizer, scheduler, strategy, start_step=start_step, after_step=after_step)
    checkpointer.finish(result.step, completed=result.completed)
    final_model = None
    tokens = int(all_reduce_sum(torch.tensor(float(result.tokens), device=setup.context.device)))
    if result.completed and cfg.checkpoint.ckpt_dir and cfg.checkpoint.save_final_model:
        full_state = strategy.state_dict.full_model_state_dict(model)  # a collective: every rank takes part
        ckpt_dir, tokenizer_dir = Path(cfg.checkpoint.ckpt_dir), resolve_path(cfg.tokenizer)
        card = model_card(cfg, result, start_step, tokens, setup, parts.facts["parameters"])
        final_model = export_final(full_state, unwrap(model).config, ckpt_dir, tokenizer_dir, setup, card)
    logger.info(run_summary(result, start_step, tokens, time.perf_counter() - started, cfg, final_model))
    guard.arm()  # all is written: from here on only the teardown is left
    shutdown_workers()  # here, in a known order, not from destructors while this frame is torn down
    destroy_distributed()
    return result


def export_final(
    state: dict[str, Any], config: Any, ckpt_dir: Path, tokenizer_dir: Path, setup: Run, card: str
) -> Path:
    """`<ckpt_dir>/final_model` in its family's format: transformers ESM-2, or self-contained AMPLIFY (remote code).

    AMPLIFY's max_length stays the model's: training sequences beyond it are refused at start-up.
    """
    if model_family(config) == "amplify":
        from convert_amplify import export_final_amplify_model  # imports transformers: only for AMPLIFY runs

        return export_final_amplify_model(state, config, ckpt_dir, tokenizer_dir, setup.context, model_card=card)
    return export_final_model(
        state,
        config,
        ckpt_dir,
        tokenizer_dir,
        setup.context,
        model_card=card,
        trained_length=int(setup.cfg.dataset.max_seq_length),
    )


CARD_FAMILY = {  # family -> (title, what the folder is, from_pretrained options)
    "esm2": ("ESM-2 masked language model", "a standard transformers ESM-2 checkpoint", ""),
    "amplify": (
        "AMPLIFY masked language model",
        "an AMPLIFY checkpoint in the public chandar-lab layout, with its modeling code (modeling_amplify.py)",
        ", trust_remote_code=True",
    ),
}


def _ffn_width(config: Any) -> str:
    if model_family(config) == "amplify":  # the config's intermediate_size is not the SwiGLU matrices' width
        from modeling_amplify import swiglu_hidden_size

        return f"SwiGLU {swiglu_hidden_size(config.intermediate_size)} (intermediate_size {config.intermediate_size})"
    return str(config.intermediate_size)


def model_card(cfg: DictConfig, result: TrainResult, start_step: int, tokens: int, setup: Run, parameters: int) -> str:
    """The final model's README.md: what it is, what it was trained on and how far, and how to load it."""
    config, metrics, sequences = setup.model_config, result.metrics, setup.train_stream.num_sequences
    if not setup.context.uses_cuda:
        precision = "FP32 (CPU)"
    elif fp8_enabled(cfg) or fp4_enabled(cfg):
        plan = resolve_plan(cfg, config.num_hidden_layers).describe()
        precision = f"transformer {plan}; embeddings and LM head BF16"
    else:
        precision = "BF16"
    weights = "FP32 master weights" if cfg.use_fp32_master_weights else "BF16 weights"
    val = f"{metrics['val/loss']:.4g} (perplexity {metrics['val/perplexity']:.4g})" if "val/loss" in metrics else "–"
    title, what, load_options = CARD_FAMILY[model_family(config)]
    lines = [
        f"# {title} ({cfg.model_tag}, {parameters:,} parameters)",
        "",
        f"Pretrained with the ESM-2 TransformerEngine recipe; {what}.",
        "",
        f"- Architecture: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{config.num_attention_heads} attention heads, FFN {_ffn_width(config)}, "
        f"vocabulary {config.vocab_size}.",
        f"- Training data: `{cfg.dataset.path}`"
        + (f", {sequences:,} training sequences" if sequences is not None else " (streamed)")
        + f", cropped to {cfg.dataset.max_seq_length} tokens ({cfg.dataset.crop} windows), "
        f"{cfg.dataset.mlm_probability:.0%} of residues masked.",
        f"- Training: {result.step:,} optimizer steps (peak LR {cfg.optimizer.lr:g}); {tokens:,} tokens in steps "
        f"{start_step + 1}–{result.step} (the last job), on {setup.context.world_size} rank(s); seed {cfg.seed}.",
        f"- Precision: {precision}; {weights}.",
        f"- Final train loss {metrics.get('train/loss', float('nan')):.4g} (last log window); validation loss {val}.",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        "",
        f'model = AutoModelForMaskedLM.from_pretrained("path/to/this/folder"{load_options})',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def run_summary(
    result: TrainResult, start_step: int, tokens: int, seconds: float, cfg: DictConfig, final_model: Path | None
) -> str:
    """The one line a batch log ends with: how far the job got, on what, how fast, and where its results are."""
    metrics = result.metrics
    losses = ", ".join(
        f"{name} {metrics[key]:.4g}" for key, name in (("train/loss", "train loss"), ("val/loss", "val loss"))
        if key in metrics
    )  # fmt: skip
    state = "finished" if result.completed else "stopped early"
    where = f"checkpoints in {cfg.checkpoint.ckpt_dir}" if cfg.checkpoint.ckpt_dir else "no checkpoints"
    return (
        f"Run {state} at step {result.step} of {cfg.num_train_steps} ({result.step - start_step} steps in this job): "
        f"{tokens:,} tokens in {seconds:.0f} s; {losses or 'no loss logged'}; {where}"
        + (f"; final model in {final_model}." if final_model else ".")
    )


def _due(step: int, every: int, last_step: int) -> bool:
    return every > 0 and (step % every == 0 or step == last_step)
