"""How much GPU memory a run needs, from its configuration alone: printed at start-up, before the first step.

A run's peak is reached early in the backward pass: the weights, the gradients and the optimizer state (per rank,
after sharding), every activation the forward kept for the backward, and the step's working set (logits and loss, the
gradients of one layer's activations, the layer being recomputed). Activations grow with tokens x layers and are what
activation checkpointing trades for compute, so they are itemised per token and layer.

The coefficients are measured (benchmarks/activation_memory.py for the TE model, on an H200: ESM-2 650M's shape,
8,192 tokens, each checkpointing mode, BF16 and FP8; tests/test_long_sequences.py for the reference model on the CPU)
and follow what each block keeps for its backward. TE attention: LayerNorm input and output, the QKV output, rotated
Q and K, the attention output and softmax statistics, 12 bytes per hidden unit in BF16; TE MLP: LayerNorm input and
output, FC1's and GELU's outputs, 4 per hidden and 4 per FFN unit (FP8 keeps GELU's output in FP8: 3 per FFN unit).
A layer whose weights are FP32 (or that runs in FP8) also keeps the BF16 (FP8 and transposed) copies its GEMMs used
until its backward: 2 bytes per GEMM weight. An estimate, not a promise: the allocator's fragmentation, cuBLAS and
NCCL workspaces come on top; README and benchmarks/README compare it with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from activation_checkpointing import resolve_checkpoint_plan
from model import parameter_dtype
from precision import fp8_enabled

GIB = 2**30
MODES = ("none", "full", "selective_mlp", "selective_attention")

# Bytes per token per layer = h * hidden + i * ffn + a * heads, of what each block keeps for its backward pass.
TE_ATTENTION = {"bf16": (12.0, 0.0, 4.0), "fp8": (12.2, 0.0, 4.0)}
TE_MLP = {"bf16": (4.0, 4.0, 0.0), "fp8": (4.0, 3.0, 0.0)}
# Reference (transformers) model in FP32, measured on the CPU: its attention keeps LayerNorm, Q/K/V, the rotary
# intermediates and the output (24 H) and softmax statistics; its MLP LayerNorm in/out and FC1 plus the exact GELU's
# intermediates (16 per FFN unit). Under BF16 autocast on a GPU the same tensors take half as much.
REFERENCE_ATTENTION = (24.0, 0.0, 4.0)
REFERENCE_MLP = (8.0, 16.0, 0.0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of each part of a training step's peak."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    working_set: float
    tokens: int
    checkpointing: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.working_set

    def describe(self) -> str:
        parts = (
            f"weights {self.weights / GIB:.2f}",
            f"gradients {self.gradients / GIB:.2f}",
            f"optimizer {self.optimizer / GIB:.2f}",
            f"activations {self.activations / GIB:.2f} ({self.tokens:,} tokens, {self.checkpointing})",
            f"working set {self.working_set / GIB:.2f}",
        )
        return f"Estimated peak memory per rank: {self.total / GIB:.2f} GiB = " + " + ".join(parts) + " GiB"


def _per_token(coefficients: tuple[float, float, float], config: Any) -> float:
    h, i, a = coefficients
    return h * config.hidden_size + i * config.intermediate_size + a * config.num_attention_heads


def layer_parameters(config: Any) -> int:
    """Parameters of one transformer layer: QKV and output projection, FC1 and FC2 with biases, two LayerNorms."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    return 4 * hidden * hidden + 4 * hidden + 2 * hidden * ffn + ffn + hidden + 4 * hidden


