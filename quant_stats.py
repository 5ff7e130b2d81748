"""Per-layer quantisation statistics of FP8/NVFP4 runs through nvdlfw-inspect (the `quant_stats` config section).

For the chosen transformer layers and GEMM modules (qkv, proj, fc1, fc2) TransformerEngine's debug features measure,
every `every_n_steps` steps, how the GEMM inputs (activation, weight, gradient) fare when quantised: the % of
non-zero values that underflow to zero, the range of the dequantisation scales (scale_inv min/max) and the
quantisation MSE. The numbers land in the run's metrics file and W&B as flat keys
(`quant/layer_05/fc1/gradient/underflows_pct`), and a warning in the log names tensors whose underflow passes
`underflow_warn_pct`. `health_report.py` draws them.

How the pieces meet (TE 2.x, nvdlfw-inspect 0.2; the paths are TE's):

* `nvdlfw_inspect.api.initialize` must run before the first TE module is built: each TE module asks
  `TEDebugState.initialize()` at construction whether debugging is on, and refuses (RuntimeError) to mix modules
  built before and after (transformer_engine/debug/pytorch/debug_state.py). `start` is called before the model.
* TE's debug layer names are each module's `.name`, read at forward time: a LayerNormLinear/Linear uses it as is, a
  LayerNormMLP appends `.fc1`/`.fc2` (pytorch/module/layernorm_mlp.py, `_get_debug_quantizers`). `name_layers` sets
  `layers.<n>.qkv`, `layers.<n>.proj` and `layers.<n>.mlp` on every layer after the model is built, so TE's
  `.fc1`/`.fc2` give `layers.<n>.mlp.fc1`; the config selects them with one anchored regex per precision
  (`exact_layer_names` is not used: nvdlfw-inspect raises for every layer *not* in that list).
* `LogFp8TensorStats` (FP8 layers) and `LogNvfp4TensorStats` (NVFP4 layers) take per-tensor stats and a `freq`;
  they fill device-side buffers during forward and backward, and `debug_api.step()` reduces them over the ranks and
  hands each value to nvdlfw-inspect's `MetricLogger.log_scalar(f"{layer}_{tensor}_{stat}", value, iteration)`
  (debug/features/utils/stats_buffer.py).

Getting the numbers: nvdlfw-inspect's default statistics logger formats every value into a text file with four
decimals (scale_inv of 1e-5 reads 0.0000) and reads each value from the GPU on its own. This module instead passes
its own `statistics_logger` (a `BaseLogger`): it keeps the values as they come (0-d device tensors), and at log steps
reads all of them in one transfer, turns the names into metric keys and gives them to `PerfLogger.record` (metrics
file and W&B; the log line stays short). Nothing is parsed back from text, and no precision is lost. Host-device
syncs: none on steps without statistics; on statistics steps TE's own buffer bookkeeping reads a flag per tensor
(its code, not ours); at log steps one transfer of the values collected since the last log step.

The iteration nvdlfw-inspect counts is set so that the forward and backward of optimizer step `s` (1-based, as
logged) run at iteration `s`: statistics are taken at steps that are multiples of `every_n_steps` and carry that
step. With `every_n_steps=1`, validation batches run at the next step's iteration and count into its activation and
weight statistics.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from errors import RecipeError
from precision import PrecisionPlan, layer_ranges, parse_layers, plan_problems

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install nvdlfw-inspect"
# our GEMM module name -> the suffix of its TE debug layer name (LayerNormMLP's fc1/fc2 come from TE itself)
GEMMS: dict[str, str] = {"qkv": "qkv", "proj": "proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TENSORS = ("activation", "weight", "gradient")  # TE's names: the GEMM inputs (activation: fprop, wgrad; ...)
# our statistic name -> TE's (LogFp8TensorStats; the current recipe's, no recipe prefix)
STATS: dict[str, str] = {
    "underflows_pct": "underflows%",
    "scale_inv_min": "scale_inv_min",
    "scale_inv_max": "scale_inv_max",
    "mse": "mse",
    "overflows_pct": "overflows%",
}
FP4_STATS = ("underflows_pct", "mse")  # all LogNvfp4TensorStats computes (TE 2.20)
SCALE_STATS = ("scale_inv_min", "scale_inv_max")  # all TE can tell of FP8 primary weights (no high-precision copy)
DELAYED_ONLY = ("overflows_pct",)
FEATURES = {"fp8": "LogFp8TensorStats", "fp4": "LogNvfp4TensorStats"}
RECIPE_PREFIXES = ("fp8_delayed_scaling_", "fp8_current_scaling_", "fp8_block_scaling_", "mxfp8_", "nvfp4_")
METRIC_PREFIX = "quant/"
_TE_NAME = re.compile(
    r"^layers\.(?P<layer>\d+)\.(?P<gemm>qkv|proj|mlp\.fc1|mlp\.fc2)_(?P<tensor>activation|weight|gradient)_(?P<stat>.+)$"
)
_METRIC_KEY = re.compile(r"^quant/layer_(?P<layer>\d+)/(?P<gemm>\w+)/(?P<tensor>\w+)/(?P<stat>\w+)$")
# a line of nvdlfw-inspect's default statistics log (nvdlfw_inspect/logging.py, FileLogger.log_scalar)
_INSPECT_LOG_LINE = re.compile(r"^.+? - \w+ - (?P<name>\S+)\s+iteration=(?P<iteration>\d+)\s+value=(?P<value>\S+)\s*$")


class QuantStatsError(RecipeError, RuntimeError):
    """Statistics cannot be collected as configured in this environment; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------
