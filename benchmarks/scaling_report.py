"""The weak-scaling report of benchmarks/scaling.sh: a markdown table and a PNG chart from each run's metrics JSONL.

    python benchmarks/scaling_report.py RUNS --output OUT/scaling      # writes OUT/scaling.md and OUT/scaling.png

RUNS holds `runs.tsv` (one line per run: name, kind, model, strategy, precision, nproc, warmup, rc) and, per run,
`<name>.jsonl` (logger.metrics_file, a line per step) and `<name>.log`. Per run: tokens/s per GPU
(train/tokens_per_s_per_gpu, rank 0's) as the median over the steps after `warmup`, with min-max; scaling efficiency
= that median at N GPUs / at 1 GPU for the same model, strategy and precision; peak memory per GPU = the largest
train/peak_memory_gib (rank 0's allocator peak). A run with no timed steps shows why: OOM, failed (rc), or not run.
Runs of kind `big` / `resume` (the 15B runs) get a second table with the checkpoint save and resume times, from the
log lines of checkpoint.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path
from typing import Any

SAVED = re.compile(r"Checkpoint of step (\d+) written in ([\d.]+) s")
PUBLISHED = re.compile(r"Checkpoint \S+ published: ([\d.]+) GiB, ([\d.]+) s after the save began")
RESUMED = re.compile(r"Resumed from \S+ \(step (\d+)\) in ([\d.]+) s")
STORED = re.compile(r"Parameters stored on this rank: (\S+) GiB of the model's (\S+) GiB")
OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)


def read_manifest(runs: Path) -> list[dict[str, Any]]:
    with (runs / "runs.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for row in rows:
        row["nproc"], row["warmup"] = int(row["nproc"]), int(row["warmup"])
    return rows


def train_rows(path: Path) -> list[dict[str, Any]]:
    """The training lines of a metrics JSONL (validation lines and a torn last line skipped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in row:
            rows.append(row)
    return rows


def summarise(runs: Path, run: dict[str, Any]) -> dict[str, Any]:
    """A run's figures (median/min/max tokens/s per GPU over the timed steps, peak memory) and its status."""
    rows = train_rows(runs / f"{run['name']}.jsonl")
    timed = [r["train/tokens_per_s_per_gpu"] for r in rows if r["step"] > run["warmup"]]
    log_path = runs / f"{run['name']}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    result: dict[str, Any] = {**run, "timed_steps": len(timed), "log": log}
    if timed:
        result.update(
            status="ok" if str(run["rc"]) == "0" else f"rc={run['rc']} after {len(timed)} timed steps",
            median=statistics.median(timed),
            min=min(timed),
            max=max(timed),
            peak_gib=max(r["train/peak_memory_gib"] for r in rows),
        )
    elif OOM.search(log):
        result["status"] = "OOM"
    elif not log_path.exists() and not rows:
        result["status"] = "not run"
    else:
        result["status"] = f"failed (rc={run['rc']}, {len(rows)} steps logged)"
    return result


def efficiencies(results: list[dict[str, Any]]) -> None:
    """Adds `efficiency`: per-GPU median at N GPUs / at 1 GPU of the same model, strategy and precision."""
    single = {(r["model"], r["strategy"], r["precision"]): r.get("median") for r in results if r["nproc"] == 1}
    for r in results:
        base = single.get((r["model"], r["strategy"], r["precision"]))
        r["efficiency"] = r["median"] / base if base and "median" in r else None


def _tokens(r: dict[str, Any]) -> str:
    return f"{r['median']:,.0f} ({r['min']:,.0f}–{r['max']:,.0f})" if "median" in r else "–"


def sweep_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| Model | Strategy | Precision | GPUs | Tokens/s per GPU, median (min–max) | Tokens/s, all GPUs | Scaling "
        "efficiency | Peak memory per GPU (GiB) | Timed steps | Status |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in results:
        total = f"{r['median'] * r['nproc']:,.0f}" if "median" in r else "–"
        efficiency = f"{r['efficiency']:.1%}" if r.get("efficiency") is not None else "–"
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "–"
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['precision']} | {r['nproc']} | {_tokens(r)} | {total} | "
            f"{efficiency} | {peak} | {r['timed_steps']} | {r['status']} |"
        )
    return "\n".join(lines)


