"""Training metrics: a progress bar on rank 0, a log line per log step, and Weights & Biases when enabled.

Per-step values stay on the device and are summed there; the host reads them (one sync) only at log steps, so the
training loop never waits for the GPU in between.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
import warnings
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from distributed import DistributedContext, all_reduce_sum, world_size
from errors import RecipeError


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


class RankPrefix(logging.Filter):
    """Begin every log line of a non-zero rank with its rank, so interleaved batch logs say who wrote what."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = f"{self.prefix}{record.msg}"
        return True


def configure_process_logs(rank: int) -> None:
    """Logs that read well in a batch system's output file, on every rank.

    Python warnings go through logging (one format, and the rank prefix); no progress bars but on a terminal; ranks
    other than 0 report warnings and errors only, each line naming its rank.
    """
    logging.captureWarnings(True)
    # TransformerEngine's import-time notes about its other frameworks and torch.compile paths concern its own build,
    # not this run (e.g. a JAX install beside it); its real warnings still come through.
    warnings.filterwarnings("ignore", message="Detected a Jax installation", category=RuntimeWarning)
    logging.getLogger("TransformerEngine").setLevel(logging.WARNING)
    if not sys.stderr.isatty():  # `datasets` progress bars would write carriage-return frames into the log file
        import datasets

        datasets.disable_progress_bars()
    if rank == 0:
        return
    logging.getLogger().setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RankPrefix) for f in handler.filters):
            handler.addFilter(RankPrefix(rank))


class NonFiniteTrainingError(RecipeError, RuntimeError):
    """The loss or gradient norm became NaN or infinite: training diverged, and going on would only spread it."""


class PerfLogger:
    """Collects per-step training metrics and reports window averages every `log_every_n_steps` steps."""

    def __init__(self, cfg: Any, context: DistributedContext, start_step: int = 0) -> None:
        self.context = context
        self.log_every = int(cfg.logger.log_every_n_steps)
        self.total_steps = int(cfg.num_train_steps)
        self.last_metrics: dict[str, float] = {}
        self.total_tokens = 0  # real tokens this rank trained on in this job
        self._reset_window(time.perf_counter())
        self._progress = tqdm(
            total=self.total_steps,
            initial=start_step,
            desc="train",
            dynamic_ncols=True,
            # a bar only on a terminal: in a batch system's log file its frames would be one endless line
            disable=not (context.is_main and cfg.logger.progress_bar and sys.stderr.isatty()),
            file=sys.stderr,
        )
        self._metrics_file = cfg.logger.metrics_file if context.is_main else None
        self._wandb = None
        if cfg.wandb.enabled and context.is_main:
            import wandb  # imported only when enabled: wandb is heavy and may want network access

            self._wandb = wandb.init(
                project=cfg.wandb.project,
                name=cfg.wandb.name,
                mode=cfg.wandb.mode,
                dir=cfg.wandb.dir,
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def _reset_window(self, now: float) -> None:
        self._window_start = now
        self._steps = 0
        self._loss_sum: torch.Tensor | None = None
        self._non_finite: torch.Tensor | None = None  # on-device count of steps whose loss or grad norm was not finite
        self._tokens = 0
        self._padded_tokens = 0

    def log_step(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, tokens: int, padded_tokens: int
    ) -> dict[str, float] | None:
        """Record one optimizer step (loss and grad norm as device tensors); returns the metrics at log steps."""
        loss = loss.detach()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm.detach())).float()  # device ops: no host sync
        self._non_finite = bad if self._non_finite is None else self._non_finite + bad
        self._steps += 1
        self._tokens += tokens
        self._padded_tokens += padded_tokens
        self.total_tokens += tokens
        self._progress.update(1)
        if not self.is_log_step(step):
            return None

        window = reduce_mean(torch.stack([self._loss_sum / self._steps, self._non_finite]).float())
        mean_loss, non_finite = window.tolist()  # the one host-device sync of the window
        if non_finite > 0 or not math.isfinite(mean_loss):
            raise NonFiniteTrainingError(
                f"Training diverged: the loss or gradient norm became NaN or infinite between steps "
                f"{step - self._steps + 1} and {step} (read at step {step}, a log step). Stopped before saving: "
                "checkpoints are never written with non-finite weights, so the newest one in checkpoint.ckpt_dir "
                "predates the divergence. Resume from it with a lower optimizer.lr or optimizer.max_grad_norm."
            )
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        metrics = {
            "train/loss": mean_loss,
            "train/perplexity": math.exp(min(mean_loss, 50.0)),
            "train/grad_norm": float(grad_norm),
            "train/lr": lr,
            "train/step_time_s": elapsed / self._steps,
            "train/tokens_per_s_per_gpu": self._tokens / elapsed,
            "train/padded_tokens_per_s_per_gpu": self._padded_tokens / elapsed,
            "train/padding_fraction": 1.0 - self._tokens / max(self._padded_tokens, 1),
            "train/peak_memory_gib": peak_memory_gib(self.context.device),
        }
        self.last_metrics = metrics
        self._report(step, metrics)
        self._progress.set_postfix(
            loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['train/tokens_per_s_per_gpu']:.0f}"
        )
        self._reset_window(time.perf_counter())
        return metrics

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics too many for the log line (per-layer statistics): to the metrics file and W&B only (rank 0)."""
        if not self.context.is_main:
            return
        if self._metrics_file:
            with open(self._metrics_file, "a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        self.last_metrics.update(metrics)
        self._report(step, metrics)

    def _report(self, step: int, metrics: dict[str, float]) -> None:
        if not self.context.is_main:
            return
        text = " ".join(f"{name}={value:.4g}" for name, value in metrics.items())
        self._progress.write(f"step {step}: {text}", file=sys.stderr)
        self.record(step, metrics)

    def close(self) -> None:
        self._progress.close()
        if self._wandb is not None:
            # called from the loop's `finally`: a run that stops on an exception (divergence, a crash) must show as
            # failed in W&B, not finished; wandb's own exit hook comes too late, the run is finished by then
            self._wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)


def reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (at log steps only, off the per-step hot path)."""
    return all_reduce_sum(values.clone()) / world_size()