# configuration


def _as_list(value: Any) -> list[Any] | None:
    """A list as users write one: a list, or a comma-separated string; None for anything else."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple | ListConfig):
        return list(value)
    return None


def _choice_problems(key: str, value: Any, known: Sequence[str]) -> list[str]:
    names = _as_list(value)
    listed = ", ".join(known)
    if not names:
        return [f"quant_stats.{key}={value!r}: must list at least one of {listed}"]
    problems = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]}?" if close else ""
            problems.append(f"quant_stats.{key}: {name!r} is not one of {listed}.{hint}")
    if len(set(map(str, names))) < len(names):
        problems.append(f"quant_stats.{key}={value!r}: lists an entry more than once")
    return problems


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def selected_layers(cfg: Any, plan: PrecisionPlan) -> dict[int, str]:
    """The layers to measure and what each runs in ("fp8" or "fp4"): `quant_stats.layers`, or every quantised one."""
    listed, _ = parse_layers(cfg.quant_stats.layers, "quant_stats.layers", len(plan.layers))
    numbers = listed if listed is not None else range(1, len(plan.layers) + 1)
    return {n: plan.layers[n - 1] for n in numbers if plan.layers[n - 1] != "bf16"}


def tensor_stats(cfg: Any, precision: str, tensor: str) -> list[str]:
    """Our statistic names TE can compute for this tensor of a layer in `precision` (others are left out)."""
    stats = list(_as_list(cfg.quant_stats.stats) or ())
    if precision == "fp4":
        return [s for s in stats if s in FP4_STATS]
    if tensor == "weight" and cfg.fp8_config.quantized_model_init:
        return [s for s in stats if s in SCALE_STATS]
    return stats


def layer_regex(layers: Iterable[int], gemms: Iterable[str]) -> str:
    """The anchored pattern selecting these layers' GEMM modules by their TE debug names (see `name_layers`)."""
    numbers = "|".join(str(n) for n in sorted(layers))
    modules = "|".join(re.escape(GEMMS[g]) for g in gemms)
    return rf"^layers\.({numbers})\.({modules})$"


def inspect_config(cfg: Any, plan: PrecisionPlan) -> dict[str, Any]:
    """nvdlfw-inspect's config (what its YAML file holds): one section per precision among the selected layers."""
    section = cfg.quant_stats
    gemms = list(_as_list(section.gemms) or ())
    layers = selected_layers(cfg, plan)
    config: dict[str, Any] = {}
    for precision, feature in FEATURES.items():
        numbers = [n for n, p in layers.items() if p == precision]
        structs = [
            {"tensor": tensor, "stats": [STATS[s] for s in stats], "freq": int(section.every_n_steps)}
            for tensor in _as_list(section.tensors) or ()
            if (stats := tensor_stats(cfg, precision, tensor))
        ]
        if numbers and structs:
            config[f"esm2_quant_stats_{precision}"] = {
                "enabled": True,
                "layers": {"layer_name_regex_pattern": layer_regex(numbers, gemms)},
                "transformer_engine": {feature: {"enabled": True, "tensors_struct": structs}},
            }
    return config


