"""Weights & Biases logging of a real run (offline, nothing leaves the machine) and `plot_metrics.py` on its file."""

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RECIPE_DIR, compose, launch, read_metrics

from distributed import DistributedContext
from perf_logger import NonFiniteTrainingError, PerfLogger
from plot_metrics import TOKENS_PER_S, TRAIN_LOSS, VAL_LOSS, plot_metrics, read_records, render, series

STEPS, LOG_EVERY = 6, 2  # three training log steps; validation once, after the last step


def offline_wandb_env(root: Path) -> dict[str, str]:
    """Offline and isolated: no user settings or caches read; the server address is a closed port of this machine."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
    }


def read_wandb_log(path: Path) -> list:
    """The records of a run's `.wandb` transaction log (wandb 0.31 has no Python reader of it any more).

    The format is LevelDB's log behind a 7-byte header (":W&B", magic 0xBEE1, version 0): 32 KiB blocks of chunks,
    each with a CRC-32 of its type and data, a length and a type (full, or first/middle/last of a split record);
    the records are `wandb_internal_pb2.Record` messages.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is zero padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"bad chunk checksum at byte {position}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def values(items) -> dict:
    """A history row's or summary update's metrics by name; recent wandb puts the name in `nested_key`, not `key`."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def offline_run(wandb_dir: Path) -> tuple[Path, list]:
    (run_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    return run_dir, read_wandb_log(log)


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short L0_sanity run on CPU with wandb offline and a metrics file: (its metrics file, its wandb dir)."""
    root = tmp_path_factory.mktemp("wandb_run")
    metrics_file, wandb_dir = root / "run_metrics.jsonl", root / "wandb_dir"
    result = launch(
        [
            "train_fsdp2.py",
            "--config-name",
            "L0_sanity",
            f"num_train_steps={STEPS}",
            f"logger.log_every_n_steps={LOG_EVERY}",
            f"validation.every_n_steps={STEPS}",
            "validation.max_batches=1",
            f"logger.metrics_file={metrics_file}",
            "wandb.enabled=true",
            "wandb.mode=offline",
            f"wandb.dir={wandb_dir}",
        ],
        root,
        env=offline_wandb_env(root),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return metrics_file, wandb_dir


@pytest.mark.e2e
def test_offline_wandb_run_holds_the_config_and_the_metrics_file_values(trained):
    metrics_file, wandb_dir = trained
    written = read_metrics(metrics_file)
    train = [m for m in written if TRAIN_LOSS in m]
    (val,) = [m for m in written if VAL_LOSS in m]
    assert [m["step"] for m in train] == [2, 4, 6] and val["step"] == STEPS

    run_dir, records = offline_run(wandb_dir)
    # wandb 0.31 writes no files/config.yaml or files/wandb-summary.json offline (its sender writes them, at sync):
    # the config and the metrics are in the transaction log only
    (run,) = of_type(records, "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.project == "esm2-te"
    assert config["model_tag"] == "esm2_t6_8M_UR50D"
    assert config["optimizer"]["lr"] == 1e-3
    assert config["num_train_steps"] == STEPS
    assert config["wandb"] == dict(enabled=True, project="esm2-te", name=None, mode="offline", dir=str(wandb_dir))

    history = {row.step.num: values(row.item) for row in of_type(records, "history")}
    assert sorted(history) == [2, 4, 6]  # validation at step 6 joins that step's training row
    for m in train:
        row = history[m["step"]]
        for key in (TRAIN_LOSS, TOKENS_PER_S, "train/lr", "train/grad_norm", "train/padding_fraction"):
            assert row[key] == m[key], (m["step"], key)
        assert row["_step"] == m["step"]
    assert history[STEPS][VAL_LOSS] == val[VAL_LOSS] and history[STEPS]["val/perplexity"] == val["val/perplexity"]
    assert VAL_LOSS not in history[2] and VAL_LOSS not in history[4]
    assert train[0][TRAIN_LOSS] != train[-1][TRAIN_LOSS]  # the rows compared are distinct values, not one repeated

    summary: dict = {}
    for update in of_type(records, "summary"):
        summary.update(values(update.update))
    assert summary[TRAIN_LOSS] == train[-1][TRAIN_LOSS] and summary[VAL_LOSS] == val[VAL_LOSS]
    (exit_record,) = of_type(records, "exit")
    assert exit_record.exit_code == 0
    core_log = (run_dir / "logs" / "debug-internal.log").read_text()
    assert '"level":"ERROR"' not in core_log, core_log[-2000:]


def test_a_diverged_run_is_marked_failed_in_wandb(tmp_path, monkeypatch):
    """The loop closes the logger in a `finally`: wandb must hear that the run failed, not that it finished."""
    import wandb

    for name, value in offline_wandb_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    cfg = compose(
        "L0_sanity",
        ["logger.log_every_n_steps=1", "wandb.enabled=true", "wandb.mode=offline", f"wandb.dir={tmp_path}"],
    )
    perf = PerfLogger(cfg, DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    try:
        with pytest.raises(NonFiniteTrainingError):
            try:
                perf.log_step(1, torch.tensor(float("nan")), torch.tensor(1.0), 1e-3, tokens=100, padded_tokens=100)
            finally:
                perf.close()
    finally:
        wandb.teardown()
    _, records = offline_run(tmp_path)
    (exit_record,) = of_type(records, "exit")
    assert exit_record.exit_code == 1


@pytest.mark.e2e
def test_plot_of_a_real_run_draws_the_files_values(trained, tmp_path):
    metrics_file, _ = trained
    written = read_metrics(metrics_file)
    figure, output = render(metrics_file, tmp_path / "plot.png")
    assert output == tmp_path / "plot.png"
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    image = imread(output)
    width, height = (figure.get_size_inches() * figure.dpi).round().astype(int)
    assert image.shape[:2] == (height, width) == (700, 900)
    # the training-loss line's colour (matplotlib's first, C0) and the throughput line's (tab:green) are drawn
    for colour in ((0x1F, 0x77, 0xB4), (0x2C, 0xA0, 0x2C)):
        assert (np.abs(image[..., :3] * 255 - colour).max(axis=-1) < 8).sum() > 100, colour

    loss_axes, speed_axes = figure.axes
    lines = {line.get_label(): line for line in loss_axes.get_lines()}
    train = [m for m in written if TRAIN_LOSS in m]
    (val,) = [m for m in written if VAL_LOSS in m]
    assert list(lines["training loss"].get_xdata()) == [m["step"] for m in train] == [2, 4, 6]
    assert list(lines["training loss"].get_ydata()) == [m[TRAIN_LOSS] for m in train]
    assert list(lines["validation loss"].get_xdata()) == [STEPS]
    assert list(lines["validation loss"].get_ydata()) == [val[VAL_LOSS]]
    (speed,) = speed_axes.get_lines()
    assert list(speed.get_xdata()) == [2, 4, 6]
    assert list(speed.get_ydata()) == [m[TOKENS_PER_S] for m in train]
    assert all(value > 0 for value in speed.get_ydata())


@pytest.mark.e2e
def test_the_command_line_writes_the_png_beside_the_metrics_file(trained, tmp_path):
    copy = tmp_path / "run_metrics.jsonl"
    copy.write_bytes(trained[0].read_bytes())
    result = subprocess.run(
        [sys.executable, str(RECIPE_DIR / "plot_metrics.py"), str(copy)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "run_metrics.png")
    assert (tmp_path / "run_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_runs_repeated_steps_plot_once_with_the_later_values(tmp_path):
    """A resumed run appends the steps after its checkpoint again: the curve follows the resumed job, in step order."""
    lines = [
        {"step": 2, TRAIN_LOSS: 3.4, TOKENS_PER_S: 100.0},
        {"step": 4, TRAIN_LOSS: 3.2, TOKENS_PER_S: 110.0},
        {"step": 4, VAL_LOSS: 3.25},
        {"step": 6, TRAIN_LOSS: 3.1, TOKENS_PER_S: 120.0},  # the first job dies after step 6, its checkpoint is step 4
        {"step": 6, TRAIN_LOSS: 3.05, TOKENS_PER_S: 90.0},  # the resumed job
        {"step": 8, TRAIN_LOSS: 2.9, TOKENS_PER_S: 95.0},
        {"step": 8, VAL_LOSS: 2.95},
    ]
    path = tmp_path / "resumed.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")  # a blank last line is fine
    records = read_records(path)
    assert series(records, TRAIN_LOSS) == ([2, 4, 6, 8], [3.4, 3.2, 3.05, 2.9])
    assert series(records, VAL_LOSS) == ([4, 8], [3.25, 2.95])
    loss_axes, speed_axes = plot_metrics(records).axes
    (train, val) = loss_axes.get_lines()
    assert list(train.get_ydata()) == [3.4, 3.2, 3.05, 2.9]
    assert list(val.get_xdata()) == [4, 8]
    assert list(speed_axes.get_lines()[0].get_ydata()) == [100.0, 110.0, 90.0, 95.0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such metrics file"),
        ("", "is empty: the run has not reached its first log step"),
        ("\n\n", "is empty"),
        ('{"step": 4, "val/perplexity": 21.8}\n', "has no loss records ('train/loss' or 'val/loss')"),
        ('{"step": 2, "train/loss": 3.4}\n{"step": 4, "train/lo', "line 2: not a JSON line"),
    ],
)
def test_a_file_with_nothing_to_plot_stops_with_one_line(tmp_path, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=re.escape(message)) as stopped:
        render(path)
    assert "\n" not in str(stopped.value.code) and str(path) in str(stopped.value.code)
    assert not path.with_suffix(".png").exists()


@pytest.mark.e2e
def test_the_command_line_reports_an_empty_file_without_a_traceback(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    result = subprocess.run(
        [sys.executable, str(RECIPE_DIR / "plot_metrics.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "not-a-backend"},  # matplotlib is not even imported before the error
    )
    assert result.returncode == 1
    assert result.stderr == f"{path} is empty: the run has not reached its first log step\n"
    assert not path.with_suffix(".png").exists()
