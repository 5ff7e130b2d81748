"""Learning-rate schedules: linear warm-up, then a decay to a floor over most of training, then flat.

`linear` is ESM-2's decay, `cosine` AMPLIFY's (half a cosine from the peak down to the floor).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULE_KINDS = ("linear", "cosine")


def esm2_lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.9,
    min_lr_ratio: float = 0.1,
    kind: str = "linear",
) -> float:
    """Multiplier of the peak learning rate after `step` optimizer steps.

    ESM-2 warms up linearly over 2,000 steps to the peak, then decays linearly to 10% of the peak at 90% of training
    and stays there. `decay_fraction` and `min_lr_ratio` set where the decay ends and the floor it reaches;
    `kind="cosine"` decays along half a cosine instead (AMPLIFY), the same start, end and floor.
    """
    if step < warmup_steps:
        return step / warmup_steps
    decay_end = max(int(decay_fraction * total_steps), warmup_steps)
    if step >= decay_end:
        return min_lr_ratio
    progress = (step - warmup_steps) / (decay_end - warmup_steps)
    if kind == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def build_esm2_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.9,
    min_lr_ratio: float = 0.1,
    kind: str = "linear",
) -> LambdaLR:
    """A `LambdaLR` following `esm2_lr_factor`; its state dict is the step count, so it checkpoints for free."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {SCHEDULE_KINDS}.")
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
            kind=kind,
        )

    return LambdaLR(optimizer, factor)
