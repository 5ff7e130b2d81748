"""The one gate a run's configuration passes, at start-up: every problem reported in one error a user can act on.

After it, code reads `cfg.x` directly: `hydra_config/defaults.yaml` defines every key (and documents it), and this
module checks every value, so nothing downstream needs a fallback default or a check of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig, OmegaConf

from activation_checkpointing import checkpoint_problems
from cli_help import KEYS_DOCUMENTED, unknown_key_problem
from dataset import SUPPORTED_FORMATS, resolve_path
from errors import RecipeError
from families import FAMILY_TOKENIZERS, max_positions, model_family
from model import MASTER_WEIGHTS_HOMES, USE_TE_CHOICES
from norm_kernel import NORM_KERNELS
from precision import plan_problems, precision_problems
from quant_stats import problems as quant_stats_problems
from rotary import ROPE_KERNELS
from scheduler import RESUME_CHANGES, SCHEDULE_KINDS

if TYPE_CHECKING:
    from model import ModelConfig

logger = logging.getLogger(__name__)

DEFAULTS_FILE = Path(__file__).resolve().parent / "hydra_config" / "defaults.yaml"
PRECISION_DIR = DEFAULTS_FILE.parent / "precision"
CHECKED_SECTIONS = (
    "activation_checkpointing",
    "dataset",
    "checkpoint",
    "fsdp",
    "mfsdp",
    "optimizer",
    "lr_scheduler",
    "validation",
    "logger",
    "quant_stats",
)
ZERO_DP_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a")  # TE's context-parallel exchanges (a2a+p2p needs two groups: not here)
REDUCE_DTYPES = ("float32", "bfloat16")


class StrategyRules(Protocol):
    """What validation needs to know of a parallelism strategy (`training.Strategy` has it)."""

    name: str
    needs_cuda: bool
    compiles: bool
    graphs: bool
    context_parallel: bool
    optimizer_master_weights: bool
    inert_keys: tuple[str, ...]


class ConfigError(RecipeError, ValueError):
    """One or more configuration values are unusable; the message lists each with its fix."""


@cache
def defaults() -> DictConfig:
    """`defaults.yaml` as written (not composed): every key and its default value."""
    return OmegaConf.load(DEFAULTS_FILE)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bool(value: Any) -> bool:
    return isinstance(value, bool)


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or ok(value)


def missing_keys(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    """Keys left at `???`: values a configuration requires the user to supply (e.g. the data of an L1 run)."""
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            yield path
        elif isinstance(cfg[key], DictConfig):
            yield from missing_keys(cfg[key], f"{path}.")


@cache
def precision_keys(section: str = "fp8_config") -> frozenset[str]:
    """The keys of `fp8_config` or `fp4_config`, which the precision presets (hydra_config/precision/) define."""
    return frozenset(OmegaConf.load(PRECISION_DIR / "bf16.yaml")[section])


def _unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys that defaults.yaml (or a precision preset) does not define, at the top level or in a checked section.

    A typo would otherwise do nothing: `key=...` is refused before Hydra (cli_help), `+key=...` here.
    """
    top = set(defaults()) - {"defaults"} | {"fp8_config", "fp4_config", "benchmark"}
    problems = [unknown_key_problem(key, top, KEYS_DOCUMENTED) for key in cfg if key not in top]
    sections = {section: set(defaults()[section]) for section in CHECKED_SECTIONS}
    sections |= {section: precision_keys(section) for section in ("fp8_config", "fp4_config")}
    for section, known in sections.items():
        listing = f"Known: {', '.join(sorted(known))}."
        problems += [
            unknown_key_problem(f"{section}.{key}", {f"{section}.{k}" for k in known}, listing)
            for key in cfg.get(section) or {}
            if key not in known
        ]
    return problems


