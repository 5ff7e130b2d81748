"""Compare the per-step losses of runs written by benchmarks/cuda_graphs_check.sh (metrics JSON lines).

    python benchmarks/compare_losses.py OUT_DIR --model esm2_t12_35M_UR50D

For each precision: graphs against static (the same batches, eager) and static against dynamic (today's packing):
steps compared, steps bit-identical, the largest absolute and relative loss difference, and the step time
(median over steps after the first 10, from the per-step log windows). With `--track RUN REFERENCE`: how closely
one run's loss curve follows another's (benchmarks/low_precision_check.sh), over windows of `--window` steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def per_step(path: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/loss" in r]
    return {
        "loss": np.array([r["train/loss"] for r in rows]),
        "step_time": np.array([r["train/step_time_s"] for r in rows]),
        "tokens_per_s": np.array([r["train/tokens_per_s_per_gpu"] for r in rows]),
    }


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str:
    n = min(len(a["loss"]), len(b["loss"]))
    if n == 0:
        return "no steps to compare"
    diff = np.abs(a["loss"][:n] - b["loss"][:n])
    same = int((diff == 0).sum())
    relative = float((diff / np.abs(b["loss"][:n])).max())
    return f"{n} steps, {same} bit-identical, max |Δloss| {diff.max():.3g} (relative {relative:.3g})"


def track(a: dict[str, np.ndarray], b: dict[str, np.ndarray], window: int) -> str:
    """How closely run `a` follows run `b`: per-step noise averaged over windows of `window` steps."""
    n = min(len(a["loss"]), len(b["loss"])) // window * window
    if n == 0:
        return f"fewer than {window} steps to compare"
    mean_a, mean_b = (run["loss"][:n].reshape(-1, window).mean(1) for run in (a, b))
    relative = np.abs(mean_a - mean_b) / mean_b
    return (
        f"{n} steps in windows of {window}: max relative difference of window means {relative.max():.2%} (window "
        f"{int(relative.argmax()) + 1}), last window {mean_a[-1]:.4f} vs {mean_b[-1]:.4f} ({relative[-1]:.2%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="esm2_t12_35M_UR50D")
    parser.add_argument("--track", nargs=2, metavar=("RUN", "REFERENCE"), help="compare two runs' loss curves instead")
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    if args.track:
        run, reference = (per_step(args.out / f"{args.model}_{name}.jsonl") for name in args.track)
        print(f"{args.model} {args.track[0]} vs {args.track[1]}: {track(run, reference, args.window)}")
        return
    runs = {p.stem.removeprefix(f"{args.model}_"): per_step(p) for p in sorted(args.out.glob(f"{args.model}_*.jsonl"))}
    precisions = sorted({name.rsplit("_", 1)[0] for name in runs})
    for precision in precisions:
        modes = {mode: runs.get(f"{precision}_{mode}") for mode in ("dynamic", "static", "graphs")}
        print(f"{args.model} {precision}:")
        for mode, values in modes.items():
            if values is not None and len(values["step_time"]) > 10:
                times = values["step_time"][10:]
                print(
                    f"  {mode:8s} step time median {np.median(times) * 1e3:.1f} ms (min {times.min() * 1e3:.1f}, "
                    f"max {times.max() * 1e3:.1f}); tokens/s median {np.median(values['tokens_per_s'][10:]):,.0f}"
                )
        for a, b in (("graphs", "static"), ("static", "dynamic")):
            if modes[a] is not None and modes[b] is not None:
                print(f"  {a} vs {b}: {compare(modes[a], modes[b])}")


if __name__ == "__main__":
    main()
