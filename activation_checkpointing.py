"""Activation checkpointing: keep less of each layer's forward for the backward pass, and recompute the rest.

Long proteins make activations, not weights, the memory limit: they grow with tokens x layers. `full` keeps only a
checkpointed layer's input and runs its forward again in the backward pass (about a third more compute);
`selective` recomputes one part of the layer: `mlp` (its LayerNorm, FC1 and GELU, most of a layer's activations) or
`attention` (its LayerNorm, QKV, rotary, attention and output projection).

The TE model recomputes through TransformerEngine's own machinery so FP8 scaling state stays right under
recomputation: `te.distributed.checkpoint` for whole layers and for attention blocks, `LayerNormMLP`'s built-in
checkpointing for the MLP (which also skips recomputing FC2, whose output the backward does not need). The reference
model uses `torch.utils.checkpoint`. Both are non-reentrant, so DDP, FSDP2 and Megatron-FSDP see ordinary autograd.
The wrapped forwards replace methods on the modules themselves: no wrapper modules, so parameter names, state
dicts and checkpoints are the same with and without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from precision import layer_ranges, parse_layers

MODES = ("none", "full", "selective")
SELECTIVE_PARTS = ("mlp", "attention")


@dataclass(frozen=True)
class CheckpointPlan:
    """What is recomputed: `mode`, the part for selective mode, and the 1-based layers it applies to."""

    mode: str
    part: str
    layers: tuple[int, ...]

    @property
    def enabled(self) -> bool:
        return self.mode != "none" and bool(self.layers)

    def describe(self, num_layers: int) -> str:
        if not self.enabled:
            return "activation checkpointing: off (every layer keeps its activations)"
        what = "whole layers" if self.mode == "full" else f"the {self.part} block"
        which = "every layer" if len(self.layers) == num_layers else f"layers {layer_ranges(list(self.layers))}"
        return f"activation checkpointing: {what} recomputed in the backward pass, {which}"


def checkpoint_problems(section: Any, num_layers: int) -> tuple[CheckpointPlan | None, list[str]]:
    """The plan of an `activation_checkpointing` config section, or None and what is wrong with it."""
    mode, part, layers = section.mode, section.selective_part, section.layers
    problems = []
    if mode not in MODES:
        problems.append(f"activation_checkpointing.mode={mode!r}: must be one of {MODES}")
    if part not in SELECTIVE_PARTS:
        problems.append(f"activation_checkpointing.selective_part={part!r}: must be one of {SELECTIVE_PARTS}")
    if isinstance(layers, int) and not isinstance(layers, bool):  # a count: the first N layers
        if not 0 <= layers <= num_layers:
            problems.append(
                f"activation_checkpointing.layers={layers}: a count of layers must lie in 0..{num_layers} (the "
                "model's layers), or give a list/range such as [1-12]"
            )
        numbers: list[int] | None = list(range(1, min(max(layers, 0), num_layers) + 1))
    else:
        numbers, listed = parse_layers(layers, "activation_checkpointing.layers", num_layers)
        problems += listed
    if problems:
        return None, problems
    chosen = tuple(range(1, num_layers + 1)) if numbers is None else tuple(sorted(numbers))
    return CheckpointPlan(mode, part, chosen), []


def resolve_checkpoint_plan(section: Any, num_layers: int) -> CheckpointPlan:
    plan, problems = checkpoint_problems(section, num_layers)
    if plan is None:
        raise ValueError("; ".join(problems))
    return plan


def _recompute_in_backward(module: nn.Module, method: str, checkpoint_fn: Callable[..., Any]) -> None:
    """Route `module.<method>` through `checkpoint_fn` while gradients are recorded (eval and no-grad run as is)."""
    inner = getattr(module, method)

    @functools.wraps(inner)
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint_fn(inner, *args, **kwargs)

    setattr(module, method, recomputed)


def _te_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import transformer_engine.pytorch as te

    return te.distributed.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _torch_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _checkpoint_te_layer(layer: nn.Module, plan: CheckpointPlan) -> None:
    if plan.mode == "full":
        _recompute_in_backward(layer, "forward", _te_checkpoint)
    elif plan.part == "attention":
        _recompute_in_backward(layer.self_attention, "forward", _te_checkpoint)
    else:
        layer.layernorm_mlp.checkpoint = True  # TE recomputes LayerNorm, FC1 and GELU; FC2 is not needed


def _checkpoint_reference_layer(layer: nn.Module, plan: CheckpointPlan) -> None:
    if plan.mode == "full":
        _recompute_in_backward(layer, "forward", _torch_checkpoint)
    elif hasattr(layer, "ffn"):  # modeling_amplify.AMPLIFYEncoderBlock: its RMSNorms run outside these two parts
        if plan.part == "attention":
            _recompute_in_backward(layer, "_attention", _torch_checkpoint)  # QKV, rotary, attention, output proj.
        else:
            _recompute_in_backward(layer.ffn, "forward", _torch_checkpoint)  # SwiGLU: w12, SiLU gate, w3
    elif plan.part == "attention":
        _recompute_in_backward(layer.attention, "forward", _torch_checkpoint)
    else:
        _recompute_in_backward(layer, "feed_forward_chunk", _torch_checkpoint)  # LayerNorm, FC1, GELU, FC2


def apply_activation_checkpointing(layers: list[nn.Module], plan: CheckpointPlan, te_layers: bool) -> None:
    """Make the plan's layers recompute in the backward pass. Call once, before the strategy wraps the model."""
    if not plan.enabled:
        return
    apply = _checkpoint_te_layer if te_layers else _checkpoint_reference_layer
    for number in plan.layers:
        apply(layers[number - 1], plan)
