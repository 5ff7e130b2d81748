"""Compare the per-step losses of runs written by benchmarks/cuda_graphs_check.sh (metrics JSON lines).

    python benchmarks/compare_losses.py OUT_DIR --model esm2_t12_35M_UR50D

For each precision: graphs against static (the same batches, eager) and static against dynamic (today's packing):
steps compared, steps bit-identical, the largest absolute and relative loss difference, and the step time
(median over steps after the first 10, from the per-step log windows). With `--track RUN REFERENCE`: how closely
one run's loss curve follows another's (benchmarks/low_precision_check.sh), over windows of `--window` steps.

Runs on N GPUs against one GPU with grad_acc_steps=N (benchmarks/mfsdp_fp8_bisect.sh), files
`<model>_<arm>_1gpu.jsonl` and `<model>_<arm>_<N>gpu.jsonl`:

    python benchmarks/compare_losses.py RUNS --model mfsdp --bisect delayed current --nproc 2   # markdown table
    python benchmarks/compare_losses.py RUNS --model mfsdp --first-divergence delayed --nproc 2  # prints a step

The table has, per arm, the worst relative per-step loss and grad-norm difference, the first step past
`--tolerance` (default 2%, issue 20's acceptance) and, where `<model>_<arm>_<n>gpu_grads_step<K>.json` files exist
(`logger.grad_norms_file`), the parameters whose gradient norms differ most at that step.
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
        "step": np.array([r["step"] for r in rows]),
        "loss": np.array([r["train/loss"] for r in rows]),
        "grad_norm": np.array([r.get("train/grad_norm", np.nan) for r in rows]),
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


def relative_differences(run: dict[str, np.ndarray], reference: dict[str, np.ndarray], key: str):
    """(steps both runs logged, |run / reference - 1| of `key` at those steps)."""
    steps, in_run, in_reference = np.intersect1d(run["step"], reference["step"], return_indices=True)
    return steps, np.abs(run[key][in_run] / reference[key][in_reference] - 1)


def first_divergence(run: dict[str, np.ndarray], reference: dict[str, np.ndarray], tolerance: float) -> int | None:
    """The first step whose loss differs from the reference's by more than `tolerance` (relative), or None."""
    steps, relative = relative_differences(run, reference, "loss")
    over = np.flatnonzero(relative > tolerance)
    return int(steps[over[0]]) if len(over) else None


def worst_parameters(path: Path, reference: Path, count: int = 3) -> str:
    """The `count` parameters whose gradient norms (grad_norms_file JSON) differ most, relative, between two files."""
    a, b = (json.loads(p.read_text())["grad_norms"] for p in (path, reference))
    relative = {n: abs(a[n] / b[n] - 1) if b[n] else (np.inf if a[n] else 0.0) for n in b if n in a}
    worst = sorted(relative, key=relative.get, reverse=True)[:count]
    return ", ".join(f"`{name}` {relative[name]:.1%}" for name in worst)


def bisect_table(out: Path, model: str, arms: list[str], nproc: int, tolerance: float) -> str:
    """A markdown table: each arm's NPROC-GPU run against its 1-GPU run (same global batch)."""
    lines = [
        f"| Arm | Steps | Worst loss Δ (step) | Worst grad-norm Δ (step) | First step > {tolerance:.0%} | "
        f"Loss there, 1 / {nproc} GPUs | Largest per-parameter grad-norm Δ, step 1 | ... at the first step > "
        f"{tolerance:.0%} | Within {tolerance:.0%} |",
        "|---|--:|--:|--:|--:|--:|---|---|---|",
    ]
    for arm in arms:
        name = f"{model}_{arm}"
        paths = [out / f"{name}_1gpu.jsonl", out / f"{name}_{nproc}gpu.jsonl"]
        runs = [per_step(p) if p.exists() else None for p in paths]
        if any(r is None or len(r["loss"]) == 0 for r in runs):
            missing = ", ".join(p.name for p, r in zip(paths, runs, strict=True) if r is None or len(r["loss"]) == 0)
            lines.append(f"| {arm} | – | no metrics: {missing} (failed or not run; see its log) | | | | | | no |")
            continue
        reference, run = runs
        steps, loss = relative_differences(run, reference, "loss")
        _, grad = relative_differences(run, reference, "grad_norm")
        diverged = first_divergence(run, reference, tolerance)
        cells = ["–", "–", "–"]
        if diverged is not None:
            at = [float(r["loss"][r["step"] == diverged][0]) for r in (reference, run)]
            cells[0], cells[1] = str(diverged), f"{at[0]:.4f} / {at[1]:.4f}"
        grads = {step: [out / f"{name}_{n}gpu_grads_step{step}.json" for n in (nproc, 1)] for step in (1, diverged)}
        cells.append(worst_parameters(*grads[1]) if all(g.exists() for g in grads[1]) else "–")
        if diverged is not None and all(g.exists() for g in grads[diverged]):
            cells[2] = worst_parameters(*grads[diverged])
        ok = "yes" if diverged is None and len(steps) == len(reference["step"]) else "no"
        lines.append(
            f"| {arm} | {len(steps)} | {loss.max():.2%} ({int(steps[loss.argmax()])}) | "
            f"{np.nanmax(grad):.2%} ({int(steps[np.nanargmax(grad)])}) | {cells[0]} | {cells[1]} | {cells[3]} | "
            f"{cells[2]} | {ok} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="esm2_t12_35M_UR50D")
    parser.add_argument("--track", nargs=2, metavar=("RUN", "REFERENCE"), help="compare two runs' loss curves instead")
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--bisect", nargs="+", metavar="ARM", help="table of NPROC-GPU vs 1-GPU runs per arm")
    parser.add_argument("--first-divergence", metavar="ARM", help="print the arm's first step past --tolerance")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args()
    if args.bisect:
        print(bisect_table(args.out, args.model, args.bisect, args.nproc, args.tolerance))
        return
    if args.first_divergence:
        runs = [args.out / f"{args.model}_{args.first_divergence}_{n}gpu.jsonl" for n in (1, args.nproc)]
        if all(p.exists() for p in runs):
            step = first_divergence(per_step(runs[1]), per_step(runs[0]), args.tolerance)
            print("" if step is None else step)
        return
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