# (key, test, what a valid value is). `None` is valid only where the test says so.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("num_train_steps", _positive_int, "must be a positive integer"),
    ("grad_acc_steps", _positive_int, "must be a positive integer"),
    ("pretrained", _bool, "must be true or false"),
    ("use_meta_device", _bool, "must be true or false"),
    ("use_torch_compile", _bool, "must be true or false"),
    ("use_sequence_packing", _bool, "must be true or false"),
    ("use_fp32_master_weights", _bool, "must be true or false"),
    ("master_weights", lambda v: v in MASTER_WEIGHTS_HOMES, f"must be one of {MASTER_WEIGHTS_HOMES}"),
    ("fp8_config.quantized_model_init", _bool, "must be true or false"),
    ("fp4_config.stochastic_rounding", _bool, "must be true or false"),
    ("fp4_config.random_hadamard", _bool, "must be true or false"),
    ("fp4_config.two_d_weight_quantization", _bool, "must be true or false"),
    ("fp32_residual_connection", _bool, "must be true or false"),
    ("rope_kernel", lambda v: v in ROPE_KERNELS, f"must be one of {ROPE_KERNELS}"),
    ("gelu_in_gemm", _bool, "must be true or false"),
    ("norm_kernel", lambda v: v in NORM_KERNELS, f"must be one of {NORM_KERNELS}"),
    ("static_shapes", _bool, "must be true or false"),
    ("cuda_graphs", _bool, "must be true or false"),
    ("cp_size", _positive_int, "must be a positive integer (1: no context parallelism)"),
    ("cp_comm_type", lambda v: v in CP_COMM_TYPES, f"must be one of {CP_COMM_TYPES}"),
    ("max_sequences_per_pack", _optional(_positive_int), "must be a positive integer, or null"),
    ("packing_lookahead", _positive_int, "must be a positive integer (1: pack sequences in order)"),
    ("seed", _non_negative_int, "must be a non-negative integer"),
    ("dataset.micro_batch_size", _positive_int, "must be a positive integer"),
    ("dataset.pad_to_multiple_of", _positive_int, "must be a positive integer"),
    ("dataset.pad_to_max_length", _bool, "must be true or false"),
    ("dataset.streaming", _bool, "must be true or false"),
    ("dataset.mlm_probability", lambda v: 0 < v < 1, "must lie strictly between 0 and 1"),
    ("dataset.crop", lambda v: v in ("random", "head"), "must be 'random' or 'head'"),
    ("dataset.format", lambda v: v in SUPPORTED_FORMATS, f"must be one of {SUPPORTED_FORMATS}"),
    ("dataset.path", lambda v: isinstance(v, str) and v.strip() != "", "must name a data file, folder or dataset"),
    ("dataset.sequence_column", lambda v: isinstance(v, str) and v != "", "must name a column"),
    ("dataset.hub_config", _optional(lambda v: isinstance(v, str)), "must be a hub configuration name, or null"),
    ("dataset.hub_split", lambda v: isinstance(v, str) and v != "", "must name a split (e.g. train)"),
    ("dataset.validation_path", _optional(lambda v: isinstance(v, str) and v != ""), "must name a file, or be null"),
    ("dataset.validation_size", lambda v: v >= 0, "must be >= 0 (a fraction below 1, or a count; 0 disables)"),
    ("dataset.num_workers", _non_negative_int, "must be a non-negative integer"),
    ("dataset.prefetch_factor", _positive_int, "must be a positive integer"),
    ("dataset.shuffle_buffer_size", _positive_int, "must be a positive integer"),
    ("optimizer.lr", lambda v: v > 0, "must be positive"),
    ("optimizer.weight_decay", lambda v: v >= 0, "must be >= 0"),
    ("optimizer.eps", lambda v: v > 0, "must be positive"),
    ("optimizer.max_grad_norm", lambda v: v > 0, "must be positive"),
    ("optimizer.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    ("lr_scheduler.kind", lambda v: v in SCHEDULE_KINDS, f"must be one of {SCHEDULE_KINDS}"),
    ("lr_scheduler.warmup_steps", _non_negative_int, "must be a non-negative integer"),
    ("lr_scheduler.decay_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("lr_scheduler.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("lr_scheduler.on_resume_change", lambda v: v in RESUME_CHANGES, f"must be one of {RESUME_CHANGES}"),
    ("fsdp.reshard_after_forward", _bool, "must be true or false"),
    ("mfsdp.zero_dp_strategy", lambda v: v in ZERO_DP_STRATEGIES, f"must be one of {ZERO_DP_STRATEGIES}"),
    ("mfsdp.overlap_grad_reduce", _bool, "must be true or false"),
    ("mfsdp.overlap_param_gather", _bool, "must be true or false"),
    ("mfsdp.grad_reduce_dtype", lambda v: v in REDUCE_DTYPES, f"must be one of {list(REDUCE_DTYPES)}"),
    ("checkpoint.ckpt_dir", _optional(lambda v: isinstance(v, str) and v != ""), "must be a folder, or null"),
    ("checkpoint.save_every_n_steps", _non_negative_int, "must be a non-negative integer (0: only at the end)"),
    (
        "checkpoint.resume_from_checkpoint",
        lambda v: isinstance(v, bool | str),
        "must be true, false or the path of a step_NNNNNNN folder",
    ),
    ("checkpoint.max_checkpoints", _optional(_positive_int), "must be a positive integer, or null to keep all"),
    ("checkpoint.async_save", _bool, "must be true or false"),
    ("checkpoint.save_final_model", _bool, "must be true or false"),
    ("checkpoint.exit_after_n_steps", _optional(_positive_int), "must be a positive integer, or null"),
    ("logger.log_every_n_steps", _positive_int, "must be a positive integer"),
    ("logger.progress_bar", _bool, "must be true or false"),
    ("logger.metrics_file", _optional(lambda v: isinstance(v, str) and v != ""), "must be a file path, or null"),
    ("logger.grad_norms_file", _optional(lambda v: isinstance(v, str) and v != ""), "must be a file path, or null"),
    ("validation.every_n_steps", _non_negative_int, "must be >= 0 (0 disables validation)"),
    ("validation.max_batches", _positive_int, "must be a positive integer"),
    ("use_te", lambda v: str(v).lower() in USE_TE_CHOICES, f"must be one of {USE_TE_CHOICES}"),
    ("wandb.enabled", _bool, "must be true or false"),
    ("wandb.mode", lambda v: v in ("online", "offline", "disabled"), "must be online, offline or disabled"),
    (
        "tokenizer",
        lambda v: (resolve_path(v) / "tokenizer_config.json").is_file(),
        "must be a tokenizer directory (shipped: tokenizers/esm2 for ESM-2, tokenizers/amplify for AMPLIFY)",
    ),
]


def _check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], expectation: str) -> str | None:
    value = OmegaConf.select(cfg, key, default=None)
    try:
        valid = bool(ok(value))
    except TypeError:  # e.g. a number compared with a string or None
        valid = False
    return None if valid else f"{key}={value!r}: {expectation}"


