"""Time rotary.py's packed RoPE kernel against TE's fused THD kernel, forward and backward, on one GPU.

    python benchmarks/rope_kernels.py [--tokens 16384] [--repeats 5] [--calls 50] [--out rope_kernels.json]

Every shape is a query view of a fused QKV buffer as TE's attention hands it over (strided), packed from real sample
protein lengths (cropped to 1,024); the backward takes a contiguous gradient, as attention returns it. Each kernel's
``calls`` back-to-back calls are captured in a CUDA graph (no host time in the figure); repeats replay the graphs
interleaved (TE, ours, TE, ours, ...), timed with CUDA events. Rows give the median and min-max of the repeats per
call, and the bandwidth that reading and writing the tensor once at that time means.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert import rotary_inverse_frequencies
from rotary import packed_rotary

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "938293.PRJEB85.HG003687.faa"
# name: (heads, head_dim, interleaved) of the models' attention
SHAPES = {
    "ESM-2 150M": (20, 32, False),
    "ESM-2 650M": (20, 64, False),
    "ESM-2 3B": (40, 64, False),
    "AMPLIFY 350M": (15, 64, True),
}


def sample_cu_seqlens(tokens: int, max_length: int = 1024) -> torch.Tensor:
    """Real protein lengths (+2 specials, cropped) packed in file order up to ``tokens``; the rest is padding."""
    lengths, total = [], 0
    for block in SAMPLE.read_text().split(">")[1:]:
        length = min(len("".join(block.splitlines()[1:])) + 2, max_length)
        if total + length > tokens:
            break
        lengths.append(length)
        total += length
    lengths.append(tokens - total)
    return torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)


def captured(fn, calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` back-to-back calls of ``fn`` in one CUDA graph, so that host time is not in the timing."""
    fn()  # compile / initialise outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    """Mean microseconds per call of one replay."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / calls


def measure(name: str, tokens: int, repeats: int, calls: int) -> list[dict]:
    import transformer_engine.pytorch  # noqa: F401 (loads the library that TE's extension module needs)
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.attention.rope import QKVFormat

    from modeling_amplify_te import AmplifyRotaryEmbedding
    from modeling_esm_te import EsmRotaryEmbedding
    from rotary import rotate

    heads, head_dim, interleaved = SHAPES[name]
    cu_seqlens = sample_cu_seqlens(tokens)
    rows = 1024
    table = (AmplifyRotaryEmbedding if interleaved else EsmRotaryEmbedding)(head_dim, 10000.0, torch.device("cuda"))
    freqs = table(rows).float()
    rope = packed_rotary(rotary_inverse_frequencies(head_dim, 10000.0, device="cuda"), cu_seqlens, tokens, rows)
    qkv = torch.randn(tokens, heads, 3, head_dim, device="cuda", dtype=torch.bfloat16)
    query = qkv[:, :, 0, :]  # the strided view TE's attention passes to RoPE
    grad = torch.randn(tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)  # contiguous, from attention
    thd = QKVFormat["thd"]
    calls_of = {
        ("te", "forward"): lambda: tex.fused_rope_forward(query, freqs, None, thd, interleaved, cu_seqlens, 1, 0),
        ("te", "backward"): lambda: tex.fused_rope_backward(grad, freqs, None, thd, interleaved, cu_seqlens, 1, 0),
        ("triton", "forward"): lambda: rotate(query, *rope.tensors(), interleaved),
        ("triton", "backward"): lambda: rotate(grad, *rope.tensors(), interleaved, inverse=True),
    }
    graphs = {key: captured(fn, calls) for key, fn in calls_of.items()}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in graphs}
    for _ in range(repeats):
        for key, graph in graphs.items():
            times[key].append(replay_us(graph, calls))
    moved = 2 * tokens * heads * head_dim * 2  # bytes: read and write the tensor once, BF16
    rows_out = []
    for (kernel, direction), values in times.items():
        median = statistics.median(values)
        rows_out.append(
            {
                "shape": name,
                "tokens": tokens,
                "kernel": kernel,
                "direction": direction,
                "us_median": median,
                "us_min": min(values),
                "us_max": max(values),
                "us_repeats": values,
                "effective_TBps": moved / median / 1e6,
            }
        )
    del graphs
    torch.cuda.empty_cache()
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [row for name in SHAPES for row in measure(name, args.tokens, args.repeats, args.calls)]
    device = torch.cuda.get_device_name()
    print(f"{device}, {args.tokens} tokens, {args.repeats} interleaved repeats of {args.calls} calls")
    print("| shape | direction | TE fused THD, us (min-max) | rotary.py, us (min-max) | speed-up | rotary.py TB/s |")
    print("|---|---|--:|--:|--:|--:|")
    for name in SHAPES:
        for direction in ("forward", "backward"):
            te_row, ours = (
                next(r for r in rows if r["shape"] == name and r["direction"] == direction and r["kernel"] == k)
                for k in ("te", "triton")
            )
            print(
                f"| {name} | {direction} | {te_row['us_median']:.1f} ({te_row['us_min']:.1f}-{te_row['us_max']:.1f}) "
                f"| {ours['us_median']:.1f} ({ours['us_min']:.1f}-{ours['us_max']:.1f}) "
                f"| {te_row['us_median'] / ours['us_median']:.2f}x | {ours['effective_TBps']:.2f} |"
            )
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
