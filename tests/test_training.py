"""End-to-end runs of the training entrypoint on CPU (gloo)."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import RECIPE_DIR, compose

from config_validation import ConfigError, validate_config
from model import ModelConfigError, load_model_config, resolve_use_te

pytestmark = pytest.mark.slow


def run_entrypoint(args, tmp_path, timeout=600, torchrun_procs=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if torchrun_procs else "2"}
    launcher = [sys.executable]
    if torchrun_procs:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
    return subprocess.run(
        [*launcher, *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=RECIPE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_l0_sanity_trains_and_loss_falls(tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    result = run_entrypoint(
        ["train_fsdp2.py", "--config-name", "L0_sanity", "num_train_steps=30", f"logger.metrics_file={metrics_file}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference transformers EsmForMaskedLM (use_te=auto: no CUDA device is visible)" in result.stdout
    train = [m for m in read_metrics(metrics_file) if "train/loss" in m]
    assert [m["step"] for m in train] == [10, 20, 30]
    losses = [m["train/loss"] for m in train]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] < math.log(33) + 0.3  # starts near uniform guessing over the vocabulary
    assert losses[-1] < losses[0] - 0.15, losses
    last = train[-1]
    assert 0 < last["train/padding_fraction"] < 0.5
    assert last["train/tokens_per_s_per_gpu"] > 0 and last["train/peak_memory_gib"] > 0
    # warm-up over 10 steps, linear decay until step int(0.9 * 30) = 27, then 10% of the peak
    assert train[1]["train/lr"] == pytest.approx(1e-3 * (1 - 0.9 * (20 - 10) / (27 - 10)))
    assert last["train/lr"] == pytest.approx(1e-4)


def test_two_process_fsdp2_ranks_train_on_disjoint_samples(tmp_path):
    result = run_entrypoint(
        [
            "tests/sample_log_probe.py",
            str(tmp_path),
            "train_fsdp2",
            "num_train_steps=12",
            "dataset.micro_batch_size=4",
            "dataset.max_seq_length=64",
        ],
        tmp_path,
        torchrun_procs=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(rank0) == len(rank1) == 48
    assert set(rank0).isdisjoint(rank1)
    assert len(set(rank0)) == 48


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_train_steps=0", "num_train_steps=0: must be a positive integer"),
        ("dataset.micro_batch_size=-2", "dataset.micro_batch_size=-2: must be a positive integer"),
        ("grad_acc_steps=0", "grad_acc_steps=0"),
        ("dataset.max_seq_length=2048", "from 3 to the model's max_position_embeddings (1026)"),
        ("optimizer.lr=0", "optimizer.lr=0: must be positive"),
        ("use_te=maybe", "use_te='maybe'"),
        ("fp32_residual_connection=yes", "fp32_residual_connection='yes': must be true or false"),
    ],
)
def test_bad_values_are_reported_clearly(override, message):
    cfg = compose("L0_sanity", [override])
    with pytest.raises(ConfigError, match="Invalid configuration") as error:
        validate_config(cfg, load_model_config(cfg.model_tag), use_te=False)
    assert message in str(error.value)


def test_all_problems_are_listed_at_once():
    cfg = compose("L0_sanity", ["num_train_steps=-1", "dataset.micro_batch_size=0"])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, load_model_config(cfg.model_tag), use_te=False)
    assert "num_train_steps" in str(error.value) and "micro_batch_size" in str(error.value)


def test_unknown_model_config_lists_the_shipped_ones():
    with pytest.raises(ModelConfigError, match=r"esm2_t99_1T.*esm2_t12_35M_UR50D.*esm2_t6_8M_UR50D"):
        load_model_config("esm2_t99_1T")


def test_use_te_true_without_gpu_is_refused_clearly():
    with pytest.raises(ModelConfigError, match="use_te=true but no CUDA device is visible"):
        resolve_use_te("true")
    assert resolve_use_te("false") == (False, "reference transformers EsmForMaskedLM (use_te=false)")


def test_bad_input_stops_the_entrypoint_before_training(tmp_path):
    result = run_entrypoint(
        ["train_fsdp2.py", "--config-name", "L0_sanity", "dataset.path=/nonexistent/uniref50.parquet"], tmp_path
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "dataset.path='/nonexistent/uniref50.parquet' does not exist" in output
    assert "step 1" not in output and "train:" not in output