def _model_problems(cfg: DictConfig, model_config: ModelConfig) -> list[str]:
    problems = []
    num_layers, length = model_config.num_hidden_layers, cfg.dataset.max_seq_length
    if not (_positive_int(length) and length >= 3):
        problems.append(f"dataset.max_seq_length={length!r}: must be an integer of at least 3 (<cls>, residue, <eos>)")
    elif model_family(model_config) == "amplify":
        problems += _amplify_problems(cfg, model_config)
    elif length > (positions := max_positions(model_config)) and model_config.position_embedding_type != "rotary":
        problems.append(
            f"dataset.max_seq_length={length}: this model has {model_config.position_embedding_type!r} position "
            f"embeddings for {positions} positions and cannot see further; use at most {positions} "
            "(longer proteins are cropped to it), or a rotary model such as ESM-2"
        )
    problems += _tokenizer_problems(cfg, model_config)
    problems += plan_problems(cfg, num_layers)[1]
    problems += checkpoint_problems(cfg.activation_checkpointing, num_layers)[1]
    budget = cfg.token_micro_batch_size
    if budget is not None and not (_positive_int(budget) and _positive_int(length) and budget >= length):
        problems.append(
            f"token_micro_batch_size={budget!r}: must be a token count of at least dataset.max_seq_length (null: "
            "micro_batch_size x max_seq_length)"
        )
    return problems


