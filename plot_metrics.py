"""Draw a run's metrics file as one PNG, for runs without Weights & Biases.

    python plot_metrics.py RUN_METRICS.jsonl [-o out.png]

The input is what `logger.metrics_file=...` makes rank 0 write (`perf_logger.py`): one JSON object per line, a
`step` and the training metrics of a log step, or the validation metrics of a validation step. The PNG has two
panels over the step: training and validation loss, and training throughput (real tokens per second per GPU).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn: reading and checking the file needs none of it
    from matplotlib.figure import Figure

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
TOKENS_PER_S = "train/tokens_per_s_per_gpu"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The file's JSON lines; a one-line SystemExit when the file cannot give a loss curve, so a user sees why."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such metrics file (a run writes one with logger.metrics_file=<file>.jsonl)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}, line {number}: not a JSON line ({error.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise SystemExit(f"{path}, line {number}: not a metrics record (a JSON object with a 'step')")
        records.append(record)
    if not records:
        raise SystemExit(f"{path} is empty: the run has not reached its first log step")
    if not any(TRAIN_LOSS in record or VAL_LOSS in record for record in records):
        raise SystemExit(f"{path} has no loss records ('{TRAIN_LOSS}' or '{VAL_LOSS}'): not a recipe metrics file?")
    return records


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, in step order, the last record of a step winning.

    A resumed run appends to the same file and logs again the steps after its checkpoint; the later values are the
    ones the model's weights continue from, and a line that went back in step would draw a zigzag.
    """
    by_step = {int(record["step"]): float(record[key]) for record in records if key in record}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def plot_metrics(records: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """The figure: losses over the step on top, tokens/s below; returned so callers (and tests) can read its lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas directly: no pyplot state, no display needed
    loss_axes, speed_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for key, label in ((TRAIN_LOSS, "training loss"), (VAL_LOSS, "validation loss")):
        steps, values = series(records, key)
        if steps:  # markers as well: a short run has a single validation point
            loss_axes.plot(steps, values, marker="o", markersize=3, label=label)
    loss_axes.set_ylabel("loss (masked tokens, nats)")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    steps, values = series(records, TOKENS_PER_S)
    speed_axes.plot(steps, values, marker="o", markersize=3, color="tab:green", label="tokens/s per GPU")
    speed_axes.set_ylabel("tokens/s per GPU")
    speed_axes.set_xlabel("step")
    speed_axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, also on a short run
    speed_axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure


def render(metrics_path: Path, output: Path | None = None) -> tuple[Figure, Path]:
    """Read, plot and save as PNG (beside the input, same stem, unless `output` is given); the figure and its path."""
    records = read_records(metrics_path)
    output = output if output is not None else metrics_path.with_suffix(".png")
    figure = plot_metrics(records, title=metrics_path.name)
    figure.savefig(output, format="png")
    return figure, output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics file (logger.metrics_file), JSON lines")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default: beside the input)")
    args = parser.parse_args(argv)
    _, output = render(args.metrics, args.output)
    print(output)
    return output


if __name__ == "__main__":
    main()
