"""Training-throughput benchmark: the reference transformers ESM-2 against the TransformerEngine layouts and FP8.

    python benchmark.py --config-name benchmark
    python benchmark.py --config-name benchmark benchmark.models=[esm2_t33_650M_UR50D] \
        benchmark.token_budgets=[8192,16384,32768,65536]
    python benchmark.py --config-name benchmark benchmark.models=[esm2_t36_3B_UR50D] benchmark.variants=[te_thd]

Each (model, variant) pair runs the real recipe, as users run it: the Hydra config with the variant's overrides,
`setup_run`, the model built and wrapped by the chosen entrypoint's own `STRATEGY` (`benchmark.strategy`: ddp, the
default, fsdp2 or mfsdp), fused AdamW and `train_loop` (forward, backward, clipping, optimizer step), on the shipped
proteome's real length distribution and the same capacity of tokens per step (each of `token_budgets`). It reports
unpadded tokens/s per GPU, model TFLOP/s, MFU, step time, GPU busy fraction, peak memory and the padding fraction as
a markdown table, JSON and a bar chart; the GPU's dense BF16 and FP8 matmul ceilings are measured in the same run.

Repeats, interleaved: per (model, token budget) every variant is built once, as a session that stays alive (model,
optimizer, and its data stream, which continues where it stopped instead of restarting the epoch), and warmed up.
Then `repeats` rounds each run one timed window of `timed_steps` steps of every variant in turn (A B C A B C ...),
so drift of clocks, temperature or the host hits all variants alike. Rows give the median over the windows with
min and max, and every window is in the JSON, in the order the windows ran.

Timing window: `train_loop` syncs host and device only at log steps. Sessions step with `log_every_n_steps =
timed_steps` from a warm-up rounded up to a multiple of it, so each window's one log sync is at its end. The
benchmark times each window itself between two `torch.cuda.synchronize()` calls, so all of the window's GPU work is
inside it, and records the real sequence lengths of each batch as the loop draws it: the window's FLOPs and tokens
are those of exactly its batches. The GPU busy fraction is the union of the kernel and copy intervals that
torch.profiler (CUDA activity only, no CPU op recording) records in the window, over the window's wall time.

Model FLOPs count useful work only (no padding, no activation recomputation). Per optimizer step, summed over the
real sequences of the step (s = real tokens of a sequence; L layers, hidden size H, FFN size I, real vocabulary V):

    FLOPs = Σ_seq [ 6 · P_matmul · s + 12 · L · H · s² ]
    P_matmul = L · (4H² + 2HI) + H² + H · V      (per layer QKV + output projection + FFN; LM-head dense + decoder)
    AMPLIFY:   L · (4H² + 3HF) + H · V           (SwiGLU: 3 matrices of width F = swiglu_hidden_size(I); no LM-head
                                                 dense, the decoder maps straight to the vocabulary)

6·P_matmul·s is 2 forward + 4 backward FLOPs per matmul weight per token; 12·L·H·s² is attention (QKᵀ and AV,
2·s²·H FLOPs each per layer forward, times 3 for forward + backward). Embedding lookups, biases, norms, softmax and
GELU are not counted. TFLOP/s = FLOPs of the timed window / its duration; MFU = TFLOP/s / measured BF16 ceiling
(FP8 variants also against the FP8 ceiling).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.profiler import ProfilerActivity

import train_ddp
import train_fsdp2
import train_mfsdp
from dataset import list_data_files
from distributed import destroy_distributed
from families import model_family
from loader import shutdown_workers
from memory_model import estimate_memory
from model import count_parameters, load_model_config, te_unavailable_reason
from modeling_amplify import swiglu_hidden_size
from parallel import unwrap
from perf_logger import peak_memory_gib
from precision import fp4_enabled, fp8_enabled, unsupported_reason
from training import Run, Strategy, TrainResult, build_training, setup_run, train_loop

logger = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parent
BASELINE = "hf_pad1024"
README_START, README_END = "<!-- benchmark-results:start -->", "<!-- benchmark-results:end -->"
FLOP_FORMULA = "FLOPs/step = Σ_seq [6·P_matmul·s + 12·L·H·s²], P_matmul = L·(4H² + 2HI) + H² + H·V, s = real tokens"
REPEATED = ("tokens_per_s", "padded_tokens_per_s", "tflops", "step_time_s")  # median, min, max over the repeats
NOT_AVAILABLE = "not available"


STRATEGIES: dict[str, Strategy] = {
    "ddp": train_ddp.STRATEGY,
    "fsdp2": train_fsdp2.STRATEGY,
    "mfsdp": train_mfsdp.STRATEGY,
}


@dataclass(frozen=True)
class Variant:
    """One way to train the same model: implementation, precision (hydra_config/precision/), packing and padding.

    `overrides` (dotted config keys → values) are applied after the precision preset, for variants that differ in
    any other key; the benchmark's own keys (model, layout, budget, steps, logging) still win over them.
    """

    label: str
    use_te: bool
    precision: str
    packed: bool = False
    pad_to_max_length: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)


def graphed(label: str, precision: str = "bf16", **overrides: Any) -> Variant:
    """A TE THD variant with CUDA graphs (static shapes), plus `overrides` of top-level config keys."""
    return Variant(label, True, precision, packed=True, overrides={"cuda_graphs": True, **overrides})


VARIANTS: dict[str, Variant] = {
    "hf_pad1024": Variant("transformers (SDPA), padded to max_seq_length", False, "bf16", pad_to_max_length=True),
    "hf_padlongest": Variant("transformers (SDPA), padded to the longest", False, "bf16"),
    "te_bshd": Variant("TE, padded to the longest (BSHD)", True, "bf16"),
    "te_thd": Variant("TE, packed (THD)", True, "bf16", packed=True),
    "te_thd_bf16_weights": Variant(
        "TE THD, BF16 weights and optimizer state",
        True,
        "bf16",
        packed=True,
        overrides={"use_fp32_master_weights": False},
    ),
    "te_thd_static": Variant("TE THD, static shapes", True, "bf16", packed=True, overrides={"static_shapes": True}),
    "te_thd_graphs": graphed("TE THD, static shapes + CUDA graphs"),
    "te_thd_graphs_te_rope": graphed(
        "TE THD + CUDA graphs, TE's fused THD RoPE kernel instead of the recipe's", rope_kernel="te"
    ),
    "te_thd_graphs_bias_gelu": graphed(
        "TE THD + CUDA graphs, TE's separate bias-GELU kernels instead of the GEMM epilogue", gelu_in_gemm=False
    ),
    "te_thd_graphs_te_kernels": graphed(
        "TE THD + CUDA graphs, TE's RoPE and bias-GELU kernels (the recipe before rope_kernel and gelu_in_gemm)",
        rope_kernel="te",
        gelu_in_gemm=False,
    ),
    "te_thd_graphs_fp8_delayed_te_rope": graphed(
        "TE THD + CUDA graphs + FP8 delayed scaling, TE's fused THD RoPE kernel", "fp8_delayed", rope_kernel="te"
    ),
    "te_thd_graphs_cudnn_norm": graphed("TE THD + CUDA graphs, cuDNN's LayerNorm kernels", norm_kernel="cudnn"),
    "te_thd_graphs_fp8_delayed_cudnn_norm": graphed(
        "TE THD + CUDA graphs + FP8 delayed scaling, cuDNN's LayerNorm kernels", "fp8_delayed", norm_kernel="cudnn"
    ),
    "te_thd_graphs_bf16_weights": graphed(
        "TE THD + CUDA graphs, BF16 weights and optimizer state", use_fp32_master_weights=False
    ),
    "te_thd_graphs_fp8_delayed": graphed("TE THD + CUDA graphs + FP8 delayed scaling", "fp8_delayed"),
    "te_thd_graphs_fp8_current": graphed("TE THD + CUDA graphs + FP8 current scaling", "fp8_current"),
    "te_thd_graphs_fp8_delayed_bf16_weights": graphed(
        "TE THD + CUDA graphs + FP8 delayed scaling, BF16 weights and optimizer state",
        "fp8_delayed",
        use_fp32_master_weights=False,
    ),
    "te_thd_graphs_optimizer_masters": graphed(
        "TE THD + CUDA graphs, BF16 weights, FP32 master weights in TE FusedAdam", master_weights="optimizer"
    ),
    "te_thd_graphs_fp8_delayed_optimizer_masters": graphed(
        "TE THD + CUDA graphs + FP8 delayed scaling, FP32 master weights in TE FusedAdam",
        "fp8_delayed",
        master_weights="optimizer",
    ),
    "te_thd_fp8_delayed_fp8_weights": Variant(
        "TE THD + FP8 delayed scaling, FP8 primary weights (FP32 master in TE FusedAdam)",
        True,
        "fp8_delayed",
        packed=True,
        overrides={"master_weights": "optimizer", "fp8_config.quantized_model_init": True},
    ),
    "te_thd_ckpt_full": Variant(
        "TE THD, full activation checkpointing",
        True,
        "bf16",
        packed=True,
        overrides={"activation_checkpointing.mode": "full"},
    ),
    "te_thd_ckpt_mlp": Variant(
        "TE THD, selective activation checkpointing (MLP)",
        True,
        "bf16",
        packed=True,
        overrides={"activation_checkpointing.mode": "selective", "activation_checkpointing.selective_part": "mlp"},
    ),
    "te_thd_fp8_delayed": Variant("TE THD + FP8 delayed scaling", True, "fp8_delayed", packed=True),
    "te_thd_fp8_current": Variant("TE THD + FP8 current scaling", True, "fp8_current", packed=True),
    "te_thd_fp8_block": Variant("TE THD + FP8 block scaling", True, "fp8_block", packed=True),
    "te_thd_mxfp8": Variant("TE THD + MXFP8 (Blackwell)", True, "mxfp8", packed=True),
    "te_thd_nvfp4": Variant("TE THD + NVFP4 (Blackwell)", True, "nvfp4", packed=True),
}


@dataclass(frozen=True)
class Plan:
    """How every variant is measured: `warmup` untimed steps, then `repeats` interleaved windows of `timed` steps."""

    warmup: int
    timed: int
    repeats: int
    token_budgets: tuple[int, ...]
    busy_fraction: bool

    @property
    def session_steps(self) -> int:
        """All steps of one session: the LR schedule is built for them (it does not change the throughput)."""
        return self.warmup + (self.repeats + self.busy_fraction) * self.timed


@dataclass(frozen=True)
class Group:
    """Variants measured together, interleaved: all alive in GPU memory at once, on one model and token budget."""

    model_tag: str
    token_budget: int
    variants: tuple[str, ...]
    profile: bool = False  # kernel profile of every variant after the timed windows (benchmark.profile)


GROUP_KEYS = ("model", "variants", "token_budgets", "profile")


def short_budgets(bench: DictConfig, budgets: list, seq: int, key: str) -> list[str]:
    """Budgets below `seq`, as a problem: a padded step holds at least one sequence (unless one_sequence_per_step)."""
    if not bench.one_sequence_per_step and (small := [b for b in budgets if int(b) < seq]):
        return [f"{key} {small} must each be >= dataset.max_seq_length ({seq})"]
    return []


def group_problems(bench: DictConfig, seq: int) -> list[str]:
    """What is wrong with `benchmark.groups` (a list of {model, variants, token_budgets?}), in words to act on."""
    if bench.get("groups") is None:
        return []
    problems = []
    for index, entry in enumerate(bench.groups):
        where = f"benchmark.groups[{index}]"
        if not isinstance(entry, Mapping) or not entry.get("model") or not entry.get("variants"):
            problems.append(f"{where} must give a model and its variants, e.g. {{model: esm2_t33_650M_UR50D, "
                            "variants: [te_thd_graphs], token_budgets: [16384]}}")  # fmt: skip
            continue
        if unknown := sorted(set(entry) - set(GROUP_KEYS)):
            problems.append(f"{where}: unknown keys {unknown} (known: {', '.join(GROUP_KEYS)})")
        budgets = list(entry.get("token_budgets") or bench.token_budgets or [])
        problems += short_budgets(bench, budgets, seq, f"{where}.token_budgets")
        if len(set(entry.variants)) < len(entry.variants):
            problems.append(f"{where}.variants must not list an entry twice")
    return problems


def benchmark_groups(cfg: DictConfig, plan: Plan) -> tuple[Group, ...]:
    """What runs, in order: `benchmark.groups` as given, else every model at every budget with all the variants."""
    bench = cfg.benchmark
    profile = bool(bench.profile)
    if bench.get("groups") is None:
        variants = tuple(bench.variants)
        return tuple(Group(model, budget, variants, profile) for model in bench.models for budget in plan.token_budgets)
    return tuple(
        Group(str(entry.model), int(budget), tuple(entry.variants), bool(entry.get("profile", profile)))
        for entry in bench.groups
        for budget in (entry.get("token_budgets") or plan.token_budgets)
    )


def benchmark_plan(cfg: DictConfig) -> Plan:
    """The checked benchmark settings; every problem in one ValueError, before any data is read or model built."""
    bench, seq = cfg.benchmark, int(cfg.dataset.max_seq_length)
    timed, repeats, warmup = int(bench.timed_steps), int(bench.repeats), int(bench.warmup_steps)
    budgets = bench.token_budgets if bench.token_budgets is not None else []
    budgets = [budgets] if isinstance(budgets, int) else list(budgets)  # one budget may be given as a number
    problems = []
    if timed < 1:
        problems.append(f"benchmark.timed_steps={timed} must be at least 1")
    if repeats < 1:
        problems.append(f"benchmark.repeats={repeats} must be at least 1")
    if warmup < 0:
        problems.append(f"benchmark.warmup_steps={warmup} must be 0 or more")
    if not budgets:
        problems.append("benchmark.token_budgets must list at least one token budget per step, e.g. [16384]")
    problems += short_budgets(bench, budgets, seq, "benchmark.token_budgets")
    if len(set(budgets)) < len(budgets) or len(set(bench.variants)) < len(bench.variants):
        problems.append("benchmark.token_budgets and benchmark.variants must not list an entry twice")
    copies = bench.get("epoch_copies")
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        problems.append(f"benchmark.epoch_copies={copies!r} must be a positive integer (1: the data files once)")
    if bench.strategy not in STRATEGIES:
        problems.append(f"benchmark.strategy={bench.strategy!r} must be one of {tuple(STRATEGIES)}")
    problems += group_problems(bench, seq)
    if problems:
        raise ValueError("Invalid benchmark settings:\n  " + "\n  ".join(problems))
    rounded = max(1, math.ceil(warmup / timed)) * timed  # the window's only log sync is then its last step
    return Plan(rounded, timed, repeats, tuple(int(b) for b in budgets), bool(bench.busy_fraction))


def matmul_parameters(config: Any) -> int:
    """Weights that take part in a matmul per token (the real vocabulary, not TE's padded decoder rows).

    ESM-2: a 4H GELU MLP (2 matrices) and a dense layer in the LM head; AMPLIFY: a SwiGLU MLP (3 matrices of its
    SwiGLU width) and a decoder straight from the final norm to the vocabulary.
    """
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if model_family(config) == "amplify":
        ffn = swiglu_hidden_size(config.intermediate_size)
        return layers * (4 * hidden * hidden + 3 * hidden * ffn) + hidden * vocab
    ffn = config.intermediate_size
    return layers * (4 * hidden * hidden + 2 * hidden * ffn) + hidden * hidden + hidden * vocab


def model_flops(lengths: np.ndarray, config: Any) -> int:
    """Forward + backward model FLOPs of one batch of real sequences with these lengths (module docstring)."""
    s = np.asarray(lengths, dtype=np.int64)
    attention = 12 * config.num_hidden_layers * config.hidden_size * int((s * s).sum())
    return 6 * matmul_parameters(config) * int(s.sum()) + attention


def real_lengths(batch: dict[str, Any], pad_token_id: int) -> np.ndarray:
    """Non-padding tokens of each real sequence of a host-side batch: BSHD rows or THD `cu_seqlens` segments."""
    real = (batch["input_ids"] != pad_token_id).numpy()
    if "cu_seqlens" in batch:
        cumulative = np.concatenate([[0], np.cumsum(real.reshape(-1))])
        bounds = batch["cu_seqlens"].numpy()
        lengths = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
    else:
        lengths = real.sum(axis=1)
    return lengths[lengths > 0]  # drops THD's trailing padding segment and empty filler batches


class LengthRecorder:
    """The training stream, noting each batch's real sequence lengths, padded size and epoch as `train_loop` draws it.

    That gives the FLOPs of exactly the batches of a timed window, and tells whether an epoch boundary (a data-loader
    restart, which re-forks the workers) fell inside it. Host-side numpy only: no device sync.
    """

    def __init__(self, stream: Any, pad_token_id: int) -> None:
        self.stream, self.pad_token_id = stream, pad_token_id
        self.lengths: list[np.ndarray] = []
        self.padded: list[int] = []
        self.epochs: list[int] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.stream:
            self.lengths.append(real_lengths(batch, self.pad_token_id))
            self.padded.append(batch["input_ids"].numel())
            self.epochs.append(int(getattr(self.stream, "epoch", 0)))
            yield batch


def variant_config(base: DictConfig, model_tag: str, variant: Variant, token_budget: int, plan: Plan) -> DictConfig:
    """The benchmark config with the variant's precision preset and overrides, as `--config-name` + overrides would.

    With `benchmark.one_sequence_per_step` the budget is also the sequence length: each step is one long protein.
    """
    seq = token_budget if base.benchmark.one_sequence_per_step else int(base.dataset.max_seq_length)
    preset = OmegaConf.load(RECIPE_DIR / "hydra_config" / "precision" / f"{variant.precision}.yaml")
    cfg = OmegaConf.merge(base, preset)
    for key, value in variant.overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    fixed = {
        "model_tag": model_tag,
        "use_te": str(variant.use_te).lower(),
        "num_train_steps": plan.session_steps,
        "grad_acc_steps": 1,
        "use_sequence_packing": variant.packed,
        "token_micro_batch_size": token_budget,
        "dataset": {
            "max_seq_length": seq,
            "micro_batch_size": token_budget // seq,
            "pad_to_max_length": variant.pad_to_max_length,
        },
        "validation": {"every_n_steps": 0},
        "checkpoint": {"ckpt_dir": None},
        "logger": {"log_every_n_steps": plan.timed, "progress_bar": False, "grad_norms_file": None},
        "wandb": {"enabled": False},  # train_loop's logger starts inside the timed window: no run to open there
    }
    return OmegaConf.merge(cfg, fixed)


def weights_mode(cfg: DictConfig) -> str:
    if not cfg.use_fp32_master_weights:
        return "BF16"
    if cfg.master_weights == "model":
        return "FP32 master"
    return "FP8 + FP32 master in optimizer" if cfg.fp8_config.quantized_model_init else "FP32 master in optimizer"


def skip_reason(cfg: DictConfig, variant: Variant, strategy: Strategy) -> str | None:
    """Why this variant cannot run on this machine (no GPU or TE, or a recipe this GPU lacks), or None."""
    if strategy.needs_cuda and not torch.cuda.is_available():
        return f"{strategy.name} needs CUDA GPUs"
    if variant.use_te and (reason := te_unavailable_reason()):
        return f"TE model: {reason}"
    device = torch.device("cuda", torch.cuda.current_device()) if fp8_enabled(cfg) or fp4_enabled(cfg) else None
    recipes = [cfg.fp8_config.recipe] * fp8_enabled(cfg) + [cfg.fp4_config.recipe] * fp4_enabled(cfg)
    return next((reason for name in recipes if (reason := unsupported_reason(name, device))), None)


@dataclass
class Session:
    """One variant's live training state, kept across its interleaved timed windows.

    `run.train_stream` is the recorder's generator: every `train_loop` call continues it where the previous call
    stopped (re-entering the `EpochLoader` would restart the epoch and its workers). `resident_bytes` is what the
    session keeps allocated between windows (weights, optimizer state), so that its peak can be told apart from the
    other sessions alive in the same process. `graph_pool_bytes` is the memory its CUDA graphs hold in their private
    pools beyond that: a replay works in it without the allocator handing anything out, so the allocator's peak
    misses it (a graphed 3B session read 33 GiB by that peak; the pools of another held 35 GiB when it ran out).
    """

    run: Run
    strategy: Strategy
    model: Any
    optimizer: Any
    scheduler: Any
    recorder: LengthRecorder
    step: int = 0
    resident_bytes: int = 0
    graph_pool_bytes: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)

    def close(self) -> None:
        """End the data stream (its loader iterator, and so its worker processes, go with it)."""
        self.run.train_stream.close()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_bytes(device: torch.device) -> int:
    """Bytes the CUDA caching allocator hands out now (0 on CPU, whose peak is the process's resident set)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def reserved_bytes(device: torch.device) -> int:
    """Bytes the CUDA caching allocator holds from the device, handed out or cached (CUDA-graph pools included)."""
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def advance(session: Session, steps: int) -> TrainResult:
    """Train `steps` more optimizer steps of the session, continuing its step count, schedule and data stream."""
    session.run.cfg.num_train_steps = session.step + steps
    result = train_loop(
        session.run, session.model, session.optimizer, session.scheduler, session.strategy, start_step=session.step
    )
    session.step = result.step
    return result


def open_session(cfg: DictConfig, plan: Plan) -> Session:
    """Set up, build and wrap the variant as the strategy's entrypoint does (no checkpoints), then warm it up."""
    strategy = STRATEGIES[cfg.benchmark.strategy]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    free_cached_memory()
    before, reserved_before = allocated_bytes(device), reserved_bytes(device)
    run = setup_run(cfg, strategy)
    recorder = LengthRecorder(run.train_stream, run.tokenizer.pad_token_id)
    run.train_stream = iter(recorder)  # one generator for the session's life: train_loop's iter() returns it as is
    try:
        model, optimizer, scheduler = build_training(run, strategy)
        session = Session(run, strategy, model, optimizer, scheduler, recorder)
        advance(session, plan.warmup)
    except BaseException:
        run.train_stream.close()
        raise
    free_cached_memory()  # returns the warm-up's cached blocks; live graphs keep their pools
    session.resident_bytes = allocated_bytes(device) - before
    if cfg.get("cuda_graphs"):
        session.graph_pool_bytes = max(0, reserved_bytes(device) - reserved_before - session.resident_bytes)
    return session


def timed_window(session: Session, plan: Plan, traced: bool = False) -> dict[str, Any]:
    """One window of `plan.timed` steps: wall time between two device syncs, peak memory, busy time if `traced`.

    `traced` (GPU) takes the busy time from a CUDA-activity trace of the window. Tracing costs host time per kernel
    launch, so it slows a host-bound step (on the 650M eager rows of 2026-12-02, traced windows ran at 53k tokens/s
    against 60k-76k in untraced runs of the same model); the timed windows are therefore never traced, and the busy
    fraction comes from one more window.
    """
    device = session.run.context.device
    start, at_start = session.step, allocated_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measure_busy = traced and device.type == "cuda"
    profiler = torch.profiler.profile(activities=[ProfilerActivity.CUDA]) if measure_busy else None
    with profiler if profiler is not None else contextlib.nullcontext():
        synchronize(device)
        begin = time.perf_counter()
        result = advance(session, plan.timed)
        synchronize(device)
        seconds = time.perf_counter() - begin
    busy = device_busy(profiler) if profiler is not None else None
    if device.type == "cuda":  # this session's share: the peak less what the other live sessions hold
        own = torch.cuda.max_memory_allocated(device) - (at_start - session.resident_bytes)
        peak = (own + session.graph_pool_bytes) / 2**30
    else:
        peak = peak_memory_gib(device)
    window = window_measures(session, start, seconds, result.metrics.get("train/loss", math.nan))
    window["busy_fraction"] = None if busy is None else busy[0] / (seconds * 1e9)
    window["peak_memory_gib"] = peak
    return window


def window_measures(session: Session, start: int, seconds: float, loss: float) -> dict[str, Any]:
    """Tokens, FLOPs and rates of the window's batches, as the recorder saw them drawn."""
    end, recorder = session.step, session.recorder
    lengths = np.concatenate(recorder.lengths[start:end])
    tokens, padded = int(lengths.sum()), sum(recorder.padded[start:end])
    flops = model_flops(lengths, session.run.model_config)  # a sum over sequences: the sum of the steps' FLOPs
    return {
        "start_step": start,
        "steps": end - start,
        "seconds": seconds,
        "sequences": len(lengths),
        "tokens": tokens,
        "padded_tokens": padded,
        "flops": flops,
        "tokens_per_s": tokens / seconds,
        "padded_tokens_per_s": padded / seconds,
        "tflops": flops / seconds / 1e12,
        "step_time_s": seconds / (end - start),
        "epoch_boundary": recorder.epochs[start - 1] != recorder.epochs[end - 1],
        "loss": loss,
        "lengths": lengths.tolist(),
    }


def merged_length(intervals: Iterable[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals: kernels on concurrent streams count once."""
    total, covered_to = 0, None
    for start, end in sorted(intervals):
        if covered_to is None or start >= covered_to:
            total, covered_to = total + end - start, end
        elif end > covered_to:
            total, covered_to = total + end - covered_to, end
    return total


def device_busy(prof: torch.profiler.profile) -> tuple[int, int] | None:
    """(busy_ns, wall_ns) of a profile: the union of its GPU kernel and copy intervals, and the span of all events.

    A GPU busy far less than the wall time means the step is host-bound: the GPU waits for Python, hooks or kernel
    launches, and faster kernels would not help. None when this torch release's profiler internals differ.
    """
    try:
        records = prof.profiler.kineto_results.events()
        spans = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in records]
        device = [span for span, e in zip(spans, records, strict=True) if e.device_type().name == "CUDA"]
    except (AttributeError, RuntimeError) as exc:
        logger.warning("GPU busy time not available: %s", exc)
        return None
    if not spans:
        return 0, 0
    return merged_length(device), max(end for _, end in spans) - min(start for start, _ in spans)


def profile_steps(
    run: Run, model: Any, optimizer: Any, scheduler: Any, strategy: Strategy, prefix: Path, steps: int
) -> None:
    """Profile a few more steps with torch.profiler, after the timed windows so the profiler cannot perturb them."""
    cuda = run.context.uses_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_keys = ["self_device_time_total" if cuda else "self_cpu_time_total", "self_cpu_time_total"]  # GPU, host

    def write(prof: torch.profiler.profile) -> None:
        events = prof.key_averages()
        tables = [f"Top 60 by {key}:\n{events.table(sort_by=key, row_limit=60)}" for key in dict.fromkeys(sort_keys)]
        # The same ops told apart by their input shapes (a hidden-size copy from a parameter-size one); which code
        # called them: benchmarks/kernel_sources.py on the trace, whose Python frames with_stack records.
        by_shape = prof.key_averages(group_by_input_shape=True)
        tables.append(
            f"Top 40 ops by {sort_keys[0]}, by input shapes:\n"
            + by_shape.table(sort_by=sort_keys[0], row_limit=40, max_name_column_width=60, max_shapes_column_width=90)
        )
        summary = device_busy_summary(prof, steps) if cuda else ""
        prefix.with_name(f"{prefix.name}_kernels.txt").write_text(summary + "\n\n".join(tables) + "\n")
        prof.export_chrome_trace(str(prefix.with_name(f"{prefix.name}_trace.json.gz")))

    prefix.parent.mkdir(parents=True, exist_ok=True)
    start = int(run.cfg.num_train_steps)
    run.cfg.num_train_steps = start + 2 + steps  # 1 step skipped (an epoch restart may fall there), 1 warms it up
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(
        activities=activities, schedule=schedule, on_trace_ready=write, record_shapes=True, with_stack=True
    ) as prof:
        step = lambda _: bool(prof.step())  # noqa: E731  (after_step: advance the profiler's schedule, never stop)
        train_loop(run, model, optimizer, scheduler, strategy, start_step=start, after_step=step)


def device_busy_summary(prof: torch.profiler.profile, steps: int) -> str:
    """How much of the profiled wall time the GPU was busy (the union of kernel and copy intervals)."""
    busy = device_busy(prof)
    if busy is None:
        return "GPU busy time not available\n\n"
    if busy[0] == 0:
        return "No GPU activity was recorded\n\n"
    busy_ns, wall_ns = busy
    return (
        f"GPU busy {busy_ns / 1e6 / steps:.1f} ms per step of {wall_ns / 1e6 / steps:.1f} ms profiled wall time "
        f"({busy_ns / wall_ns:.0%}), over {steps} steps\n\n"
    )


def failure(exc: Exception) -> dict[str, str]:
    """The row status of a variant that raised: OOM (CUDA's, or an allocator's message) or failed, with the reason."""
    if isinstance(exc, torch.OutOfMemoryError):  # keep the allocator's figures: what was asked for, what was held
        figures = str(exc).split("If reserved but unallocated")[0].removeprefix("CUDA out of memory.").strip()
        return {"status": "OOM", "reason": f"CUDA out of memory. {figures}".strip()[:400]}
    if "out of memory" in str(exc).lower():
        return {"status": "OOM", "reason": f"{type(exc).__name__}: out of memory"}
    traceback.print_exception(exc)
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}


def estimated_memory_gib(cfg: DictConfig, variant: Variant, budget: int) -> float:
    """memory_model.py's estimate of the variant's peak, printed beside the measured one."""
    estimate = estimate_memory(
        cfg,
        load_model_config(cfg.model_tag),
        use_te=variant.use_te,
        strategy=str(cfg.benchmark.strategy),
        world_size=1,
        tokens=budget,
        on_gpu=torch.cuda.is_available(),
    )
    return estimate.total / 2**30


def start_variant(base: DictConfig, model_tag: str, budget: int, name: str, plan: Plan) -> tuple[dict, Session | None]:
    """The variant's row and its warmed-up session, or a row saying why there is none (skipped, OOM, failed)."""
    row: dict[str, Any] = {"model": model_tag, "token_budget": budget, "variant": name, "status": "pending"}
    if name not in VARIANTS:
        return row | {"status": "skipped", "reason": f"unknown variant (known: {', '.join(VARIANTS)})"}, None
    variant = VARIANTS[name]
    row |= {"label": variant.label, "fp8": False, "fp8_recipe": None, "repeats": 0}
    try:
        cfg = variant_config(base, model_tag, variant, budget, plan)
        row |= {"fp8": fp8_enabled(cfg), "weights": weights_mode(cfg)}
        row["fp8_recipe"] = str(cfg.fp8_config.recipe) if row["fp8"] else None
        row["estimated_memory_gib"] = estimated_memory_gib(cfg, variant, budget)
        if reason := skip_reason(cfg, variant, STRATEGIES[cfg.benchmark.strategy]):
            return row | {"status": "skipped", "reason": reason}, None
        session = open_session(cfg, plan)
    except Exception as exc:  # one broken variant must not cost the others' numbers
        return row | failure(exc), None
    attention = "TE" if session.run.use_te else unwrap(session.model).config._attn_implementation
    return row | {"parameters": count_parameters(session.model), "attention": attention}, session


def spread_stats(key: str, values: list[float | None]) -> dict[str, Any]:
    """Median, min and max of one measure over the repeats, and the per-repeat list (None when not measured)."""
    if not values or any(v is None for v in values):
        return {key: None, f"{key}_min": None, f"{key}_max": None, f"{key}_repeats": values}
    return {
        key: float(np.median(values)),
        f"{key}_min": min(values),
        f"{key}_max": max(values),
        f"{key}_repeats": values,
    }


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's measurements from its timed windows so far: medians with min–max, totals and epoch restarts."""
    row: dict[str, Any] = {"status": "ok", "repeats": len(windows), "window_steps": windows[0]["steps"]}
    row |= {"busy_fraction": None, "traced_tokens_per_s": None}  # set by `trace_window`, after the timed rounds
    for key in REPEATED:
        row |= spread_stats(key, [w[key] for w in windows])
    row["spread"] = row["tokens_per_s_max"] / row["tokens_per_s_min"] - 1
    row["peak_memory_gib_repeats"] = [w["peak_memory_gib"] for w in windows]
    row["peak_memory_gib"] = max(row["peak_memory_gib_repeats"])  # the most the variant needed in any window
    tokens, padded = sum(w["tokens"] for w in windows), sum(w["padded_tokens"] for w in windows)
    row["padding_fraction"] = 1.0 - tokens / max(padded, 1)
    for key in ("sequences", "tokens", "flops"):
        row[f"window_{key}_repeats"] = [w[key] for w in windows]
    row["loss"] = windows[-1]["loss"]
    row["epoch_boundaries"] = sum(w["epoch_boundary"] for w in windows)
    if row["epoch_boundaries"]:
        row["reason"] = f"an epoch boundary in {row['epoch_boundaries']}/{len(windows)} windows"
    return row


def run_window(sessions: dict[str, Session], row: dict[str, Any], plan: Plan, repeat: int, report: dict) -> None:
    """The variant's timed window of this round; an error or OOM marks its row and drops its session only."""
    name = row["variant"]
    try:
        window = timed_window(sessions[name], plan)
    except Exception as exc:
        row.update(failure(exc))
        sessions.pop(name).close()
    else:
        window = {
            "model": row["model"],
            "token_budget": row["token_budget"],
            "variant": name,
            "repeat": repeat,
        } | window
        sessions[name].windows.append(window)
        report["windows"].append(window)  # in the order the windows ran
        row.update(summarize(sessions[name].windows))
    if name in sessions:
        summary = f"{window['tokens_per_s']:,.0f} tokens/s"
    else:  # outside the except block: the error's frames, and the dropped session, no longer hold tensors
        free_cached_memory()
        summary = row.get("reason", "")
    print(
        f"[benchmark] {row['model']} {row['token_budget']} {name} #{repeat + 1}: {row['status']} {summary}", flush=True
    )


def trace_window(sessions: dict[str, Session], row: dict[str, Any], plan: Plan, report: dict) -> None:
    """One more window of the variant, traced: its GPU busy fraction, and its tokens/s to show what tracing cost."""
    session = sessions[row["variant"]]
    if session.run.context.device.type != "cuda":
        return
    try:
        window = timed_window(session, plan, traced=True)
    except Exception as exc:  # the timed windows stand; say why there is no busy fraction
        row["busy_error"] = failure(exc)["reason"]
        return
    report["windows"].append({"model": row["model"], "token_budget": row["token_budget"], "variant": row["variant"],
                              "repeat": None, "traced": True} | window)  # fmt: skip
    row["busy_fraction"], row["traced_tokens_per_s"] = window["busy_fraction"], window["tokens_per_s"]


def measure_group(cfg: DictConfig, group: Group, plan: Plan, report: dict, save: Callable) -> None:
    """One (model, token budget): build and warm up every variant, interleave their timed windows, then free them.

    Sessions live only in `sessions` (no local name keeps one), so that releasing the group's memory at its end
    frees every session's.
    """
    rows, sessions = start_group(cfg, group, plan, report)
    save()
    for repeat in range(plan.repeats):
        for name in [n for n in rows if n in sessions]:  # A B C, A B C, ...
            run_window(sessions, rows[name], plan, repeat, report)
            save()
    for name in [n for n in rows if n in sessions] if plan.busy_fraction else []:
        trace_window(sessions, rows[name], plan, report)
        save()
    for name in list(sessions):
        finish_session(cfg, group, name, sessions.pop(name), rows[name])
    shutdown_workers()
    release_memory()


def start_group(
    cfg: DictConfig, group: Group, plan: Plan, report: dict
) -> tuple[dict[str, dict[str, Any]], dict[str, Session]]:
    """Every variant's row (in the report) and, for those that built and warmed up, its live session."""
    sessions: dict[str, Session] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in group.variants:
        row, session = start_variant(cfg, group.model_tag, group.token_budget, name, plan)
        rows[name] = row
        report["rows"].append(row)
        if session is None:
            free_cached_memory()
            where = f"{group.model_tag} {group.token_budget} {name}"
            print(f"[benchmark] {where}: {row['status']} {row['reason']}", flush=True)
        else:
            sessions[name] = session
    return rows, sessions


def finish_session(cfg: DictConfig, group: Group, name: str, session: Session, row: dict[str, Any]) -> None:
    """Profile the session if the group asks for it, then end its data stream."""
    if group.profile:
        stem = f"{group.model_tag}_{group.token_budget}_{name}"
        prefix = output_dir(cfg.benchmark, session.run.context.device) / "profile" / stem
        try:
            profile_steps(*session_parts(session), prefix, int(cfg.benchmark.profile_steps))
        except Exception as exc:  # the timed numbers stand; say why there is no profile
            row["profile"] = failure(exc)["reason"]
    session.close()


def left_after_group(group: str) -> dict[str, Any]:
    """What a finished group left alive: GPU memory still allocated and models not collected (both should be none).

    On 2026-12-07 a 3B session that followed 650M sessions ran out of memory with about 20 GiB more allocated than it
    needs; this says, per group, whether and what stays behind.
    """
    alive: dict[str, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module) and type(obj).__name__.endswith("ForMaskedLM"):  # one rank: no DDP wrapper
            alive[type(obj).__name__] = alive.get(type(obj).__name__, 0) + 1
    allocated = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    left = {"group": group, "allocated_gib": round(allocated, 2), "models_alive": alive}
    print(f"[benchmark] left after {group}: {allocated:.2f} GiB allocated, models alive {alive or 'none'}", flush=True)
    return left


def session_parts(session: Session) -> tuple[Run, Any, Any, Any, Strategy]:
    return session.run, session.model, session.optimizer, session.scheduler, session.strategy


def free_cached_memory() -> None:
    """Drop unreachable objects and return cached GPU blocks (a dropped session's memory) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def release_memory() -> None:
    """Free a finished group's GPU memory and TE's global FP8 state, and restart the peak-memory count.

    Only between groups: TE's FP8 state is process-global, and live sessions of the group still use it.
    """
    free_cached_memory()
    if "transformer_engine.pytorch" in sys.modules:
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:  # older TE releases
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
        FP8GlobalStateManager.reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _median_tflops(fn: Callable[[], Any], size: int, cuda: bool, repeats: int) -> float:
    """Dense n³ matmul throughput: median of `repeats` timed calls after 3 warm-up calls (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        seconds = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
    return 2 * size**3 / float(np.median(seconds)) / 1e12


def matmul_ceilings(device: torch.device, size: int, repeats: int = 20) -> dict[str, float]:
    """What this device's matmuls reach (TFLOP/s): the MFU denominators, measured here rather than quoted.

    GPU: BF16 `torch.matmul`, and FP8 (e4m3 inputs, BF16 output, unit scales, fast accumulation) through
    `torch._scaled_mm`. CPU: an FP32 matmul of at most 1024³, so that the plumbing runs in CI.
    """
    if device.type != "cuda":
        size = min(size, 1024)
        a, b = torch.randn(size, size), torch.randn(size, size)
        return {"fp32": _median_tflops(lambda: a @ b, size, False, 5)}
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    ceilings = {"bf16": _median_tflops(lambda: a @ b, size, True, repeats)}
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # second operand column-major
        one = torch.ones((), device=device)

        def fp8() -> torch.Tensor:
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

        ceilings["fp8"] = _median_tflops(fp8, size, True, repeats)
    except (RuntimeError, TypeError, AttributeError) as exc:
        logger.warning("FP8 matmul ceiling not measured: %s", exc)
    return ceilings


def add_derived(report: dict[str, Any]) -> None:
    """Speed-up of the medians against hf_pad1024 of the same model and budget, and MFU against the ceilings."""
    ceilings, dense = report["meta"]["ceilings_tflops"], report["meta"]["dense_ceiling"]
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    baseline = {(r["model"], r["token_budget"]): r["tokens_per_s"] for r in rows if r["variant"] == BASELINE}
    for r in rows:
        reference = baseline.get((r["model"], r["token_budget"]))
        r["speedup"] = r["tokens_per_s"] / reference if reference else None
        r.update(spread_stats("mfu", [t / ceilings[dense] for t in r["tflops_repeats"]]))
        fp8 = r["fp8"] and "fp8" in ceilings
        r.update(spread_stats("mfu_fp8", [t / ceilings["fp8"] for t in r["tflops_repeats"]] if fp8 else []))


def _num(value: float) -> str:
    """Three significant digits, with thousands separators above 1,000 (TFLOP/s on a CPU are tiny)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def short_name(model_tag: str) -> str:
    match = re.search(r"_(\d+[MB])_", model_tag)
    return f"ESM-2 {match.group(1)}" if match else model_tag


def table_cells(r: dict[str, Any]) -> list[str]:
    """One table row: what was run, then the medians (tokens/s with its min–max), or the status and why."""
    cells = [short_name(r["model"]), f"{r['token_budget']:,}", r["variant"], r.get("fp8_recipe") or "–"]
    cells.append(r.get("weights", ""))
    if r["status"] != "ok":
        return [*cells, r["status"], *[""] * 10, r.get("reason", "")]
    speedup = "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
    tokens = f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_min']:,.0f}–{r['tokens_per_s_max']:,.0f})"
    return [
        *cells,
        tokens,
        f"{r['spread']:.1%}",
        speedup,
        _num(r["tflops"]),
        _pct(r["mfu"]),
        _pct(r["mfu_fp8"]),
        f"{r['step_time_s'] * 1e3:.1f}",
        "–" if r["busy_fraction"] is None else f"{r['busy_fraction']:.0%} ({r['traced_tokens_per_s']:,.0f})",
        f"{r['peak_memory_gib']:.2f}"
        + (f" (est. {r['estimated_memory_gib']:.1f})" if r.get("estimated_memory_gib") is not None else ""),
        _pct(r["padding_fraction"]),
        str(r["repeats"]),
        r.get("reason", ""),
    ]


def clocks_text(clocks: dict[str, float | None] | str) -> str:
    if isinstance(clocks, str):
        return clocks
    mhz = {k: "?" if v is None else f"{v:.0f}" for k, v in clocks.items()}
    return (
        f"SM {mhz['sm_mhz']} of max {mhz['sm_max_mhz']} MHz, memory {mhz['memory_mhz']} of max "
        f"{mhz['memory_max_mhz']} MHz, power limit {mhz['power_limit_w']} W"
    )


def markdown(report: dict[str, Any], heading: str = "#") -> str:
    """The results table with everything needed to read it: hardware, versions, ceilings, set-up and FLOP formula."""
    meta, dense = report["meta"], report["meta"]["dense_ceiling"].upper()
    ceilings = ", ".join(f"{k.upper()} {_num(v)} TFLOP/s" for k, v in meta["ceilings_tflops"].items())
    budgets = ", ".join(f"{b:,}" for b in meta["token_budgets"])
    busy = (
        "of one more window per variant after the timed ones, traced with torch.profiler (CUDA kernels and copies; "
        "in brackets that window's tokens/s: tracing slows a host-bound step, so the timed windows are untraced)"
        if meta["busy_fraction"]
        else "not measured"
    )
    lines = [
        f"{heading} Pretraining throughput: {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, TransformerEngine {meta['transformer_engine']}, transformers {meta['transformers']}; "
        f"one {meta['device']}. Matmul ceilings measured in this run ({meta['ceiling_size']}³, median): {ceilings}.",
        f"Host: {meta['host_cpu']}, {meta['cpu_count']} CPU cores ({meta['cpu_affinity']} usable by this process). "
        f"GPU after the ceilings: {clocks_text(meta['gpu_clocks'])}.",
        f"Every variant: forward + backward + fused AdamW, train_{meta['strategy']}.py's model on one device"
        + (" (one rank: no DDP wrapper)" if meta["strategy"] == "ddp" else "")
        + ", BF16 compute "
        f"(FP32 on CPU), weights as in the row (run's default: {meta['weights']}), real protein lengths from "
        f"`{meta['dataset']}`"
        + (f" ({meta['epoch_copies']} copies an epoch)" if meta.get("epoch_copies", 1) > 1 else "")
        + f", a capacity per step of {budgets} tokens (Tokens/step; "
        + (
            "one protein of that many tokens per step: dataset.max_seq_length = Tokens/step)."
            if meta.get("one_sequence_per_step")
            else f"padded: that // {meta['max_seq_length']} sequences of up to {meta['max_seq_length']} tokens; "
            "packed: packs of that size)."
        ),
        f"Per model and budget every variant is built once and warmed up ({meta['warmup_steps']} steps); then "
        f"{meta['repeats']} round(s) of one {meta['timed_steps']}-step timed window per variant, interleaved "
        "(A B C A B C …). Tokens/s: median (min–max) over the windows; Spread = max / min − 1; the other columns "
        f"are medians. Busy: GPU busy fraction {busy}.",
        f"Model FLOPs (padding excluded): {FLOP_FORMULA}; MFU = TFLOP/s / measured {dense} ceiling (FP8 rows also / "
        "FP8 ceiling).",
        "",
        f"| Model | Tokens/step | Variant | FP8 | Weights | Tokens/s/GPU (unpadded), median (min–max) | Spread | "
        f"Speed-up vs {BASELINE} | TFLOP/s | MFU ({dense}) | MFU (FP8) | Step time (ms) | Busy | "
        "Peak memory (GiB; est.) | Padding | Repeats | Notes |",
        "|---|--:|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of unpadded tokens/s (log axis) per model, budget and variant: median, min–max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, meta = {(r["model"], r["token_budget"], r["variant"]): r for r in report["rows"]}, report["meta"]
    groups, variants = list(dict.fromkeys(k[:2] for k in rows)), list(dict.fromkeys(k[2] for k in rows))
    colors, width = plt.get_cmap("tab10").colors, 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(groups) * len(variants) + 2), 5))
    for i, group in enumerate(groups):
        for j, variant in enumerate(variants):
            r, x = rows.get((*group, variant)), i + (j - (len(variants) - 1) / 2) * width
            if r is None:
                continue
            if r["status"] != "ok":
                ax.text(x, 0.02, r["status"], transform=ax.get_xaxis_transform(), rotation=90, ha="center", fontsize=7)
                continue
            median, low, high = r["tokens_per_s"], r["tokens_per_s_min"], r["tokens_per_s_max"]
            error = [[median - low], [high - median]]
            ax.bar(x, median, width * 0.95, yerr=error, capsize=2, color=colors[j % len(colors)], ecolor="black")
            label = f"{r['speedup']:.1f}×" if r.get("speedup") else f"{median:.2g}"
            ax.text(x, high * 1.05, label, ha="center", va="bottom", fontsize=7, rotation=90)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    low, high = min([r["tokens_per_s_min"] for r in ok] or [1.0]), max([r["tokens_per_s_max"] for r in ok] or [1.0])
    ax.set_yscale("log")
    ax.set_ylim(10 ** math.floor(math.log10(low / 2)), high * 6)  # room for the labels
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xticks(range(len(groups)), [f"{short_name(m)}\n{b:,} tokens/step" for m, b in groups])
    ax.set_ylabel("unpadded tokens/s per GPU (log scale)")
    ax.set_title(
        f"ESM-2 training throughput: {meta['gpu']}, {meta['date']}\nbars: median of {meta['repeats']} interleaved "
        f"windows, whiskers: min–max; labels: speed-up vs {BASELINE}",
        fontsize=9,
    )
    handles = [Patch(color=colors[j % len(colors)], label=v) for j, v in enumerate(variants)]
    ax.legend(handles=handles, fontsize=8, ncol=4, loc="upper left")
    fig.tight_layout()
    for suffix in (".png", ".svg"):
        fig.savefig(path.with_suffix(suffix), dpi=150)
    plt.close(fig)


def update_readme(readme: Path, table: str) -> None:
    """Replace the section between the results markers of the README with the latest table."""
    text = readme.read_text() if readme.is_file() else ""
    if README_START not in text or README_END not in text:
        logger.warning("%s has no %s ... %s section; not updated.", readme, README_START, README_END)
        return
    head, rest = text.split(README_START, 1)
    readme.write_text(f"{head}{README_START}\n{table}{README_END}{rest.split(README_END, 1)[1]}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def host_cpu() -> dict[str, Any]:
    """The host CPU model and core counts: below 3B the step is host-bound, so the host is part of the result."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host_cpu": model or platform.processor() or NOT_AVAILABLE,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": usable,
    }


SMI_FIELDS = ("sm_mhz", "sm_max_mhz", "memory_mhz", "memory_max_mhz", "power_limit_w")


def parse_nvidia_smi(text: str) -> dict[str, float | None] | str:
    """`nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit` CSV, as numbers."""
    lines = text.strip().splitlines()
    if not lines:
        return NOT_AVAILABLE
    values = [re.match(r"\s*(\d+(?:\.\d+)?)", part) for part in lines[0].split(",")]
    return {key: float(m.group(1)) if m else None for key, m in zip(SMI_FIELDS, values, strict=False)}  # "[N/A]" → None


def nvidia_smi_clocks(index: int) -> dict[str, float | None] | str:
    query = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
    command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", "-i", str(index)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:  # no nvidia-smi, or it failed
        return f"{NOT_AVAILABLE} ({type(exc).__name__})"
    return parse_nvidia_smi(result.stdout)


def gpu_clocks(device: torch.device) -> dict[str, float | None] | str:
    """SM and memory clocks (current and max, MHz) and the enforced power limit (W): what the ceilings depend on."""
    if device.type != "cuda":
        return NOT_AVAILABLE
    try:
        index = torch.cuda._get_nvml_device_index(device)  # NVML numbering, with CUDA_VISIBLE_DEVICES applied
    except Exception:  # device UUIDs in CUDA_VISIBLE_DEVICES need pynvml
        index = device.index or 0
    try:
        import pynvml
    except ImportError:
        return nvidia_smi_clocks(index)
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        sm, memory = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        return {
            "sm_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, sm)),
            "sm_max_mhz": float(pynvml.nvmlDeviceGetMaxClockInfo(handle, sm)),
            "memory_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, memory)),
            "memory_max_mhz": float(pynvml.nvmlDeviceGetMaxClockInfo(handle, memory)),
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,  # milliwatts
        }
    except pynvml.NVMLError as exc:
        return f"{NOT_AVAILABLE} ({exc})"


def output_dir(bench: DictConfig, device: torch.device) -> Path:
    """benchmark.output_dir if set; else GPU runs go next to the committed tables, CPU runs under outputs/."""
    if bench.get("output_dir"):
        return Path(bench.output_dir)
    return Path("benchmarks/results" if device.type == "cuda" else "outputs/benchmark")


def dumps(report: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers on one line (the windows' lengths would take a line per number)."""
    compact: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list) and all(v is None or isinstance(v, int | float) for v in value):
            compact.append(json.dumps(value))
            return f"\0{len(compact) - 1}\0"  # a placeholder string, swapped for the one-line list below
        return [mark(v) for v in value] if isinstance(value, list) else value

    text = json.dumps(mark(report), indent=2)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: compact[int(m.group(1))], text)


def copies_of_the_data(cfg: DictConfig, folder: Path) -> None:
    """Point `dataset.path` at `benchmark.epoch_copies` links to each data file, made in a folder under `folder`.

    One epoch then holds that many copies of every protein, in one shuffle.

    A small sample (~41 packs of 16k tokens) ends its epoch inside most timed windows, and its last packs are the
    sparse ones (short proteins left over, capped per pack): windows with and without that end differ by ~10%.
    Training data of millions of proteins ends an epoch a handful of times per run, so the copies measure the
    steady state that training sees, with the sample's own length distribution.
    """
    copies = int(cfg.benchmark.epoch_copies)
    if copies == 1:
        return
    sources = [Path(name).resolve() for name in list_data_files(str(cfg.dataset.path))]
    key = hashlib.sha256("\n".join(map(str, sources)).encode()).hexdigest()[:12]
    folder = folder / f"{copies}x_{key}"  # one folder per data and count: runs share its links and datasets cache
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(copies):
        for source in sources:
            link = folder / f"copy{index:03d}_{source.name}"
            if not link.is_symlink():
                link.symlink_to(source)
    cfg.dataset.path = str(folder)


def report_meta(cfg: DictConfig, plan: Plan, device: torch.device) -> dict[str, Any]:
    """Everything the numbers depend on besides the variant: hardware, clocks, versions, ceilings and the set-up."""
    size = int(cfg.benchmark.ceiling_size) if device.type == "cuda" else min(int(cfg.benchmark.ceiling_size), 1024)
    ceilings = matmul_ceilings(device, int(cfg.benchmark.ceiling_size))
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "device": "GPU" if device.type == "cuda" else device.type.upper(),
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "transformer_engine": _version("transformer_engine"),
        "transformers": _version("transformers"),
        **host_cpu(),
        "gpu_clocks": gpu_clocks(device),  # after the ceilings, so the clocks are those of a busy GPU
        "ceiling_size": size,
        "ceilings_tflops": ceilings,
        "dense_ceiling": "bf16" if device.type == "cuda" else "fp32",
        "dataset": str(cfg.dataset.path),
        "epoch_copies": int(cfg.benchmark.epoch_copies),
        "token_budgets": sorted({group.token_budget for group in benchmark_groups(cfg, plan)}),
        "max_seq_length": int(cfg.dataset.max_seq_length),
        "one_sequence_per_step": bool(cfg.benchmark.one_sequence_per_step),
        "warmup_steps": plan.warmup,
        "timed_steps": plan.timed,
        "repeats": plan.repeats,
        "busy_fraction": plan.busy_fraction and device.type == "cuda",
        "strategy": str(cfg.benchmark.strategy),
        "weights": "FP32 master weights"
        if cfg.use_fp32_master_weights
        else "BF16 weights and optimizer state (use_fp32_master_weights=false)",
        "flop_formula": FLOP_FORMULA,
    }


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Measure every configured (model, budget, variant), rewriting the report after every window.

    A run that is cut off keeps the windows it finished.
    """
    plan = benchmark_plan(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    release_memory()
    report: dict[str, Any] = {"meta": report_meta(cfg, plan, device), "rows": [], "windows": []}
    out_dir = output_dir(cfg.benchmark, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    # git-ignored, and one path from run to run, so that the datasets cache of the copies is reused
    copies_of_the_data(cfg, RECIPE_DIR / "outputs" / "benchmark_epoch_copies")
    weights = "fp32-master" if cfg.use_fp32_master_weights else "bf16-weights"
    slug = re.sub(r"[^a-z0-9]+", "-", report["meta"]["gpu"].lower()).strip("-")
    stem = out_dir / f"benchmark_{slug}_{report['meta']['date'][:10]}_{cfg.benchmark.strategy}_{weights}"

    def save() -> None:
        add_derived(report)
        stem.with_suffix(".json").write_text(dumps(report) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))

    for group in benchmark_groups(cfg, plan):
        measure_group(cfg, group, plan, report, save)  # ends by releasing the group's memory
        report.setdefault("left_after_groups", []).append(left_after_group(f"{group.model_tag} {group.token_budget}"))
    save()
    chart(report, stem)
    if cfg.benchmark.get("readme") and device.type == "cuda":
        update_readme(RECIPE_DIR / cfg.benchmark.readme, markdown(report, heading="###"))
    print(f"\n{markdown(report)}\nWritten: {stem}.md, .json, .png, .svg", flush=True)
    return report


@hydra.main(config_path="hydra_config", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run_benchmark(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