def inspect_installed() -> bool:
    return importlib.util.find_spec("nvdlfw_inspect") is not None


def problems(cfg: Any, num_layers: int, use_te: bool) -> list[str]:
    """Everything wrong with the `quant_stats` section for this run (empty when fine); config_validation calls it."""
    section = cfg.quant_stats
    found: list[str] = []
    if not isinstance(section.enabled, bool):
        found.append(f"quant_stats.enabled={section.enabled!r}: must be true or false")
    if not _is_positive_int(section.every_n_steps):
        found.append(
            f"quant_stats.every_n_steps={section.every_n_steps!r}: must be a positive integer (statistics are taken "
            "at the steps that are multiples of it)"
        )
    threshold = section.underflow_warn_pct
    if threshold is not None and not (
        isinstance(threshold, int | float) and not isinstance(threshold, bool) and 0 <= threshold <= 100
    ):
        found.append(f"quant_stats.underflow_warn_pct={threshold!r}: must be a percentage from 0 to 100, or null")
    if section.log_dir is not None and not (isinstance(section.log_dir, str) and section.log_dir.strip()):
        found.append(f"quant_stats.log_dir={section.log_dir!r}: must be a folder, or null")
    found += _choice_problems("gemms", section.gemms, list(GEMMS))
    found += _choice_problems("tensors", section.tensors, TENSORS)
    found += _choice_problems("stats", section.stats, list(STATS))
    listed, layer_problems = parse_layers(section.layers, "quant_stats.layers", num_layers)
    found += layer_problems
    if section.enabled is not True:
        return found
    found += _environment_problems(cfg, use_te)
    plan, plan_errors = plan_problems(cfg, num_layers)
    if plan is None or plan_errors or layer_problems or not (cfg.fp8_config.enabled or cfg.fp4_config.enabled):
        return found  # the plan's own problems are reported by precision.py
    quantised = [n for n, p in enumerate(plan.layers, start=1) if p != "bf16"]
    if bf16 := sorted(set(listed or ()) - set(quantised)):
        found.append(
            f"quant_stats.layers={section.layers!r}: layers {layer_ranges(bf16)} run in BF16 under the precision plan "
            f"({plan.describe()}), so nothing is quantised there to measure; choose among layers "
            f"{layer_ranges(quantised)}"
        )
    stats = set(_as_list(section.stats) or ())
    if stats & set(DELAYED_ONLY) and not (cfg.fp8_config.enabled and cfg.fp8_config.recipe == "DelayedScaling"):
        found.append(
            "quant_stats.stats: overflows_pct is only measured under FP8 delayed scaling (precision=fp8_delayed); "
            "the other recipes scale from the current amax and do not overflow. Drop it from quant_stats.stats"
        )
    if not found and not inspect_config(cfg, plan):
        found.append(
            f"quant_stats selects no statistic TE can compute: NVFP4 layers give only {', '.join(FP4_STATS)}, and FP8 "
            f"primary weights (fp8_config.quantized_model_init) only {', '.join(SCALE_STATS)}; add one to "
            "quant_stats.stats or quant_stats.tensors"
        )
    return found