def _amplify_problems(cfg: DictConfig, model_config: ModelConfig) -> list[str]:
    """What the AMPLIFY models cannot do that ESM-2's can, and AMPLIFY variants neither model implements."""
    from modeling_amplify import check_supported_config

    problems = []
    try:
        check_supported_config(model_config)
    except ValueError as error:
        problems.append(f"model_tag={cfg.model_tag!r}: {error}")
    length, trained = cfg.dataset.max_seq_length, max_positions(model_config)
    if length > trained:
        problems.append(
            f"dataset.max_seq_length={length}: above this AMPLIFY model's max_length ({trained}), the longest "
            f"sequence its checkpoints were trained on; use at most {trained} (longer proteins are cropped to it)"
        )
    if cfg.fp32_residual_connection is True:
        problems.append(
            "fp32_residual_connection=true is ESM-2 only: the TE AMPLIFY model has no FP32 residual stream (its "
            "bias-free layers do not go through the ESM layer's residual path); set fp32_residual_connection=false"
        )
    return problems


@cache
def tokenizer_ids(directory: str) -> tuple[int, int | None, int | None]:
    """(vocabulary size, pad id, mask id) of a tokenizer directory, loaded once per process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return len(tokenizer), tokenizer.pad_token_id, tokenizer.mask_token_id


def _tokenizer_problems(cfg: DictConfig, model_config: ModelConfig) -> list[str]:
    """A tokenizer whose vocabulary or special ids are not the model's (an ESM-2 tokenizer for AMPLIFY, or reverse)."""
    try:
        directory = resolve_path(cfg.tokenizer)
    except (TypeError, ValueError):
        return []  # RULES reports it
    if not (directory / "tokenizer_config.json").is_file():
        return []  # RULES reports it
    size, pad, mask = tokenizer_ids(str(directory))
    expected = {"vocabulary size": model_config.vocab_size, "pad id": model_config.pad_token_id}
    expected["mask id"] = getattr(model_config, "mask_token_id", None)
    found = {"vocabulary size": size, "pad id": pad, "mask id": mask}
    wrong = [f"{key} {found[key]} (the model's: {value})" for key, value in expected.items() if value != found[key]]
    if not wrong:
        return []
    family = model_family(model_config)
    return [
        f"tokenizer={cfg.tokenizer!r} does not fit model_tag={cfg.model_tag!r}: {', '.join(wrong)}; this is "
        f"{'an AMPLIFY' if family == 'amplify' else 'an ESM-2'} model, use tokenizer={FAMILY_TOKENIZERS[family]}"
    ]


def _strategy_problems(cfg: DictConfig, strategy: StrategyRules) -> list[str]:
    import torch

    problems = []
    entrypoint = f"train_{strategy.name}.py"
    if strategy.needs_cuda and not torch.cuda.is_available():
        problems.append(f"{entrypoint} needs CUDA GPUs; use train_fsdp2.py or train_ddp.py on CPU.")
    if cfg.activation_checkpointing.mode != "none" and (cfg.use_torch_compile or cfg.cuda_graphs):
        problems.append(
            "activation_checkpointing recomputes layers inside the backward pass, which "
            + ("use_torch_compile" if cfg.use_torch_compile else "cuda_graphs")
            + "=true does not support here; turn one of them off (checkpointing is what lets long sequences fit, "
            "graphs and compilation only make short ones faster)"
        )
    if cfg.use_torch_compile and not strategy.compiles:
        problems.append(
            f"use_torch_compile=true is not supported by {entrypoint}; set use_torch_compile=false, or compile with "
            "train_fsdp2.py or train_ddp.py."
        )
    return problems


