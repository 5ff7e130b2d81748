"""Learning-rate schedules: linear warm-up, then a decay to a floor over most of training, then flat.

`linear` is ESM-2's decay, `cosine` AMPLIFY's (half a cosine from the peak down to the floor). The schedule travels
with the checkpoint, so a run resumed with another one (more steps to extend a finished run, another peak) says so
and follows `lr_scheduler.on_resume_change`:

- `extend` (default): the steps trained so far keep the checkpoint's schedule; from the resume step the learning
  rate goes on from its value there to the configured floor at the configured end of the decay (finishing the
  warm-up first if it is not over), with no jump;
- `restart`: a new warm-up and decay over the remaining steps, as a fresh run of that many steps would have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

SCHEDULE_KINDS = ("linear", "cosine")
RESUME_CHANGES = ("extend", "restart")
CONFIG_KEYS = {  # Schedule field -> the configuration key that sets it
    "peak_lr": "optimizer.lr",
    "warmup_steps": "lr_scheduler.warmup_steps",
    "total_steps": "num_train_steps",
    "decay_fraction": "lr_scheduler.decay_fraction",
    "min_lr_ratio": "lr_scheduler.min_lr_ratio",
    "kind": "lr_scheduler.kind",
}


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
    return _decayed(min_lr_ratio, 1.0, (step - warmup_steps) / (decay_end - warmup_steps), kind)


def _decayed(floor: float, start: float, progress: float, kind: str) -> float:
    """From `start` (progress 0) to `floor` (progress 1), linearly or along half a cosine."""
    if kind == "cosine":
        return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return start - (start - floor) * progress


@dataclass(frozen=True)
class Schedule:
    """A run's learning rate at every step: the configured shape, where it (re)started, where it was continued.

    `start_step`: a `restart` began a new warm-up and decay there. `continued_from`: an `extend` went on from
    (step, factor of the peak) there towards this shape's floor and decay end.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    decay_fraction: float = 0.9
    min_lr_ratio: float = 0.1
    kind: str = "linear"
    start_step: int = 0
    continued_from: tuple[int, float] | None = None

    def factor(self, step: int) -> float:
        """The learning rate after `step` optimizer steps, as a multiple of the peak."""
        if self.continued_from is not None and step >= self.continued_from[0]:
            return self._continued(step, *self.continued_from)
        return esm2_lr_factor(
            step - self.start_step,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps - self.start_step,
            decay_fraction=self.decay_fraction,
            min_lr_ratio=self.min_lr_ratio,
            kind=self.kind,
        )

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def decay_end(self) -> int:
        """The step where the decay reaches the floor."""
        span = int(self.decay_fraction * (self.total_steps - self.start_step))
        return self.start_step + max(span, self.warmup_steps)

    def _continued(self, step: int, since: int, factor: float) -> float:
        warmup_end, decay_end = self.start_step + self.warmup_steps, self.decay_end()
        if step < warmup_end:  # the warm-up was not over: reach the peak where the configured warm-up ends
            return factor + (1.0 - factor) * (step - since) / (warmup_end - since)
        if step >= decay_end:
            return self.min_lr_ratio
        begin, value = (since, factor) if since >= warmup_end else (warmup_end, 1.0)
        return _decayed(self.min_lr_ratio, value, (step - begin) / (decay_end - begin), self.kind)

    def shape(self) -> dict[str, Any]:
        """What the configuration sets (not how a resume went on from it)."""
        return {name: getattr(self, name) for name in CONFIG_KEYS}

    def changes_from(self, other: Schedule) -> str:
        """`num_train_steps 20 -> 30, optimizer.lr 0.001 -> 0.0005`: how this shape differs from `other`'s."""
        mine, theirs = self.shape(), other.shape()
        return ", ".join(f"{CONFIG_KEYS[k]} {theirs[k]} -> {mine[k]}" for k in CONFIG_KEYS if mine[k] != theirs[k])


class ScheduledLR(LambdaLR):
    """A `LambdaLR` following a `Schedule`, which its state dict carries (as plain values) for the next resume."""

    def __init__(self, optimizer: Optimizer, schedule: Schedule, on_resume_change: str = "extend") -> None:
        if on_resume_change not in RESUME_CHANGES:
            raise ValueError(f"on_resume_change={on_resume_change!r} must be one of {RESUME_CHANGES}.")
        self.schedule, self.on_resume_change = schedule, on_resume_change
        super().__init__(optimizer, lambda step: self.schedule.factor(step))

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in super().state_dict().items() if k not in ("schedule", "on_resume_change")}
        return state | {"schedule": dataclasses.asdict(self.schedule)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the step count; keep the checkpoint's schedule, or go on from it as `on_resume_change` says."""
        saved = state_dict.get("schedule")
        configured = self.schedule
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "schedule"})
        self.schedule = configured
        if saved is not None:
            saved["continued_from"] = tuple(saved["continued_from"]) if saved["continued_from"] else None
            self.schedule = self._after_resume(Schedule(**saved), configured, self.last_epoch)
        self.base_lrs = [self.schedule.peak_lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _after_resume(self, saved: Schedule, configured: Schedule, step: int) -> Schedule:
        if saved.shape() == configured.shape():
            return saved  # the same run going on, with any earlier continuation
        extended = dataclasses.replace(configured, continued_from=(step, saved.lr(step) / configured.peak_lr))
        restarted = dataclasses.replace(configured, start_step=step)
        chosen, other = (extended, restarted) if self.on_resume_change == "extend" else (restarted, extended)
        how = {
            "extend": f"goes on from there to the configured floor at step {configured.decay_end()}",
            "restart": f"starts a new warm-up and decay over steps {step + 1}-{configured.total_steps}",
        }
        other_name = RESUME_CHANGES[1 - RESUME_CHANGES.index(self.on_resume_change)]
        logger.warning(
            "The learning-rate schedule differs from the checkpoint's (%s). The next step's learning rate is %.4g "
            "(the checkpoint's schedule: %.4g): lr_scheduler.on_resume_change=%s %s; =%s would give %.4g.",
            configured.changes_from(saved),
            chosen.lr(step),
            saved.lr(step),
            self.on_resume_change,
            how[self.on_resume_change],
            other_name,
            other.lr(step),
        )
        return chosen


def build_esm2_scheduler(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_fraction: float = 0.9,
    min_lr_ratio: float = 0.1,
    kind: str = "linear",
    on_resume_change: str = "extend",
) -> ScheduledLR:
    """The schedule of `esm2_lr_factor` from the optimizer's learning rate (the peak), ready to checkpoint."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {SCHEDULE_KINDS}.")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} > 0.")
    if not 0.0 < decay_fraction <= 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"decay_fraction={decay_fraction} must be in (0, 1] and min_lr_ratio={min_lr_ratio} in [0, 1]."
        )
    peak = optimizer.param_groups[0]["lr"]
    schedule = Schedule(peak, warmup_steps, total_steps, decay_fraction, min_lr_ratio, kind)
    return ScheduledLR(optimizer, schedule, on_resume_change)