def _environment_problems(cfg: Any, use_te: bool) -> list[str]:
    """What `quant_stats.enabled=true` needs besides its own keys: a quantised TE run, eager, and nvdlfw-inspect."""
    found = []
    if not inspect_installed():
        found.append(
            "quant_stats.enabled=true needs nvdlfw-inspect (NVIDIA's numerics inspection tool, an optional "
            f"dependency), which is not installed here: {INSTALL_HINT}"
        )
    if not use_te:
        found.append(
            "quant_stats.enabled=true needs the TransformerEngine model (nvdlfw-inspect hooks into TE's GEMMs; the "
            "reference transformers model has no quantised GEMMs): use_te=auto|true on a GPU host with TE"
        )
    if not (cfg.fp8_config.enabled or cfg.fp4_config.enabled):
        found.append(
            "quant_stats.enabled=true measures FP8/NVFP4 quantisation, but this run is BF16 (fp8_config and "
            "fp4_config are off): pick a quantised precision, e.g. precision=fp8_current, or quant_stats.enabled=false"
        )
    if cfg.cuda_graphs is True:
        found.append(
            "quant_stats.enabled=true and cuda_graphs=true exclude each other: TE's statistics hooks run in Python "
            "at each GEMM, which a replayed graph skips; set cuda_graphs=false for a run with statistics"
        )
    if cfg.use_torch_compile is True:
        found.append(
            "quant_stats.enabled=true and use_torch_compile=true exclude each other (TE's statistics hooks decide "
            "per step in Python what to measure); set use_torch_compile=false for a run with statistics"
        )
    return found


# ---------------------------------------------------------------------------------------------------------------
# names and metrics


def name_layers(model: Any) -> int:
    """Name every transformer layer's TE GEMM modules as the inspect config selects them; returns the layer count.

    Call on the plain model (not a DDP wrapper) before its first forward: TE reads `.name` when it builds a step's
    debug quantizers. Layers are numbered from 1 in model order, as the precision plan numbers them.
    """
    from model import transformer_layers

    layers = transformer_layers(model)
    for number, layer in enumerate(layers, start=1):
        attention = layer.self_attention
        qkv = attention.layernorm_qkv if hasattr(attention, "layernorm_qkv") else attention.qkv
        qkv.name = f"layers.{number}.qkv"
        attention.proj.name = f"layers.{number}.proj"
        layer.layernorm_mlp.name = f"layers.{number}.mlp"  # TE appends .fc1 and .fc2
    return len(layers)


def metric_key(te_name: str) -> str:
    """`layers.5.mlp.fc1_activation_underflows%` → `quant/layer_05/fc1/activation/underflows_pct`.

    A recipe prefix TE may put in the statistic's name (`nvfp4_mse`) is dropped; names of other layers keep their
    text under `quant/other/` so that nothing TE logs is lost.
    """
    match = _TE_NAME.match(te_name)
    if match is None:
        return METRIC_PREFIX + "other/" + re.sub(r"[^\w.]+", "_", te_name.replace("%", "_pct")).strip("_")
    stat = match["stat"]
    for prefix in RECIPE_PREFIXES:
        stat = stat.removeprefix(prefix)
    stat = stat.replace("%", "_pct")
    gemm = match["gemm"].removeprefix("mlp.")
    return f"{METRIC_PREFIX}layer_{int(match['layer']):02d}/{gemm}/{match['tensor']}/{stat}"


def parse_metric_key(key: str) -> tuple[int, str, str, str] | None:
    """(layer, gemm, tensor, stat) of a `quant/layer_NN/...` key; None for any other key."""
    match = _METRIC_KEY.match(key)
    if match is None:
        return None
    return int(match["layer"]), match["gemm"], match["tensor"], match["stat"]


def read_inspect_log(path: Path) -> list[tuple[int, str, float]]:
    """(iteration, name, value) of each line of nvdlfw-inspect's default statistics log file.

    That file (`<log_dir>/nvdlfw_inspect_statistics_logs/nvdlfw_inspect_globalrank-<r>.log`) is what runs write
    without this module's logger; its values have four decimals only. Lines of other kinds are skipped.
    """
    found = []
    for line in Path(path).read_text().splitlines():
        if match := _INSPECT_LOG_LINE.match(line):
            found.append((int(match["iteration"]), match["name"], float(match["value"])))
    return found


def _host_floats(values: Sequence[Any]) -> list[float]:
    """Python floats of numbers and 0-d tensors: one device-to-host transfer per device holding any."""
    import torch

    out = [math.nan] * len(values)
    by_device: dict[Any, list[int]] = {}
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(index)
        else:
            out[index] = float(value)
    for indices in by_device.values():
        stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in indices])
        for index, value in zip(indices, stacked.tolist(), strict=True):
            out[index] = value
    return out