def _static_shape_problems(cfg: DictConfig, use_te: bool, strategy: StrategyRules) -> list[str]:
    """Static packed shapes and CUDA graphs: what they need of the batches, the model and the strategy."""
    import torch

    problems = []
    for key in ("static_shapes", "cuda_graphs"):
        if cfg[key] is True and not cfg.use_sequence_packing:
            problems.append(
                f"{key}=true needs use_sequence_packing=true (packed THD batches of a fixed token count); padded "
                "batches vary in shape, or waste compute with dataset.pad_to_max_length=true"
            )
    if cfg.cuda_graphs is not True:
        return problems
    entrypoint = f"train_{strategy.name}.py"
    if not strategy.graphs:
        problems.append(
            f"cuda_graphs=true is not supported by {entrypoint} (a sharding strategy gathers each layer's weights "
            "into new memory every step, which a captured graph cannot follow); use train_ddp.py, on one GPU or "
            "many"
        )
    if not (use_te and torch.cuda.is_available()):
        problems.append("cuda_graphs=true needs the TransformerEngine model on a GPU (use_te=auto|true on a GPU host)")
    if cfg.use_torch_compile:
        problems.append("cuda_graphs=true and use_torch_compile=true exclude each other; pick one")
    if cfg.fp8_config.enabled and cfg.fp4_config.enabled:
        problems.append(
            "cuda_graphs=true captures the layers under one recipe, so a plan mixing FP8 and NVFP4 layers cannot be "
            "graphed: use one of the two formats (BF16 layers may stay), or cuda_graphs=false"
        )
    return problems


def _master_weights_problems(cfg: DictConfig, use_te: bool, strategy: StrategyRules) -> list[str]:
    """Master weights in the optimizer and FP8 primary weights: TE's FusedAdam, on a strategy that supports it."""
    import torch

    problems = []
    in_optimizer = cfg.master_weights == "optimizer"
    if in_optimizer and not cfg.use_fp32_master_weights:
        problems.append(
            "master_weights=optimizer keeps FP32 master weights, but use_fp32_master_weights=false asks for none; "
            "set use_fp32_master_weights=true, or master_weights=model"
        )
    if in_optimizer and not (use_te and torch.cuda.is_available()):
        problems.append(
            "master_weights=optimizer needs TransformerEngine's FusedAdam on a GPU (use_te=auto|true on a GPU host); "
            "use master_weights=model on CPU"
        )
    if in_optimizer and not strategy.optimizer_master_weights:
        problems.append(
            f"master_weights=optimizer is not supported by train_{strategy.name}.py (its sharded parameters carry "
            "their own FP32 copies); use train_ddp.py, or master_weights=model"
        )
    if cfg.fp8_config.quantized_model_init is True:
        if not cfg.fp8_config.enabled:
            problems.append("fp8_config.quantized_model_init=true needs FP8 on (e.g. precision=fp8_delayed)")
        if not in_optimizer:
            problems.append(
                "fp8_config.quantized_model_init=true keeps the layers' weights in FP8 only, so the FP32 copies the "
                "optimizer updates must live in the optimizer: add master_weights=optimizer"
            )
        if cfg.cuda_graphs is True:
            problems.append(
                "fp8_config.quantized_model_init=true and cuda_graphs=true exclude each other: a captured graph keeps "
                "the transposed FP8 weights of the capture step, which the optimizer makes stale; pick one"
            )
        if cfg.pretrained:
            problems.append(
                "fp8_config.quantized_model_init=true starts from a random initialisation; it cannot load "
                "pretrained weights yet (set pretrained=false, or quantized_model_init=false)"
            )
    return problems


