"""End-to-end runs of the training entrypoints on CPU (gloo): the loop, the schedule, data sharding, bad input."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import RECIPE_DIR, compose, launch, read_metrics

from model import build_model, load_model_config
from training import TeardownGuard, evaluate


@pytest.mark.e2e
def test_l0_sanity_trains_and_loss_falls(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    result = launch(
        ["train_fsdp2.py", "--config-name", "L0_sanity", "num_train_steps=30", f"logger.metrics_file={metrics_file}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference transformers EsmForMaskedLM (use_te=auto: no CUDA device is visible)" in result.stdout
    # a batch log (not a terminal): no progress-bar frames, and one closing line with the figures
    assert "\r" not in result.stdout + result.stderr
    summary = re.search(r"Run finished at step 30 of 30 \(30 steps in this job\): ([\d,]+) tokens in", result.stdout)
    assert summary, result.stdout[-2000:]
    train = [m for m in read_metrics(metrics_file) if "train/loss" in m]
    assert [m["step"] for m in train] == [10, 20, 30]
    losses = [m["train/loss"] for m in train]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] < math.log(33) + 0.3  # starts near uniform guessing over the vocabulary
    assert losses[-1] < losses[0] - 0.15, losses
    last = train[-1]
    assert f"train loss {last['train/loss']:.4g}" in result.stdout
    assert 0 < last["train/padding_fraction"] < 0.5
    assert last["train/tokens_per_s_per_gpu"] > 0 and last["train/peak_memory_gib"] > 0
    # warm-up over 10 steps, linear decay until step int(0.9 * 30) = 27, then 10% of the peak
    assert train[1]["train/lr"] == pytest.approx(1e-3 * (1 - 0.9 * (20 - 10) / (27 - 10)))
    assert last["train/lr"] == pytest.approx(1e-4)


@pytest.mark.e2e
def test_two_process_fsdp2_ranks_train_on_disjoint_samples(tmp_path):
    result = launch(
        [
            "tests/sample_log_probe.py",
            str(tmp_path),
            "train_fsdp2",
            "num_train_steps=12",
            "dataset.micro_batch_size=4",
            "dataset.max_seq_length=64",
        ],
        tmp_path,
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(rank0) == len(rank1) == 48
    assert set(rank0).isdisjoint(rank1)
    assert len(set(rank0)) == 48


@pytest.mark.e2e
def test_bad_input_stops_the_entrypoint_before_training(tmp_path):
    result = launch(
        ["train_fsdp2.py", "--config-name", "L0_sanity", "dataset.path=/nonexistent/uniref50.parquet"], tmp_path
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "dataset.path='/nonexistent/uniref50.parquet' does not exist" in output
    assert "step 1" not in output and "train:" not in output


def test_validation_loss_is_the_mean_over_every_masked_token(tokenizer):
    """Two batches with different numbers of masked tokens: the loss weighs tokens, not batches."""
    cfg = compose("L0_sanity")
    model = build_model(cfg, load_model_config(cfg.model_tag), use_te=False, attn_input_format="bshd", device="cpu")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for masked in (1, 7):
        input_ids = torch.randint(4, 24, (2, 12), generator=generator)
        labels = torch.full_like(input_ids, -100)
        labels[0, :masked] = input_ids[0, :masked]
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    metrics = evaluate(model, batches, torch.device("cpu"), max_batches=10)
    with torch.no_grad():
        logits = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    losses = torch.cat([torch.nn.functional.cross_entropy(lg[b["labels"] != -100], b["labels"][b["labels"] != -100],
                        reduction="none") for lg, b in zip(logits, batches, strict=True)])  # fmt: skip
    assert losses.numel() == 8
    assert metrics["val/loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert evaluate(model, batches, torch.device("cpu"), max_batches=1)["val/loss"] == pytest.approx(
        losses[:1].mean().item(), rel=1e-5
    )


def test_a_teardown_that_blocks_ends_the_process_with_success_and_a_cancelled_guard_never_fires():
    """The guard `run` arms once all is written: a blocked teardown (here: a wait that never ends) exits with 0."""
    blocked = "import threading, training; training.TeardownGuard(0.5).arm(); threading.Event().wait()"
    result = subprocess.run(
        [sys.executable, "-c", blocked], cwd=RECIPE_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "Teardown of the finished run did not end within 0.5 s; exiting (all is saved)." in result.stderr
    guard = TeardownGuard(0.5)
    guard.arm()
    guard.cancel()
    guard._timer.join(timeout=5)  # a cancelled timer thread ends at once, without running
    assert not guard._timer.is_alive() and guard._timer.finished.is_set()  # cancel() sets it; the run never came