class StatsCollector:
    """Receives nvdlfw-inspect's statistics as they are logged and hands them over as metrics at log steps.

    `keep=False` (ranks other than 0, whose metrics nobody writes) drops them at once: no transfer there either.
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self._pending: list[tuple[int, str, Any]] = []

    def log_scalar(self, name: str, value: Any, iteration: int, **kwargs: Any) -> None:
        """nvdlfw-inspect's `BaseLogger.log_scalar`: keep the value as it is (a device tensor: no sync)."""
        if self.keep:
            self._pending.append((int(iteration), name, value))

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """The statistics collected since the last call, as (step, {metric key: value}) in step order."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        values = _host_floats([value for _, _, value in pending])
        by_step: dict[int, dict[str, float]] = {}
        for (iteration, name, _), value in zip(pending, values, strict=True):
            by_step.setdefault(iteration, {})[metric_key(name)] = value
        return sorted(by_step.items())


def underflow_warning(records: Sequence[tuple[int, dict[str, float]]], threshold: float, most: int = 8) -> str | None:
    """One log line naming every tensor whose underflow % passed `threshold` in these records (worst first)."""
    worst: dict[tuple[int, str, str], tuple[float, int]] = {}
    for step, metrics in records:
        for key, value in metrics.items():
            parsed = parse_metric_key(key)
            if parsed is None or parsed[3] != "underflows_pct" or not value > threshold:
                continue
            where = parsed[:3]
            if where not in worst or value > worst[where][0]:
                worst[where] = (value, step)
    if not worst:
        return None
    ranked = sorted(worst.items(), key=lambda item: -item[1][0])
    listed = ", ".join(
        f"layer {layer} {gemm} {tensor} {value:.3g}% (step {step})"
        for (layer, gemm, tensor), (value, step) in ranked[:most]
    )
    if len(ranked) > most:
        listed += f" and {len(ranked) - most} more"
    steps = [step for step, _ in records]
    return (
        f"Quantisation underflow above quant_stats.underflow_warn_pct={threshold:g}% in {len(ranked)} tensor(s), "
        f"steps {min(steps)}–{max(steps)}: {listed}. Values lost to zero bias the GEMMs; a layer that keeps "
        "underflowing can run in BF16 (leave it out of fp8_layers/fp4_layers) or under another recipe."
    )


# ---------------------------------------------------------------------------------------------------------------
# the session


def resolve_log_dir(cfg: Any) -> Path:
    """`quant_stats.log_dir`, else `<metrics file without suffix>_quant_stats`, else ./quant_stats."""
    if cfg.quant_stats.log_dir:
        return Path(cfg.quant_stats.log_dir)
    if cfg.logger.metrics_file:
        metrics = Path(cfg.logger.metrics_file)
        return metrics.with_name(f"{metrics.stem}_quant_stats")
    return Path("quant_stats")


def te_features_dir(need_fp4: bool) -> Path:
    """TE's nvdlfw-inspect feature folder; refuses when NVFP4 layers are to be measured and TE has no NVFP4 stats."""
    import transformer_engine

    features = Path(transformer_engine.__file__).resolve().parent / "debug" / "features"
    if not (features / "log_fp8_tensor_stats.py").is_file():
        raise QuantStatsError(
            f"This TransformerEngine ({getattr(transformer_engine, '__version__', '?')}) has no nvdlfw-inspect "
            f"features in {features}: quant_stats needs TE 2.x with transformer_engine/debug (e.g. TE 2.20)."
        )
    if need_fp4 and not (features / "log_nvfp4_tensor_stats.py").is_file():
        raise QuantStatsError(
            f"quant_stats selects NVFP4 layers, but this TransformerEngine "
            f"({getattr(transformer_engine, '__version__', '?')}) has no NVFP4 statistics (LogNvfp4TensorStats, "
            "transformer_engine/debug/features/log_nvfp4_tensor_stats.py; TE 2.20 has it). Upgrade TE, or limit "
            "quant_stats.layers to the FP8 layers."
        )
    return features


