"""Check a run's configuration once, at start-up, and report every problem in one error a user can act on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import EsmConfig

from dataset import SUPPORTED_FORMATS, resolve_path
from model import USE_TE_CHOICES
from precision import precision_problems


class ConfigError(ValueError):
    """One or more configuration values are unusable; the message lists each with its fix."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check(problems: list[str], cfg: DictConfig, key: str, ok: Callable[[Any], bool], expectation: str) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    try:
        valid = value is not None and ok(value)
    except TypeError:
        valid = False
    if not valid:
        problems.append(f"{key}={value!r}: {expectation}")


def validate_config(cfg: DictConfig, model_config: EsmConfig, use_te: bool) -> None:
    """Raise `ConfigError` naming every unusable value (and its fix) before any data or model is built."""
    problems: list[str] = []
    check = lambda key, ok, expectation: _check(problems, cfg, key, ok, expectation)  # noqa: E731

    check("num_train_steps", _positive_int, "must be a positive integer")
    check("grad_acc_steps", _positive_int, "must be a positive integer")
    check("dataset.micro_batch_size", _positive_int, "must be a positive integer")
    check("dataset.pad_to_multiple_of", _positive_int, "must be a positive integer")
    max_positions = model_config.max_position_embeddings
    check(
        "dataset.max_seq_length",
        lambda v: _positive_int(v) and 3 <= v <= max_positions,
        f"must be an integer from 3 to the model's max_position_embeddings ({max_positions}); longer sequences are "
        "cropped to it",
    )
    check("dataset.mlm_probability", lambda v: 0 < v < 1, "must lie strictly between 0 and 1")
    check("dataset.crop", lambda v: v in ("random", "head"), "must be 'random' or 'head'")
    check("dataset.format", lambda v: v in SUPPORTED_FORMATS, f"must be one of {SUPPORTED_FORMATS}")
    check("dataset.path", lambda v: isinstance(v, str) and v.strip() != "", "must name a data file, folder or dataset")
    check("dataset.validation_size", lambda v: v >= 0, "must be >= 0 (a fraction below 1, or a count; 0 disables)")
    check("dataset.num_workers", lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer")
    check("dataset.prefetch_factor", _positive_int, "must be a positive integer")
    check("dataset.shuffle_buffer_size", _positive_int, "must be a positive integer")
    check("optimizer.lr", lambda v: v > 0, "must be positive")
    check("optimizer.weight_decay", lambda v: v >= 0, "must be >= 0")
    check("optimizer.eps", lambda v: v > 0, "must be positive")
    check("optimizer.max_grad_norm", lambda v: v > 0, "must be positive")
    check("optimizer.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")
    check("lr_scheduler.warmup_steps", lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer")
    check("lr_scheduler.decay_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]")
    check("lr_scheduler.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    check("logger.log_every_n_steps", _positive_int, "must be a positive integer")
    check("validation.every_n_steps", lambda v: isinstance(v, int) and v >= 0, "must be >= 0 (0 disables validation)")
    check("validation.max_batches", _positive_int, "must be a positive integer")
    if "fp32_residual_connection" in cfg:
        check("fp32_residual_connection", lambda v: isinstance(v, bool), "must be true or false")
    check("use_te", lambda v: str(v).lower() in USE_TE_CHOICES, f"must be one of {USE_TE_CHOICES}")
    check("wandb.mode", lambda v: v in ("online", "offline", "disabled"), "must be online, offline or disabled")
    check(
        "tokenizer",
        lambda v: (resolve_path(v) / "tokenizer_config.json").is_file(),
        "must be a tokenizer directory (the shipped one is tokenizers/esm2)",
    )
    num_layers = model_config.num_hidden_layers
    if cfg.get("fp8_layers") is not None:
        check(
            "fp8_layers",
            lambda v: all(isinstance(n, int) and 1 <= n <= num_layers for n in v),
            f"must list 1-based layer numbers from 1 to {num_layers} (or be null for every layer)",
        )
    if cfg.get("token_micro_batch_size") is not None:
        check(
            "token_micro_batch_size",
            lambda v: _positive_int(v) and v >= cfg.dataset.max_seq_length,
            "must be a token count of at least dataset.max_seq_length (null: micro_batch_size x max_seq_length)",
        )
    problems.extend(precision_problems(cfg, use_te))
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
