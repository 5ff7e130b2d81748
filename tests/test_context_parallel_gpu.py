"""Context parallelism on 2 GPUs against 1: TE's ring attention on a packed batch of real proteins.

Run on a machine with 2+ CUDA GPUs and TransformerEngine:  python -m pytest tests/test_context_parallel_gpu.py -q -s
It launches `torchrun --nproc_per_node=2 benchmarks/cp_equivalence.py`: ESM-2 8M and the tiny AMPLIFY, the same
packed batch whole on each GPU and split over both (cp_size=2), logits, loss and summed gradients within 2e-2
relative L2 (BF16 weights, and FP32 weights under BF16 autocast; TE has no FP32 attention under CP), for TE's p2p,
all_gather and a2a exchanges. The training-level checks (100 steps, FP8, stop-and-go, elastic resume, throughput and
memory) are benchmarks/cp_check.sh.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import RECIPE_DIR
from gpu_checks import record

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multi_gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
        reason="needs CUDA GPUs and TransformerEngine",
    ),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs"),
]


def test_two_gpus_with_cp_match_one_gpu_holding_the_whole_batch(tmp_path):
    out = tmp_path / "cp_equivalence.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, "benchmarks/cp_equivalence.py", "--out", str(out)],
        cwd=RECIPE_DIR,
        env={
            **os.environ,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1"),
            "HF_HUB_OFFLINE": "1",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-5000:]
    results = json.loads(out.read_text())
    for case in results:
        record(f"cp2_{case['model']}_{case['dtype']}_{case['cp_comm_type']}", **case)
    failed = [case for case in results if not case["ok"]]
    assert not failed and result.returncode == 0, json.dumps(failed, indent=1) + result.stderr[-3000:]