def big_table(results: list[dict[str, Any]]) -> str:
    """The 15B runs: each `big` run (stopped with a checkpoint) beside its `resume` run."""
    by_name = {r["name"]: r for r in results}
    lines = [
        "| Model | Strategy | Precision | GPUs | Tokens/s per GPU, median (min–max) | Peak memory per GPU (GiB) | "
        "Parameters per GPU (GiB) | Checkpoint save: written / published (s), size (GiB) | Resume: load (s), "
        "steps after it | Status (run / resume) |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in (r for r in results if r["kind"] == "big"):
        resume = by_name.get(f"{r['name']}_resume")
        stored = STORED.search(r["log"])
        saved, published = SAVED.findall(r["log"]), PUBLISHED.findall(r["log"])
        save = (
            f"{saved[-1][1]} / {published[-1][1] if published else '?'}, {published[-1][0] if published else '?'}"
            if saved
            else "–"
        )
        loaded = RESUMED.search(resume["log"]) if resume else None
        after = f", {resume['timed_steps'] + resume['warmup']} steps" if resume and "median" in resume else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "–"
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['precision']} | {r['nproc']} | {_tokens(r)} | {peak} | "
            f"{stored[1] + ' of ' + stored[2] if stored else '–'} | {save} | "
            f"{loaded[2] + ' (step ' + loaded[1] + ')' if loaded else '–'}{after} | "
            f"{r['status']} / {resume['status'] if resume else 'not run'} |"
        )
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Tokens/s per GPU (median, min-max bars) and scaling efficiency over the GPU count, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        series = {}
        for r in results:
            if r["model"] == model and "median" in r:
                series.setdefault(f"{r['strategy']} {r['precision']}", []).append(r)
        for label, points in series.items():
            points.sort(key=lambda r: r["nproc"])
            x = [r["nproc"] for r in points]
            y = [r["median"] for r in points]
            error = [[r["median"] - r["min"] for r in points], [r["max"] - r["median"] for r in points]]
            axes[0][column].errorbar(x, y, yerr=error, marker="o", capsize=3, label=label)
            with_base = [r for r in points if r["efficiency"] is not None]
            axes[1][column].plot([r["nproc"] for r in with_base], [r["efficiency"] for r in with_base], "o-")
        axes[0][column].set_title(model)
        axes[0][column].set_ylabel("tokens/s per GPU (median, min–max)")
        axes[1][column].set_ylabel("scaling efficiency vs 1 GPU")
        axes[1][column].axhline(1.0, color="grey", linewidth=0.5)
        for row in axes:
            row[column].set_xscale("log", base=2)
            row[column].set_xlabel("GPUs")
        if series:
            axes[0][column].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: Path, output: Path, title: str = "Weak scaling") -> str:
    """Writes `<output>.md` (and `<output>.png` when any run has figures); returns the markdown."""
    results = [summarise(runs, run) for run in read_manifest(runs)]
    sweep = [r for r in results if r["kind"] == "sweep"]
    efficiencies(sweep)
    text = [f"## {title}", "", sweep_table(sweep)]
    if any(r["kind"] == "big" for r in results):
        text += ["", "### Large model: meta-device init, checkpoint save and resume", "", big_table(results)]
    markdown = "\n".join(text) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(markdown)
    if any("median" in r for r in sweep):
        chart(sweep, output.with_suffix(".png"), title)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--output", type=Path, required=True, help="path without suffix: .md and .png are written")
    parser.add_argument("--title", default="Weak scaling")
    args = parser.parse_args()
    print(report(args.runs, args.output, args.title))


if __name__ == "__main__":
    main()
