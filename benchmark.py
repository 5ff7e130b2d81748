"""Training-throughput benchmark: the reference transformers ESM-2 against the TransformerEngine layouts and FP8.

    python benchmark.py --config-name benchmark
    python benchmark.py --config-name benchmark benchmark.models=[esm2_t36_3B_UR50D] benchmark.profile=true

Each (model, variant) pair runs the real recipe, as users run it: the Hydra config with the variant's overrides,
`setup_run`, the model built and wrapped by the chosen entrypoint's own `STRATEGY` (`benchmark.strategy`: ddp, the
default, fsdp2 or mfsdp), fused AdamW and `train_loop` (forward, backward, clipping, optimizer step), on the shipped
proteome's real length distribution and the same capacity of `token_budget` tokens per step. It reports
unpadded tokens/s per GPU, model TFLOP/s, MFU, step time, peak memory and the padding fraction as a markdown table,
JSON and a bar chart; the GPU's dense BF16 and FP8 matmul ceilings are measured in the same run.

Timing window: `train_loop` syncs host and device only at log steps. With `log_every_n_steps = timed_steps` and a
warm-up that is a multiple of it, the last log window is exactly the timed window, bounded by the two syncs, and
`TrainResult.metrics` holds its measurement.

Model FLOPs count useful work only (no padding, no activation recomputation). Per optimizer step, summed over the
real sequences of the step (s = real tokens of a sequence; L layers, hidden size H, FFN size I, real vocabulary V):

    FLOPs = Σ_seq [ 6 · P_matmul · s + 12 · L · H · s² ]
    P_matmul = L · (4H² + 2HI) + H² + H · V      (per layer QKV + output projection + FFN; LM-head dense + decoder)

6·P_matmul·s is 2 forward + 4 backward FLOPs per matmul weight per token; 12·L·H·s² is attention (QKᵀ and AV,
2·s²·H FLOPs each per layer forward, times 3 for forward + backward). Embedding lookups, biases, norms, softmax and
GELU are not counted. TFLOP/s = FLOPs of the timed window / its duration; MFU = TFLOP/s / measured BF16 ceiling
(FP8 variants also against the FP8 ceiling).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import EsmConfig

import train_ddp
import train_fsdp2
import train_mfsdp
from distributed import destroy_distributed
from model import count_parameters, te_unavailable_reason
from parallel import unwrap
from precision import fp8_enabled, unsupported_reason
from training import Run, Strategy, build_training, setup_run, train_loop

logger = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parent
BASELINE = "hf_pad1024"
README_START, README_END = "<!-- benchmark-results:start -->", "<!-- benchmark-results:end -->"
FLOP_FORMULA = "FLOPs/step = Σ_seq [6·P_matmul·s + 12·L·H·s²], P_matmul = L·(4H² + 2HI) + H² + H·V, s = real tokens"


STRATEGIES: dict[str, Strategy] = {
    "ddp": train_ddp.STRATEGY,
    "fsdp2": train_fsdp2.STRATEGY,
    "mfsdp": train_mfsdp.STRATEGY,
}


@dataclass(frozen=True)
class Variant:
    """One way to train the same model: implementation, precision (hydra_config/precision/), packing and padding."""

    label: str
    use_te: bool
    precision: str
    packed: bool = False
    pad_to_max_length: bool = False


VARIANTS: dict[str, Variant] = {
    "hf_pad1024": Variant("transformers (SDPA), padded to max_seq_length", False, "bf16", pad_to_max_length=True),
    "hf_padlongest": Variant("transformers (SDPA), padded to the longest", False, "bf16"),
    "te_bshd": Variant("TE, padded to the longest (BSHD)", True, "bf16"),
    "te_thd": Variant("TE, packed (THD)", True, "bf16", packed=True),
    "te_thd_fp8_delayed": Variant("TE THD + FP8 delayed scaling", True, "fp8_delayed", packed=True),
    "te_thd_fp8_current": Variant("TE THD + FP8 current scaling", True, "fp8_current", packed=True),
    "te_thd_fp8_block": Variant("TE THD + FP8 block scaling", True, "fp8_block", packed=True),
    "te_thd_mxfp8": Variant("TE THD + MXFP8 (Blackwell)", True, "mxfp8", packed=True),
}


def matmul_parameters(config: EsmConfig) -> int:
    """Weights that take part in a matmul per token (the real vocabulary, not TE's padded decoder rows)."""
    layers, hidden, ffn = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    return layers * (4 * hidden * hidden + 2 * hidden * ffn) + hidden * hidden + hidden * config.vocab_size


def model_flops(lengths: np.ndarray, config: EsmConfig) -> int:
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
    """The training stream, noting each batch's real sequence lengths and epoch as `train_loop` draws it.

    That gives the FLOPs of exactly the batches of the timed window, and tells whether an epoch boundary (a data-loader
    restart, which re-forks the workers) fell inside it. Host-side numpy only: no device sync.
    """

    def __init__(self, stream: Any, pad_token_id: int) -> None:
        self.stream, self.pad_token_id = stream, pad_token_id
        self.lengths: list[np.ndarray] = []
        self.epochs: list[int] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.stream:
            self.lengths.append(real_lengths(batch, self.pad_token_id))
            self.epochs.append(int(getattr(self.stream, "epoch", 0)))
            yield batch


def variant_config(base: DictConfig, model_tag: str, variant: Variant, warmup: int, timed: int) -> DictConfig:
    """The benchmark config with the variant's precision preset and overrides, as `--config-name` + overrides would."""
    budget, seq = int(base.benchmark.token_budget), int(base.dataset.max_seq_length)
    preset = OmegaConf.load(RECIPE_DIR / "hydra_config" / "precision" / f"{variant.precision}.yaml")
    overrides = {
        "model_tag": model_tag,
        "use_te": str(variant.use_te).lower(),
        "num_train_steps": warmup + timed,
        "grad_acc_steps": 1,
        "use_sequence_packing": variant.packed,
        "token_micro_batch_size": budget,
        "dataset": {"micro_batch_size": budget // seq, "pad_to_max_length": variant.pad_to_max_length},
        "validation": {"every_n_steps": 0},
        "checkpoint": {"ckpt_dir": None},
        "logger": {"log_every_n_steps": timed, "progress_bar": False},
    }
    return OmegaConf.merge(base, preset, overrides)


def skip_reason(cfg: DictConfig, variant: Variant, strategy: Strategy) -> str | None:
    """Why this variant cannot run on this machine (no GPU or TE, or an FP8 recipe this GPU lacks), or None."""
    if strategy.needs_cuda and not torch.cuda.is_available():
        return f"{strategy.name} needs CUDA GPUs"
    if variant.use_te and (reason := te_unavailable_reason()):
        return f"TE model: {reason}"
    if fp8_enabled(cfg):
        return unsupported_reason(cfg.fp8_config.recipe, torch.device("cuda", torch.cuda.current_device()))
    return None


def run_variant(cfg: DictConfig, warmup: int, timed: int, profile_prefix: Path | None) -> dict[str, Any]:
    """Train warm-up + timed steps as the strategy's entrypoint does (no checkpoints) and measure the timed window."""
    strategy = STRATEGIES[cfg.benchmark.strategy]
    run = setup_run(cfg, strategy)
    recorder = LengthRecorder(run.train_stream, run.tokenizer.pad_token_id)
    run.train_stream = recorder  # train_loop only iterates it
    model, optimizer, scheduler = build_training(run, strategy)
    metrics = train_loop(run, model, optimizer, scheduler, strategy).metrics
    window = recorder.lengths[warmup : warmup + timed]
    elapsed = metrics["train/step_time_s"] * timed
    flops = sum(model_flops(lengths, run.model_config) for lengths in window)
    row: dict[str, Any] = {
        "status": "ok",
        "parameters": count_parameters(model),
        "attention": "TE" if run.use_te else unwrap(model).config._attn_implementation,
        "tokens_per_s": metrics["train/tokens_per_s_per_gpu"],
        "padded_tokens_per_s": metrics["train/padded_tokens_per_s_per_gpu"],
        "step_time_s": metrics["train/step_time_s"],
        "peak_memory_gib": metrics["train/peak_memory_gib"],
        "padding_fraction": metrics["train/padding_fraction"],
        "loss": metrics["train/loss"],
        "window_steps": timed,
        "window_sequences": sum(len(lengths) for lengths in window),
        "window_tokens": int(sum(lengths.sum() for lengths in window)),
        "window_flops": flops,
        "tflops": flops / elapsed / 1e12,
    }
    if recorder.epochs[warmup - 1] != recorder.epochs[warmup + timed - 1]:
        row["reason"] = "an epoch boundary (data-loader restart) fell in the timed window"
    if profile_prefix is not None:
        profile_steps(run, model, optimizer, scheduler, strategy, profile_prefix, int(cfg.benchmark.profile_steps))
    return row


def profile_steps(
    run: Run, model: Any, optimizer: Any, scheduler: Any, strategy: Strategy, prefix: Path, steps: int
) -> None:
    """Profile a few more steps with torch.profiler, after the timed window so the profiler cannot perturb it."""
    cuda = run.context.uses_cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sort_keys = ["self_device_time_total" if cuda else "self_cpu_time_total", "self_cpu_time_total"]  # GPU, host

    def write(prof: torch.profiler.profile) -> None:
        events = prof.key_averages()
        tables = [f"Top 60 by {key}:\n{events.table(sort_by=key, row_limit=60)}" for key in dict.fromkeys(sort_keys)]
        summary = device_busy_summary(prof, steps) if cuda else ""
        prefix.with_name(f"{prefix.name}_kernels.txt").write_text(summary + "\n\n".join(tables) + "\n")
        prof.export_chrome_trace(str(prefix.with_name(f"{prefix.name}_trace.json.gz")))

    prefix.parent.mkdir(parents=True, exist_ok=True)
    start = int(run.cfg.num_train_steps)
    run.cfg.num_train_steps = start + 2 + steps  # 1 step waits out the data-loader restart, 1 warms the profiler up
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write) as prof:
        step = lambda _: bool(prof.step())  # noqa: E731  (after_step: advance the profiler's schedule, never stop)
        train_loop(run, model, optimizer, scheduler, strategy, start_step=start, after_step=step)


def device_busy_summary(prof: torch.profiler.profile, steps: int) -> str:
    """How much of the profiled wall time the GPU was busy (the union of kernel and copy intervals).

    A GPU busy far less than the wall time means the step is host-bound: the GPU waits for Python, hooks or kernel
    launches, and faster kernels would not help.
    """
    try:
        records = prof.profiler.kineto_results.events()
        spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in records)
        device = sorted(
            (e.start_ns(), e.start_ns() + e.duration_ns()) for e in records if e.device_type().name == "CUDA"
        )
    except (AttributeError, RuntimeError) as exc:  # the profiler's internals differ between torch releases
        return f"GPU busy time not available ({exc})\n\n"
    if not device:
        return "No GPU activity was recorded\n\n"
    busy, current_start, current_end = 0, *device[0]
    for start, end in device[1:]:
        if start > current_end:
            busy, current_start = busy + current_end - current_start, start
        current_end = max(current_end, end)
    busy += current_end - current_start
    wall = max(end for _, end in spans) - spans[0][0]
    return (
        f"GPU busy {busy / 1e6 / steps:.1f} ms per step of {wall / 1e6 / steps:.1f} ms profiled wall time "
        f"({busy / wall:.0%}), over {steps} steps\n\n"
    )