def write_inspect_config(config: dict[str, Any], log_dir: Path, rank: int) -> Path:
    """The YAML nvdlfw-inspect reads, in `log_dir`; every rank writes the same text and renames it into place."""
    import yaml

    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "nvdlfw_inspect_config.yaml"
    partial = log_dir / f".{path.name}.rank{rank}"
    partial.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(partial, path)  # atomic: ranks on a shared file system never see half a file
    return path


class QuantStats:
    """The run's nvdlfw-inspect session: per-step hook, metrics at log steps, the underflow warning."""

    def __init__(self, collector: StatsCollector, every: int, threshold: float | None, is_main: bool) -> None:
        self.collector, self.every, self.threshold, self.is_main = collector, every, threshold, is_main

    def begin(self, start_step: int) -> None:
        """Before the loop: the next step's forward runs at iteration `start_step + 1` (see the module docstring)."""
        import nvdlfw_inspect.api as debug_api

        debug_api.initialize_training_step(start_step + 1)

    def after_step(self, step: int, perf: Any) -> None:
        """After each optimizer step: TE reduces and logs what it measured; at log steps it goes to the metrics."""
        import nvdlfw_inspect.api as debug_api

        debug_api.step()
        if perf.is_log_step(step):
            self.flush(perf)

    def flush(self, perf: Any) -> None:
        """Everything collected so far to the metrics file and W&B (rank 0), and the warning if one is due."""
        records = self.collector.drain()
        for step, metrics in records:
            perf.record(step, metrics)
        warn = records and self.threshold is not None and self.is_main
        if warn and (message := underflow_warning(records, float(self.threshold))):
            logger.warning(message)


_ACTIVE: QuantStats | None = None


def active() -> QuantStats | None:
    """The session `start` opened in this process (nvdlfw-inspect's state is global), or None."""
    return _ACTIVE


def _end_earlier_session() -> None:
    """End the session of an earlier run in this process (tests, in-process callers), so its state cannot leak.

    Checked in `sys.modules` only: a run without statistics never imports nvdlfw-inspect.
    """
    api = sys.modules.get("nvdlfw_inspect.api")
    if api is not None and api.DEBUG_MANAGER is not None:
        api.end_debug()  # also resets TE's debug state (TEDebugState._reset, through TE's namespace API)


def start(cfg: Any, context: Any, num_layers: int) -> QuantStats | None:
    """Open the nvdlfw-inspect session when `quant_stats.enabled`, before any TE module is built; else None."""
    global _ACTIVE
    _ACTIVE = None
    _end_earlier_session()
    if not cfg.quant_stats.enabled:
        return None
    try:
        import nvdlfw_inspect.api as debug_api
        from nvdlfw_inspect.logging import BaseLogger
    except ImportError as error:
        raise QuantStatsError(f"quant_stats.enabled=true needs nvdlfw-inspect: {INSTALL_HINT} ({error})") from None
    from precision import resolve_plan

    plan = resolve_plan(cfg, num_layers)
    layers = selected_layers(cfg, plan)
    features = te_features_dir(need_fp4="fp4" in layers.values())
    log_dir = resolve_log_dir(cfg)
    path = write_inspect_config(inspect_config(cfg, plan), log_dir, context.rank)
    collector = StatsCollector(keep=context.is_main)

    class Sink(BaseLogger):  # nvdlfw-inspect accepts only BaseLogger instances
        def log_scalar(self, name: str, value: Any, iteration: int, **kwargs: Any) -> None:
            collector.log_scalar(name, value, iteration, **kwargs)

    debug_api.initialize(
        config_file=str(path), feature_dirs=[str(features)], statistics_logger=Sink(), log_dir=str(log_dir)
    )
    section = cfg.quant_stats
    logger.info(
        "Quantisation statistics (nvdlfw-inspect): %s of %s in layers %s (%s), every %d steps; config and "
        "nvdlfw-inspect's logs in %s.",
        ", ".join(_as_list(section.stats) or ()),
        ", ".join(_as_list(section.tensors) or ()),
        layer_ranges(list(layers)),
        ", ".join(_as_list(section.gemms) or ()),
        section.every_n_steps,
        log_dir,
    )
    _ACTIVE = QuantStats(collector, int(section.every_n_steps), section.underflow_warn_pct, context.is_main)
    return _ACTIVE