def _context_parallel_problems(
    cfg: DictConfig, model_config: ModelConfig, use_te: bool, strategy: StrategyRules
) -> list[str]:
    """What `cp_size` > 1 needs: a grid of the job's ranks, packed batches, TE's attention, gradients over all ranks.

    The world size is torchrun's (WORLD_SIZE), read before the process group exists.
    """
    cp_size = cfg.cp_size
    if not (_positive_int(cp_size) and cp_size > 1):
        return []
    prefix, world = f"cp_size={cp_size}", int(os.environ.get("WORLD_SIZE", 1))
    problems = []
    if world % cp_size:
        problems.append(
            f"{prefix} does not divide this job's {world} rank(s) (WORLD_SIZE): the ranks form a data-parallel x "
            f"context-parallel grid; launch a multiple of {cp_size} processes (torchrun --nproc_per_node), or "
            "choose a cp_size that divides the number of GPUs"
        )
    if not cfg.use_sequence_packing:
        problems.append(
            f"{prefix} splits packed (THD) sequences between GPUs; padded BSHD batches cannot be split: set "
            "use_sequence_packing=true"
        )
    if not use_te:
        problems.append(
            f"{prefix} needs the TransformerEngine model, whose attention exchanges keys and values within a CP "
            "group; the reference transformers model has no such attention. Run on GPUs with TE (use_te=auto|true)"
        )
    if not strategy.context_parallel:
        problems.append(
            f"{prefix} is not supported by train_{strategy.name}.py (its gradients are reduced over data-parallel "
            "ranks only, so CP ranks would train on different gradients); use train_fsdp2.py or train_ddp.py"
        )
    varying_shape = "every sequence is padded to a multiple of 2 x cp_size, so a shard's shape varies"
    excluded = {
        "cuda_graphs": varying_shape,
        "static_shapes": varying_shape,
        "use_torch_compile": "TE's context-parallel attention is not verified under torch.compile",
    }
    for key, reason in excluded.items():
        if cfg[key] is True:
            problems.append(f"{key}=true and {prefix} exclude each other: {reason}; set {key}=false")
    heads = model_config.num_attention_heads
    if cfg.cp_comm_type == "a2a" and heads % cp_size:
        problems.append(
            f"cp_comm_type=a2a scatters the attention heads over the CP group: {heads} heads do not divide by "
            f"{prefix}; use cp_comm_type=p2p or a cp_size that divides {heads}"
        )
    return problems


def validate_config(cfg: DictConfig, model_config: ModelConfig, use_te: bool, strategy: StrategyRules) -> None:
    """Raise `ConfigError` naming every unusable value (and its fix) before any data or model is built."""
    missing = list(missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"This configuration needs {', '.join(missing)} (`???` in the config), which nothing set. Give "
            f"{'each' if len(missing) > 1 else 'it'} on the command line, e.g. "
            + " ".join(f"{key}=..." for key in missing)
            + (
                " (dataset.path: your training data, a FASTA/Parquet/CSV/JSON file, folder or glob)."
                if "dataset.path" in missing
                else "."
            )
        )
    problems = [p for key, ok, expectation in RULES if (p := _check(cfg, key, ok, expectation))]
    problems += _unknown_keys(cfg)
    problems += _model_problems(cfg, model_config)
    problems += precision_problems(cfg, use_te)
    problems += _strategy_problems(cfg, strategy)
    problems += _static_shape_problems(cfg, use_te, strategy)
    problems += _master_weights_problems(cfg, use_te, strategy)
    problems += _context_parallel_problems(cfg, model_config, use_te, strategy)
    problems += quant_stats_problems(cfg, model_config.num_hidden_layers, use_te)
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def log_inert_keys(cfg: DictConfig, strategy: StrategyRules) -> None:
    """Say once which settings changed from their defaults do nothing with this strategy (e.g. DDP's meta device)."""
    changed = []
    for key in strategy.inert_keys:
        value, default = OmegaConf.select(cfg, key), OmegaConf.select(defaults(), key)
        if value != default:
            changed.append(key if not isinstance(value, DictConfig) else f"{key}.*")
    if changed:
        logger.warning("These settings have no effect with train_%s.py: %s.", strategy.name, ", ".join(changed))