def model_parameters(config: Any) -> int:
    """All trained parameters: embeddings, layers, final LayerNorm and LM head (its decoder tied to the embedding)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    head = hidden * hidden + hidden + 2 * hidden + vocab
    return vocab * hidden + config.num_hidden_layers * layer_parameters(config) + 2 * hidden + head


def activation_bytes_per_token_layer(
    cfg: Any, config: Any, use_te: bool, mode: str | None = None, on_cpu: bool = False
) -> float:
    """What one layer keeps per token for its backward pass under a checkpointing mode (default: the config's).

    `mode` is none, full, selective_mlp or selective_attention. A recomputed block keeps only its input (the layer's
    input for full checkpointing), in the compute dtype.
    """
    mode = mode or checkpoint_mode(cfg)
    if use_te:
        kind = "fp8" if fp8_enabled(cfg) else "bf16"
        attention, mlp, element = _per_token(TE_ATTENTION[kind], config), _per_token(TE_MLP[kind], config), 2
        if cfg.fp32_residual_connection:
            element = 4
    else:
        element = 4 if on_cpu else 2
        attention = _per_token(REFERENCE_ATTENTION, config) * element / 4
        mlp = _per_token(REFERENCE_MLP, config) * element / 4
    kept_input = element * config.hidden_size
    return {
        "none": attention + mlp,
        "full": kept_input,
        "selective_mlp": attention + kept_input,
        "selective_attention": kept_input + mlp,
    }[mode]


def checkpoint_mode(cfg: Any) -> str:
    """The config's checkpointing as one of MODES."""
    section = cfg.activation_checkpointing
    return section.mode if section.mode != "selective" else f"selective_{section.selective_part}"


def weight_copies_per_layer(cfg: Any, config: Any, use_te: bool, mode: str, on_gpu: bool) -> float:
    """Bytes of GEMM-weight copies a layer keeps from its forward to its backward (TE model on a GPU).

    FP32 weights are cast to BF16 (FP8 layers: to FP8 and its transpose) for every forward and the copy lives until
    the layer's backward, except in a recomputed block, which casts again. BF16 weights in a BF16 run need no copy.
    """
    fp32_weights = parameter_dtype(cfg, "cuda" if on_gpu else "cpu") == torch.float32
    if not (use_te and on_gpu and (fp32_weights or fp8_enabled(cfg))):
        return 0.0
    hidden, ffn = config.hidden_size, config.intermediate_size
    attention, mlp = 2 * 4 * hidden * hidden, 2 * 2 * hidden * ffn
    return {"none": attention + mlp, "full": 0.0, "selective_mlp": attention, "selective_attention": mlp}[mode]


def _shards(cfg: Any, strategy: str, world_size: int) -> tuple[int, int, int]:
    """How many ranks share the weights, the gradients and the optimizer state."""
    if strategy == "fsdp2":
        return world_size, world_size, world_size
    if strategy == "mfsdp":
        sharded = {"no_shard": (), "optim": ("o",), "optim_grads": ("o", "g"), "optim_grads_params": ("o", "g", "p")}
        which = sharded[cfg.mfsdp.zero_dp_strategy]
        return tuple(world_size if part in which else 1 for part in ("p", "g", "o"))  # type: ignore[return-value]
    return 1, 1, 1


def estimate_memory(
    cfg: Any, config: Any, *, use_te: bool, strategy: str, world_size: int, tokens: int, on_gpu: bool
) -> MemoryEstimate:
    """The peak of one training step per rank for `tokens` tokens per micro-batch (see the module docstring)."""
    device = "cuda" if on_gpu else "cpu"
    param_bytes = 4 if parameter_dtype(cfg, device) == torch.float32 else 2
    params, layers = model_parameters(config), config.num_hidden_layers
    weight_shards, grad_shards, optim_shards = _shards(cfg, strategy, world_size)
    masters_in_optimizer = cfg.use_fp32_master_weights and cfg.master_weights == "optimizer" and on_gpu
    optimizer_bytes = 12 if masters_in_optimizer else 2 * param_bytes  # Adam moments (+ FP32 masters in FusedAdam)
    plan = resolve_checkpoint_plan(cfg.activation_checkpointing, layers)
    checkpointed = len(plan.layers) if plan.enabled else 0
    mode = checkpoint_mode(cfg) if checkpointed else "none"

    def kept(mode: str) -> float:  # one layer: its activations for `tokens`, and its weight copies
        per_token = activation_bytes_per_token_layer(cfg, config, use_te, mode=mode, on_cpu=not on_gpu)
        return tokens * per_token + weight_copies_per_layer(cfg, config, use_te, mode, on_gpu)

    activations = checkpointed * kept(mode) + (layers - checkpointed) * kept("none")
    working = _working_set(config, tokens, recomputed=kept("none") - kept(mode) if checkpointed else 0.0)
    return MemoryEstimate(
        weights=params * param_bytes / weight_shards,
        gradients=params * param_bytes / grad_shards,
        optimizer=params * optimizer_bytes / optim_shards,
        activations=activations,
        working_set=working,
        tokens=tokens,
        checkpointing=plan.describe(layers).removeprefix("activation checkpointing: "),
    )


def _working_set(config: Any, tokens: int, recomputed: float) -> float:
    """What the step needs beyond weights, state and kept activations, at its peak.

    The logits (BF16, the padded vocabulary) with their FP32 copy and gradient; the gradients of one layer's
    activations as the backward passes through it (measured: about two bytes per FFN unit and four per hidden unit
    and token); and, with checkpointing, what one layer recomputes, alive during that layer's backward.
    """
    vocab = -(-config.vocab_size // 64) * 64
    logits = tokens * vocab * (2 + 4 + 4)
    gradients = tokens * (2 * config.intermediate_size + 4 * config.hidden_size)
    return logits + gradients + recomputed