def measure(base: DictConfig, model_tag: str, name: str, warmup: int, timed: int) -> dict[str, Any]:
    """One row of the table: the measurement, or why there is none (skipped, OOM, failed)."""
    if name not in VARIANTS:
        return {"status": "skipped", "reason": f"unknown variant (known: {', '.join(VARIANTS)})"}
    variant = VARIANTS[name]
    row: dict[str, Any] = {"label": variant.label, "fp8": False}
    profile = Path(base.benchmark.output_dir) / "profile" / f"{model_tag}_{name}" if base.benchmark.profile else None
    try:
        cfg = variant_config(base, model_tag, variant, warmup, timed)
        row["fp8"] = fp8_enabled(cfg)
        if reason := skip_reason(cfg, variant, STRATEGIES[cfg.benchmark.strategy]):
            return row | {"status": "skipped", "reason": reason}
        return row | run_variant(cfg, warmup, timed, profile)
    except torch.OutOfMemoryError:
        return row | {"status": "OOM", "reason": "CUDA out of memory"}
    except Exception as exc:  # one broken variant must not cost the others' numbers
        if "out of memory" in str(exc).lower():
            return row | {"status": "OOM", "reason": f"{type(exc).__name__}: out of memory"}
        traceback.print_exc()
        return row | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}


