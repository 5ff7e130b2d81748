"""Which code launched the GPU time of a profiled step: kernels of a torch.profiler Chrome trace by their caller.

    python benchmarks/kernel_sources.py outputs/.../profile/<model>_<budget>_<variant>_trace.json.gz [--top 40]

benchmark.py's profile tables name kernels and operators, but not who called them: a hidden-size copy or add shows as
`elementwise_kernel` whichever module ran it. Here every kernel is traced back through its launch (the CUDA runtime
call with the same correlation id) to the host operators and Python frames open on that thread at the launch, and
its time is summed per (kernel, innermost operator, autograd node, innermost Python frame outside torch).

Profile an eager variant (`te_thd_fp8_delayed`, not a graphed one): a CUDA-graph replay launches its kernels from
one runtime call, so they trace back to the replay only. Backward kernels launched by autograd's own threads have no
Python frame; their autograd node (e.g. `AddBackward0`, or a TE module's backward) says where they belong.
"""

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

TORCH_FRAMES = ("torch/nn/modules/", "torch/autograd/", "torch/utils/", "torch/_", "<built-in")


def caller_frame(frames: list[str]) -> str:
    """The innermost Python frame that is not torch's own plumbing (module calls, autograd, hooks)."""
    for frame in reversed(frames):
        if not any(part in frame for part in TORCH_FRAMES):
            return frame
    return frames[-1] if frames else "-"


def launch_contexts(events: list[dict]) -> dict[int, tuple[str, str, str]]:
    """The (innermost operator, autograd node, caller frame) of every kernel launch on the host, by correlation id."""
    by_thread: dict[tuple, list[dict]] = defaultdict(list)
    for event in events:
        if event.get("cat") in ("cpu_op", "python_function", "cuda_runtime", "cuda_driver"):
            by_thread[(event["pid"], event["tid"])].append(event)
    contexts = {}
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        open_events: list[dict] = []
        for event in thread_events:
            while open_events and open_events[-1]["ts"] + open_events[-1].get("dur", 0) <= event["ts"]:
                open_events.pop()
            if event["cat"] in ("cuda_runtime", "cuda_driver"):
                correlation = event.get("args", {}).get("correlation")
                if correlation is None:
                    continue
                ops = [e["name"] for e in open_events if e["cat"] == "cpu_op"]
                node = next((name.split(": ", 1)[1] for name in ops if name.startswith("autograd::engine")), "-")
                frames = [e["name"] for e in open_events if e["cat"] == "python_function"]
                contexts[correlation] = (ops[-1] if ops else "-", node, caller_frame(frames))
            else:
                open_events.append(event)
    return contexts


def kernel_sources(trace: Path) -> tuple[list[tuple[float, int, tuple[str, ...]]], float]:
    """(total µs, calls, (kernel, operator, autograd node, frame)) rows, largest first, and the kernels' total µs."""
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as handle:
        events = [e for e in json.load(handle)["traceEvents"] if e.get("ph") == "X"]
    contexts = launch_contexts(events)
    totals: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        context = contexts.get(event.get("args", {}).get("correlation"), ("-", "-", "-"))
        entry = totals[(event["name"][:70], *context)]
        entry[0] += event.get("dur", 0)
        entry[1] += 1
    rows = sorted(((us, int(calls), key) for key, (us, calls) in totals.items()), reverse=True)
    return rows, sum(us for us, _, _ in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    rows, total = kernel_sources(args.trace)
    print(f"{args.trace.name}: {total / 1e3:.1f} ms of GPU time in {sum(calls for _, calls, _ in rows)} kernels")
    print("share | ms | calls | kernel | operator | autograd node | caller")
    for us, calls, (kernel, op, node, frame) in rows[: args.top]:
        print(f"{us / total:6.1%} | {us / 1e3:7.2f} | {calls:5d} | {kernel} | {op} | {node} | {frame}")


if __name__ == "__main__":
    main()
