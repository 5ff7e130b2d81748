"""benchmarks/scaling_report.py on metrics files in the real format, written here with known per-step values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scaling_report():
    spec = importlib.util.spec_from_file_location("scaling_report", RECIPE / "benchmarks" / "scaling_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(runs: Path, name: str, tokens_per_s: list[float], peaks: list[float], log: str = "") -> None:
    """A metrics JSONL as PerfLogger writes it (log every step), with a validation line and a torn last line."""
    lines = []
    for step, (speed, peak) in enumerate(zip(tokens_per_s, peaks, strict=True), start=1):
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "train/loss": 3.0,
                    "train/perplexity": 20.1,
                    "train/grad_norm": 1.0,
                    "train/lr": 1e-5,
                    "train/step_time_s": 0.1,
                    "train/tokens_per_s_per_gpu": speed,
                    "train/padded_tokens_per_s_per_gpu": speed,
                    "train/padding_fraction": 0.0,
                    "train/peak_memory_gib": peak,
                }
            )
        )
    lines.append(json.dumps({"step": len(lines), "val/loss": 2.9}))
    (runs / f"{name}.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "train/lo')
    (runs / f"{name}.log").write_text(log)


def manifest(runs: Path, rows: list[tuple]) -> None:
    text = "name\tkind\tmodel\tstrategy\tprecision\tnproc\twarmup\trc\n"
    (runs / "runs.tsv").write_text(text + "".join("\t".join(map(str, row)) + "\n" for row in rows))


def test_table_medians_efficiency_memory_and_failures(scaling_report, tmp_path: Path) -> None:
    warm = [1.0, 2.0]  # warm-up steps: slow, and excluded from the figures
    write_run(tmp_path, "m_ddp_1", [*warm, 100.0, 110.0, 90.0, 105.0, 95.0], [1.0, 2.0, 3.0, 3.5, 3.5, 3.5, 3.5])
    write_run(tmp_path, "m_ddp_2", [*warm, 80.0, 90.0, 85.0, 70.0, 100.0], [2.0, 4.0, 4.25, 4.25, 4.0, 4.0, 4.0])
    write_run(tmp_path, "m_fsdp2_2", [], [], log="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")
    write_run(tmp_path, "m_mfsdp_1", [], [], log="ValueError: train_mfsdp.py needs CUDA GPUs")
    manifest(
        tmp_path,
        [
            ("m_ddp_1", "sweep", "m", "ddp", "bf16", 1, 2, 0),
            ("m_ddp_2", "sweep", "m", "ddp", "bf16", 2, 2, 0),
            ("m_fsdp2_2", "sweep", "m", "fsdp2", "bf16", 2, 2, 1),
            ("m_mfsdp_1", "sweep", "m", "mfsdp", "bf16", 1, 2, 1),
            ("m_mfsdp_2", "sweep", "m", "mfsdp", "bf16", 2, 2, 124),  # no metrics, no log: never started
        ],
    )
    markdown = scaling_report.report(tmp_path, tmp_path / "out" / "scaling", "Test")
    rows = {line.split(" | ")[1] + line.split(" | ")[3]: line for line in markdown.splitlines()[4:]}
    # median of 100, 110, 90, 105, 95 = 100; min 90, max 110; peak 3.5 GiB; 1 GPU = 100% efficiency
    assert "| m | ddp | bf16 | 1 | 100 (90–110) | 100 | 100.0% | 3.50 | 5 | ok |" in markdown
    # median of 80, 90, 85, 70, 100 = 85 per GPU, 170 on both; efficiency 85 / 100
    assert "| m | ddp | bf16 | 2 | 85 (70–100) | 170 | 85.0% | 4.25 | 5 | ok |" in markdown
    assert "| m | fsdp2 | bf16 | 2 | – | – | – | – | 0 | OOM |" in markdown
    assert "| m | mfsdp | bf16 | 1 | – | – | – | – | 0 | failed (rc=1, 0 steps logged) |" in markdown
    assert "| m | mfsdp | bf16 | 2 | – | – | – | – | 0 | not run |" in markdown
    assert len(rows) == 5 and "Large model" not in markdown
    assert (tmp_path / "out" / "scaling.md").read_text() == markdown
    assert (tmp_path / "out" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_model_save_and_resume_times(scaling_report, tmp_path: Path) -> None:
    saved = (
        "[INFO] Parameters stored on this rank: 7.5 GiB of the model's 60 GiB.\n"
        "[INFO] Checkpoint of step 35 written in 41.5 s.\n"
        "[INFO] Checkpoint /x/step_0000035 published: 224.10 GiB, 63.2 s after the save began.\n"
    )
    write_run(tmp_path, "big", [5.0, 10.0, 12.0, 11.0], [50.0] * 4, log=saved)
    write_run(tmp_path, "big_resume", [], [], log="[INFO] Resumed from /x/step_0000035 (step 35) in 88.0 s.\n")
    write_run(tmp_path, "other", [], [], log="")
    manifest(
        tmp_path,
        [
            ("big", "big", "15B", "fsdp2", "fp8_block", 8, 1, 0),
            ("big_resume", "resume", "15B", "fsdp2", "fp8_block", 8, 1, 1),
            ("other", "big", "15B", "mfsdp", "bf16", 8, 1, 1),
        ],
    )
    markdown = scaling_report.report(tmp_path, tmp_path / "scaling")
    assert (
        "| 15B | fsdp2 | fp8_block | 8 | 11 (10–12) | 50.00 | 7.5 of 60 | 41.5 / 63.2, 224.10 | 88.0 (step 35) | "
        "ok / failed (rc=1, 0 steps logged) |" in markdown
    )
    assert "| 15B | mfsdp | bf16 | 8 | – | – | – | – | – | failed (rc=1, 0 steps logged) / not run |" in markdown
    assert not (tmp_path / "scaling.png").exists()  # no sweep run with figures: no chart
