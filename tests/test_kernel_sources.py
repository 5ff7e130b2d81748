"""benchmarks/kernel_sources.py on a Chrome trace in torch.profiler's format, written here with known launches."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from benchmarks import kernel_sources

MAIN, AUTOGRAD = 11, 12  # host threads: the Python one, and one of autograd's


def span(cat: str, name: str, tid: int, ts: float, dur: float, correlation: int | None = None) -> dict:
    event = {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def test_kernels_are_summed_by_the_code_that_launched_them(tmp_path: Path) -> None:
    events = [
        # forward: two residual adds from the same frame, called through torch's module plumbing
        span("python_function", "transformer_engine/pytorch/transformer.py(1033): _bias_dropout_add", MAIN, 0, 100),
        span("python_function", "torch/nn/modules/module.py(1775): _call_impl", MAIN, 1, 90),
        span("cpu_op", "aten::add", MAIN, 2, 80),
        span("cuda_runtime", "cudaLaunchKernel", MAIN, 3, 2, correlation=1),
        span("cuda_runtime", "cudaLaunchKernel", MAIN, 40, 2, correlation=2),
        # a copy launched after the frames above closed, from the loop itself
        span("python_function", "training.py(90): step", MAIN, 200, 50),
        span("cpu_op", "aten::copy_", MAIN, 201, 40),
        span("cuda_runtime", "cudaMemcpyAsync", MAIN, 202, 3, correlation=3),
        # backward: autograd's thread, no Python frame
        span("cpu_op", "autograd::engine::evaluate_function: AddBackward0", AUTOGRAD, 300, 50),
        span("cpu_op", "aten::add_", AUTOGRAD, 301, 40),
        span("cuda_runtime", "cudaLaunchKernel", AUTOGRAD, 302, 2, correlation=4),
        # device side
        span("kernel", "vectorized_elementwise_kernel<8, add>", 7, 10, 30.0, correlation=1),
        span("kernel", "vectorized_elementwise_kernel<8, add>", 7, 50, 30.0, correlation=2),
        span("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 7, 210, 15.0, correlation=3),
        span("kernel", "vectorized_elementwise_kernel<8, add>", 7, 310, 25.0, correlation=4),
        span("kernel", "orphan_kernel", 7, 400, 5.0, correlation=99),  # its launch was not recorded
    ]
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as handle:
        json.dump({"traceEvents": events}, handle)

    rows, total = kernel_sources.kernel_sources(trace)
    assert total == 105.0
    assert rows == [
        (
            60.0,
            2,
            (
                "vectorized_elementwise_kernel<8, add>",
                "aten::add",
                "-",
                "transformer_engine/pytorch/transformer.py(1033): _bias_dropout_add",
            ),
        ),
        (25.0, 1, ("vectorized_elementwise_kernel<8, add>", "aten::add_", "AddBackward0", "-")),
        (15.0, 1, ("Memcpy DtoD (Device -> Device)", "aten::copy_", "-", "training.py(90): step")),
        (5.0, 1, ("orphan_kernel", "-", "-", "-")),
    ]
