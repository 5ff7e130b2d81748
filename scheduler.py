"""ESM-2's learning-rate schedule: linear warm-up, linear decay to a floor over most of training, then flat."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def esm2_lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, decay_fraction: float = 0.9, min_lr_ratio: float = 0.1
) -> float:
    """Multiplier of the peak learning rate after `step` optimizer steps.

    ESM-2 warms up linearly over 2,000 steps to the peak, then decays linearly to 10% of the peak at 90% of training
    and stays there. `decay_fraction` and `min_lr_ratio` set where the decay ends and the floor it reaches.
    """
    if step < warmup_steps:
        return step / warmup_steps
    decay_end = max(int(decay_fraction * total_steps), warmup_steps)
    if step >= decay_end:
        return min_lr_ratio
    progress = (step - warmup_steps) / (decay_end - warmup_steps)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def build_esm2_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.9,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """A `LambdaLR` following `esm2_lr_factor`; its state dict is the step count, so it checkpoints for free."""
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} > 0.")
    if not 0.0 < decay_fraction <= 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"decay_fraction={decay_fraction} must be in (0, 1] and min_lr_ratio={min_lr_ratio} in [0, 1]."
        )

    def factor(step: int) -> float:
        return esm2_lr_factor(
            step,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            decay_fraction=decay_fraction,
            min_lr_ratio=min_lr_ratio,
        )

    return LambdaLR(optimizer, factor)
