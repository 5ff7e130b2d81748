"""A run's numerics health as one PNG: per-layer underflow heat maps and its loss beside a BF16 run's.

    python health_report.py RUN_METRICS.jsonl [--baseline BF16_METRICS.jsonl] [--out report.png] [--gemm fc2]

The input is the metrics file (`logger.metrics_file`) of a run with `quant_stats.enabled=true`: besides the training
metrics it holds the per-layer statistics `quant/layer_NN/<gemm>/<tensor>/<stat>` (quant_stats.py). The PNG has one
heat map per measured tensor (activation, weight, gradient): transformer layers down, statistics steps across, the
colour the underflow % (share of non-zero values quantised to zero), each cell the worst of the layer's GEMMs (qkv,
proj, fc1, fc2) unless `--gemm` picks one; cells above `--threshold` carry a cross. Below them the training loss, and
the baseline run's (e.g. the same command with precision=bf16) when given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plot_metrics import TRAIN_LOSS, read_records, series
from quant_stats import GEMMS, TENSORS, parse_metric_key

if TYPE_CHECKING:  # matplotlib and numpy only where a figure is drawn
    import numpy as np
    from matplotlib.figure import Figure

UNDERFLOW = "underflows_pct"
DEFAULT_THRESHOLD = 1.0  # quant_stats.underflow_warn_pct's default


@dataclass
class Grid:
    """Underflow % of one tensor kind: `values[i, j]` for layer `layers[i]` at step `steps[j]` (NaN: not measured)."""

    tensor: str
    layers: list[int]
    steps: list[int]
    values: np.ndarray
    worst: tuple[float, int, str, int] | None  # (value, layer, gemm, step) of the largest cell


def underflow_grids(records: Sequence[dict[str, Any]], gemm: str | None = None) -> list[Grid]:
    """One grid per tensor kind found in the records, in TE's order; the last record of a step wins (resumed runs)."""
    import numpy as np

    cells: dict[str, dict[tuple[int, int], tuple[float, str]]] = {}
    for record in records:
        step, in_record = int(record["step"]), {}
        for key, value in record.items():
            parsed = parse_metric_key(key)
            if parsed is None or parsed[3] != UNDERFLOW or (gemm is not None and parsed[1] != gemm):
                continue
            layer, where, tensor, _ = parsed
            if math.isfinite(value := float(value)):
                cell = (tensor, layer)
                in_record[cell] = max(in_record.get(cell, (value, where)), (value, where))  # the worst GEMM
        for (tensor, layer), cell_value in in_record.items():
            cells.setdefault(tensor, {})[(layer, step)] = cell_value  # a later record of the step replaces it
    grids = []
    for tensor in sorted(cells, key=lambda t: TENSORS.index(t) if t in TENSORS else len(TENSORS)):
        grid = cells[tensor]
        layers, steps = sorted({layer for layer, _ in grid}), sorted({step for _, step in grid})
        values = np.full((len(layers), len(steps)), np.nan)
        for (layer, step), (value, _) in grid.items():
            values[layers.index(layer), steps.index(step)] = value
        (layer, step), (value, where) = max(grid.items(), key=lambda item: item[1][0])
        grids.append(Grid(tensor, layers, steps, values, (value, layer, where, step)))
    return grids


def _ticks(count: int, most: int) -> list[int]:
    """At most `most` evenly spread indices of `count` items, the first and last included."""
    if count <= most:
        return list(range(count))
    stride = math.ceil((count - 1) / (most - 1))
    return sorted({*range(0, count, stride), count - 1})


def plot_report(
    records: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]] | None = None,
    gemm: str | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    title: str = "",
    baseline_label: str = "baseline (BF16)",
) -> Figure:
    """The figure: heat maps (one per tensor kind) over the loss curve; returned so callers and tests can read it."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    grids = underflow_grids(records, gemm)
    if not grids:
        raise SystemExit(
            "no quantisation statistics (quant/layer_NN/<gemm>/<tensor>/underflows_pct) in the metrics: run with "
            "quant_stats.enabled=true and logger.metrics_file=<file>.jsonl (README: quantisation statistics)"
            + (f", or pick another --gemm than {gemm}" if gemm else "")
        )
    heights = [max(1.6, 0.18 * len(g.layers) + 0.9) for g in grids] + [2.6]
    figure = Figure(figsize=(11, sum(heights) + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas directly: no pyplot state, no display needed
    axes = figure.subplots(len(grids) + 1, 1, height_ratios=heights)
    which = f"GEMM {gemm}" if gemm else "worst of " + ", ".join(GEMMS)
    for ax, grid in zip(axes, grids, strict=False):
        image = ax.imshow(
            np.ma.masked_invalid(grid.values), aspect="auto", cmap="magma_r", vmin=0.0, interpolation="nearest"
        )
        columns, rows = _ticks(len(grid.steps), 12), _ticks(len(grid.layers), 24)
        ax.set_xticks(columns, [str(grid.steps[i]) for i in columns])
        ax.set_yticks(rows, [str(grid.layers[i]) for i in rows])
        ax.set_ylabel("layer")
        if threshold is not None and (over := np.argwhere(np.nan_to_num(grid.values, nan=-1.0) > threshold)).size:
            ax.scatter(over[:, 1], over[:, 0], marker="x", s=14, color="tab:cyan", linewidths=1.0)
        value, layer, where, step = grid.worst
        ax.set_title(
            f"{grid.tensor}: underflow % ({which}); worst {value:.3g}% in layer {layer} {where} at step {step}"
            + (f"; × above {threshold:g}%" if threshold is not None else ""),
            fontsize=10,
        )
        figure.colorbar(image, ax=ax, label="underflow %", pad=0.01)
    axes[-2].set_xlabel("step")
    loss_axes = axes[-1]
    for source, label, color in ((records, "this run", "tab:red"), (baseline, baseline_label, "tab:blue")):
        if source is None:
            continue
        steps, values = series(source, TRAIN_LOSS)
        if steps:
            final = f" (last {values[-1]:.4g})"
            loss_axes.plot(steps, values, marker="o", markersize=2, color=color, label=label + final)
    loss_axes.set_ylabel("training loss")
    loss_axes.set_xlabel("step")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if title:
        figure.suptitle(title)
    return figure


def render(
    metrics_path: Path,
    baseline_path: Path | None = None,
    output: Path | None = None,
    gemm: str | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
) -> tuple[Figure, Path]:
    """Read, draw and save as PNG (default: `<input stem>_health.png` beside the input); the figure and its path."""
    records = read_records(metrics_path)
    baseline = read_records(baseline_path) if baseline_path is not None else None
    output = output if output is not None else metrics_path.with_name(f"{metrics_path.stem}_health.png")
    label = f"baseline: {baseline_path.name}" if baseline_path is not None else ""
    figure = plot_report(records, baseline, gemm, threshold, title=metrics_path.name, baseline_label=label)
    figure.savefig(output, format="png")
    return figure, output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="metrics file of a run with quant_stats.enabled=true (JSON lines)")
    parser.add_argument("--baseline", type=Path, default=None, help="metrics file of a BF16 run, for the loss panel")
    parser.add_argument("--out", "-o", type=Path, default=None, help="PNG to write (default: beside the input)")
    parser.add_argument("--gemm", choices=list(GEMMS), default=None, help="one GEMM instead of the worst of them")
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="mark cells above this underflow %% (default 1)"
    )
    args = parser.parse_args(argv)
    _, output = render(args.metrics, args.baseline, args.out, args.gemm, args.threshold)
    print(output)
    return output


if __name__ == "__main__":
    main()