def release_memory() -> None:
    """Free the previous variant's GPU memory and TE's global FP8 state, and restart the peak-memory count."""
    gc.collect()
    if "transformer_engine.pytorch" in sys.modules:
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:  # older TE releases
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
        FP8GlobalStateManager.reset()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
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
    """Speed-up against hf_pad1024 of the same model, and MFU against the measured ceilings."""
    ceilings, dense = report["meta"]["ceilings_tflops"], report["meta"]["dense_ceiling"]
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    baseline = {r["model"]: r["tokens_per_s"] for r in rows if r["variant"] == BASELINE}
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / baseline[r["model"]] if r["model"] in baseline else None
        r["mfu"] = r["tflops"] / ceilings[dense]
        r["mfu_fp8"] = r["tflops"] / ceilings["fp8"] if r["fp8"] and "fp8" in ceilings else None


def _num(value: float) -> str:
    """Three significant digits, with thousands separators above 1,000 (TFLOP/s on a CPU are tiny)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def short_name(model_tag: str) -> str:
    match = re.search(r"_(\d+[MB])_", model_tag)
    return f"ESM-2 {match.group(1)}" if match else model_tag


def markdown(report: dict[str, Any], heading: str = "#") -> str:
    """The results table with everything needed to read it: hardware, versions, ceilings, set-up and FLOP formula."""
    meta = report["meta"]
    ceilings = ", ".join(f"{k.upper()} {_num(v)} TFLOP/s" for k, v in meta["ceilings_tflops"].items())
    lines = [
        f"{heading} ESM-2 pretraining throughput: {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, TransformerEngine {meta['transformer_engine']}, transformers {meta['transformers']}; "
        f"one {meta['device']}. Matmul ceilings measured in this run ({meta['ceiling_size']}³, median): {ceilings}.",
        f"Every variant: forward + backward + fused AdamW, {meta['strategy'].upper()} on one device, BF16 compute "
        f"(FP32 on CPU) with {meta['weights']}, real "
        f"protein lengths from `{meta['dataset']}`, a capacity of {meta['token_budget']:,} tokens per step (padded: "
        f"{meta['sequences_per_step']} sequences of up to {meta['max_seq_length']} tokens; packed: "
        f"{meta['token_budget']:,}-token packs); {meta['warmup_steps']} warm-up, then {meta['timed_steps']} timed "
        "steps.",
        f"Model FLOPs (padding excluded): {FLOP_FORMULA}; MFU = TFLOP/s / measured {meta['dense_ceiling'].upper()} "
        "ceiling (FP8 rows also / FP8 ceiling).",
        "",
        f"| Model | Variant | Tokens/s/GPU (unpadded) | Speed-up vs {BASELINE} | TFLOP/s | "
        f"MFU ({meta['dense_ceiling'].upper()}) | MFU (FP8) | Step time (ms) | Peak memory (GiB) | Padding | Notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["rows"]:
        name = short_name(r["model"])
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['variant']} | {r['status']} | | | | | | | | {r.get('reason', '')} |")
            continue
        speedup = "–" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        mfu_fp8 = "–" if r["mfu_fp8"] is None else f"{r['mfu_fp8']:.1%}"
        lines.append(
            f"| {name} | {r['variant']} | {r['tokens_per_s']:,.0f} | {speedup}"
            f" | {_num(r['tflops'])} | {r['mfu']:.1%} | {mfu_fp8} | {r['step_time_s'] * 1e3:.1f} "
            f"| {r['peak_memory_gib']:.2f} | {r['padding_fraction']:.1%} | {r.get('reason', '')} |"
        )
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of unpadded tokens/s (log axis) per model and variant, labelled with the speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, meta = {(r["model"], r["variant"]): r for r in report["rows"]}, report["meta"]
    models, variants = list(dict.fromkeys(m for m, _ in rows)), list(dict.fromkeys(v for _, v in rows))
    colors, width = plt.get_cmap("tab10").colors, 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(models) * len(variants) + 2), 5))
    for i, model_tag in enumerate(models):
        for j, variant in enumerate(variants):
            r, x = rows.get((model_tag, variant)), i + (j - (len(variants) - 1) / 2) * width
            if r is None:
                continue
            if r["status"] != "ok":
                ax.text(x, 0.02, r["status"], transform=ax.get_xaxis_transform(), rotation=90, ha="center", fontsize=7)
                continue
            ax.bar(x, r["tokens_per_s"], width * 0.95, color=colors[j % len(colors)])
            label = f"{r['speedup']:.1f}×" if r.get("speedup") else f"{r['tokens_per_s']:.2g}"
            ax.text(x, r["tokens_per_s"] * 1.05, label, ha="center", va="bottom", fontsize=7, rotation=90)
    values = [r["tokens_per_s"] for r in rows.values() if r["status"] == "ok"] or [1.0]
    ax.set_yscale("log")
    ax.set_ylim(10 ** math.floor(math.log10(min(values) / 2)), max(values) * 6)  # room for the labels
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_xticks(range(len(models)), [short_name(m) for m in models])
    ax.set_ylabel("unpadded tokens/s per GPU (log scale)")
    ax.set_title(f"ESM-2 training throughput: {meta['gpu']}, {meta['date']}\nbar labels: speed-up vs {BASELINE}")
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


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Measure every configured (model, variant) pair; writes the report after each one, so a cut-off run keeps rows."""
    bench = cfg.benchmark
    timed = int(bench.timed_steps)
    warmup = max(1, math.ceil(int(bench.warmup_steps) / timed)) * timed
    seq, budget = int(cfg.dataset.max_seq_length), int(bench.token_budget)
    if timed < 1 or budget < seq:
        raise ValueError(f"Need timed_steps >= 1 and token_budget ({budget}) >= dataset.max_seq_length ({seq}).")
    if bench.strategy not in STRATEGIES:
        raise ValueError(f"benchmark.strategy={bench.strategy!r} must be one of {tuple(STRATEGIES)}.")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    now = datetime.now()
    meta = {
        "gpu": gpu,
        "device": device.type.upper() if device.type == "cpu" else "GPU",
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "transformer_engine": _version("transformer_engine"),
        "transformers": _version("transformers"),
        "ceiling_size": int(bench.ceiling_size) if device.type == "cuda" else min(int(bench.ceiling_size), 1024),
        "ceilings_tflops": matmul_ceilings(device, int(bench.ceiling_size)),
        "dense_ceiling": "bf16" if device.type == "cuda" else "fp32",
        "dataset": str(cfg.dataset.path),
        "token_budget": budget,
        "max_seq_length": seq,
        "sequences_per_step": budget // seq,
        "warmup_steps": warmup,
        "timed_steps": timed,
        "strategy": str(bench.strategy),
        "weights": "FP32 master weights"
        if cfg.use_fp32_master_weights
        else "BF16 weights and optimizer state (use_fp32_master_weights=false)",
        "flop_formula": FLOP_FORMULA,
    }
    release_memory()
    report: dict[str, Any] = {"meta": meta, "rows": []}
    out_dir = Path(bench.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = "fp32-master" if cfg.use_fp32_master_weights else "bf16-weights"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    stem = out_dir / f"benchmark_{slug}_{now:%Y-%m-%d}_{bench.strategy}_{weights}"
    for model_tag in bench.models:
        for name in bench.variants:
            report["rows"].append({"model": model_tag, "variant": name} | measure(cfg, model_tag, name, warmup, timed))
            release_memory()
            add_derived(report)
            r = report["rows"][-1]
            summary = f"{r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "ok" else r.get("reason", "")
            print(f"[benchmark] {model_tag} {name}: {r['status']} {summary}", flush=True)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
            stem.with_suffix(".md").write_text(markdown(report))
    chart(report, stem)
    if bench.get("readme") and device.type == "cuda":
        update_readme(RECIPE_DIR / bench.readme, markdown(report, heading="###"))
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
