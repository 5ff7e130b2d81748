"""Checkpoints on CPU (gloo, FP32): exact stop-and-go, crashes mid-write, full disks, elastic resume, export."""

import json
import os
import re
import signal
import subprocess
import sys
import zlib

import pytest
import torch
import xxhash
from conftest import RECIPE_DIR, compose, launch, read_fasta_sequences
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForMaskedLM, AutoTokenizer

from checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointParts,
    DistributedStateDict,
    ModelAndOptimizer,
    NonFiniteStateError,
    TEExtraState,
    check_writable,
    file_digest,
    list_checkpoints,
    load_small_file,
    verify_manifest,
)
from distributed import DistributedContext
from precision import PrecisionPlan

SMALL = [
    "dataset.max_seq_length=64",
    "dataset.micro_batch_size=4",
    "validation.every_n_steps=0",
    "logger.log_every_n_steps=1",
    "logger.progress_bar=false",
]


def losses(metrics_file):
    return {m["step"]: m["train/loss"] for m in map(json.loads, metrics_file.read_text().splitlines())}


@pytest.mark.e2e
@pytest.mark.parametrize("entrypoint", ["train_ddp.py"])  # FSDP2: the SIGTERM test below, same assertions
def test_stop_and_go_gives_bit_identical_losses(tmp_path, entrypoint):
    common = [entrypoint, "--config-name", "L0_sanity", *SMALL, "num_train_steps=12", "dataset.num_workers=1"]
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    ckpt = f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"
    result = launch([*common, f"logger.metrics_file={straight}", "checkpoint.ckpt_dir=null"], tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    first = launch([*common, f"logger.metrics_file={resumed}", ckpt, "checkpoint.exit_after_n_steps=6"], tmp_path, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(losses(resumed)) == list(range(1, 7))
    second = launch([*common, f"logger.metrics_file={resumed}", ckpt], tmp_path, nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stdout and "(step 6)" in second.stdout
    assert losses(resumed) == losses(straight)  # every one of the 12 losses, bit for bit
    assert len(losses(straight)) == 12


@pytest.mark.e2e
def test_killed_mid_write_resumes_from_the_previous_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    args = [
        "tests/sample_log_probe.py",
        str(tmp_path),
        "train_fsdp2",
        *SMALL,
        "num_train_steps=9",
        f"checkpoint.ckpt_dir={ckpt_dir}",
        "checkpoint.save_every_n_steps=3",
        "checkpoint.max_checkpoints=2",
        f"logger.metrics_file={tmp_path / 'metrics.jsonl'}",
    ]
    killed = launch(args, tmp_path, env={"PROBE_KILL_AT_PUBLISH": "6"})
    assert killed.returncode == -9
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [3]
    assert (ckpt_dir / "step_0000006.tmp").is_dir()  # killed while this one was being written

    resumed = launch(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "(step 3)" in resumed.stdout
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [9, 6]  # pruned to max_checkpoints=2
    assert not list(ckpt_dir.glob("*.tmp"))
    assert all(verify_manifest(path) is None for _, path in list_checkpoints(ckpt_dir))

    # the exported final model is the model of the last checkpoint, loadable by plain transformers
    final_model = AutoModelForMaskedLM.from_pretrained(ckpt_dir / "final_model")
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / "final_model")
    dcp_to_torch_save(ckpt_dir / "step_0000009" / "model_optim", tmp_path / "step9.pt")
    saved = torch.load(tmp_path / "step9.pt", weights_only=False)["model"]
    exported = load_file(ckpt_dir / "final_model" / "model.safetensors")
    for name, tensor in final_model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    assert set(exported) <= set(final_model.state_dict())
    inputs = tokenizer(read_fasta_sequences(2), return_tensors="pt", padding=True)
    assert torch.isfinite(final_model(**inputs).logits).all()
    # its model card names the model, the data and how far training went
    card = (ckpt_dir / "final_model" / "README.md").read_text()
    parameters = sum(p.numel() for p in final_model.parameters())  # the tied decoder counts once
    assert f"(esm2_t6_8M_UR50D, {parameters:,} parameters)" in card
    assert "- Training data: `data/sample/938293.PRJEB85.HG003687.faa`, 1,995 training sequences, cropped to 64" in card
    last = losses(tmp_path / "metrics.jsonl")[9]
    assert "9 optimizer steps" in card and "in steps 4–9 (the last job)" in card
    assert f"Final train loss {last:.4g} (last log window); validation loss –" in card
    assert "Precision: FP32 (CPU); FP32 master weights." in card
    tokens = re.search(r"([\d,]+) tokens in steps 4–9", card)
    assert tokens and int(tokens[1].replace(",", "")) > 6 * 4 * 3  # six steps of four sequences of > 3 tokens
    assert f"{tokens[1]} tokens in" in resumed.stdout  # the run's closing line gives the same count

    # a truncated newest checkpoint is recognised and skipped
    shard = next((ckpt_dir / "step_0000009" / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    again = launch([*args[:4], *SMALL, "num_train_steps=10", *args[-4:]], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Skipping checkpoint" in again.stdout and "step_0000009" in again.stdout
    assert "(step 6)" in again.stdout
    # 10 steps instead of 9: the schedule change is named, and the rate goes on from step 6's (still warming up)
    assert "schedule differs from the checkpoint's (num_train_steps 9 -> 10)" in again.stdout + again.stderr
    lrs = {m["step"]: m["train/lr"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert lrs[7] == pytest.approx(7e-4) and lrs[9] == pytest.approx(9e-4)


@pytest.mark.e2e
def test_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    result = launch(
        [
            "tests/sample_log_probe.py",
            str(tmp_path),
            "train_fsdp2",
            *SMALL,
            "num_train_steps=6",
            f"checkpoint.ckpt_dir={ckpt_dir}",
            "checkpoint.save_every_n_steps=2",
            "checkpoint.save_final_model=false",
        ],
        tmp_path,
        env={"PROBE_FAIL_SAVE": "4"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Saving the checkpoint of step 4 failed (no space left on device: the checkpoint needs about" in log
    assert "GiB are free in" in log
    assert "the previous checkpoint step_0000002 is intact" in log
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [6, 2]
    assert not list(ckpt_dir.glob("*.tmp"))


@pytest.mark.e2e
def test_two_ranks_resume_on_one_without_repeating_or_skipping_samples(tmp_path):
    fasta = tmp_path / "64.fasta"
    fasta.write_text("".join(f">s{i}\n{seq}\n" for i, seq in enumerate(read_fasta_sequences(64))))
    common = [
        str(fasta.parent),
        "train_fsdp2",
        f"dataset.path={fasta}",
        "dataset.validation_size=0",
        "dataset.max_seq_length=64",
        "num_train_steps=8",
        f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_final_model=false",
    ]
    first = launch(
        ["tests/sample_log_probe.py", *common, "dataset.micro_batch_size=4", "checkpoint.exit_after_n_steps=3"],
        tmp_path,
        nproc=2,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((tmp_path / "rank0.json").read_text()) + json.loads((tmp_path / "rank1.json").read_text())
    second = launch(["tests/sample_log_probe.py", *common, "dataset.micro_batch_size=8"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = json.loads((tmp_path / "rank0.json").read_text())
    assert len(before) == 24 and len(after) == 40
    expected = {zlib.crc32(bytes(ids)) for ids in _token_ids(read_fasta_sequences(64))}
    assert sorted(before + after) == sorted(expected)  # the epoch, each sample exactly once


def _token_ids(sequences):
    tokenizer = AutoTokenizer.from_pretrained(RECIPE_DIR / "tokenizers" / "esm2")
    return tokenizer(sequences)["input_ids"]


@pytest.mark.e2e
def test_unwritable_checkpoint_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"checkpoint\.ckpt_dir=.*a_file/ckpt.* is not writable"):
        check_writable(blocker / "ckpt")
    result = launch(
        ["train_fsdp2.py", "--config-name", "L0_sanity", f"checkpoint.ckpt_dir={blocker / 'ckpt'}"], tmp_path
    )
    assert result.returncode != 0
    assert "is not writable" in result.stdout + result.stderr
    assert "Data:" not in result.stdout  # refused before loading any data


@pytest.mark.e2e
def test_unloadable_checkpoints_are_skipped_and_never_silently_replaced(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    args = [
        "train_fsdp2.py",
        "--config-name",
        "L0_sanity",
        *SMALL,
        f"checkpoint.ckpt_dir={ckpt_dir}",
        "checkpoint.save_every_n_steps=2",
        "checkpoint.save_final_model=false",
    ]
    first = launch([*args, "num_train_steps=4"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [4, 2]

    def scramble(step):  # same size: only the checksum can tell
        rank_file = ckpt_dir / f"step_{step:07d}" / "rank_00000.pt"
        rank_file.write_bytes(bytes(reversed(rank_file.read_bytes())))

    scramble(4)
    resumed = launch([*args, "num_train_steps=5"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping checkpoint" in resumed.stdout
    assert "step_0000004: rank_00000.pt does not match its checksum" in resumed.stdout
    assert "(step 2)" in resumed.stdout

    for step, _ in list_checkpoints(ckpt_dir):
        scramble(step)
    before = {p: p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}
    refused = launch([*args, "num_train_steps=6"], tmp_path)
    assert refused.returncode != 0
    assert "No checkpoint in" in refused.stdout + refused.stderr
    assert {p: p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()} == before  # nothing touched

    fresh = launch([*args, "num_train_steps=6", "checkpoint.resume_from_checkpoint=false"], tmp_path)
    assert fresh.returncode != 0
    assert "holds checkpoints of an earlier run" in fresh.stdout + fresh.stderr


@pytest.mark.e2e
def test_sigterm_to_torchrun_and_to_the_whole_process_group_saves_and_resumes_exactly(tmp_path):
    """How jobs end: torchrun forwards SIGTERM to its ranks; `scancel` or a time limit signal every process.

    DataLoader workers (num_workers=1) ignore the signal, so the ranks finish the step, save and exit; each resumed
    part continues the run bit for bit.
    """
    common = ["train_fsdp2.py", "--config-name", "L0_sanity", *SMALL, "num_train_steps=16", "dataset.num_workers=1"]
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    result = launch([*common, f"logger.metrics_file={straight}", "checkpoint.ckpt_dir=null"], tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    args = [*common, f"logger.metrics_file={resumed}", f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"]
    stops = []
    for to_group in (False, True):
        signalled = signal_mid_run(args, tmp_path, resumed, to_group)
        assert "Received SIGTERM: will save a checkpoint" in signalled
        assert "killed by signal" not in signalled  # no DataLoader worker died
        stops.append(max(losses(resumed)))
        assert list_checkpoints(tmp_path / "ckpt")[0][0] == stops[-1]  # the newest checkpoint is the stop step
    assert stops[0] < stops[1] < 16, stops
    final = launch(args, tmp_path, nproc=2)
    assert final.returncode == 0, final.stderr[-3000:]
    assert losses(resumed) == losses(straight)  # all 16, bit for bit, across two preemptions


def signal_mid_run(args, tmp_path, metrics_file, to_group):
    """Start a 2-rank torchrun, SIGTERM it (its parent, or its whole process group) after two more steps."""
    done = len(losses(metrics_file)) if metrics_file.exists() else 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    process = subprocess.Popen(
        [*launcher, *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=RECIPE_DIR,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a batch job has
    )
    seen = []
    for line in process.stdout:  # the log says when steps are done; no timing guesses
        seen.append(line)
        if metrics_file.exists() and len(losses(metrics_file)) >= done + 2:
            break
    os.killpg(process.pid, signal.SIGTERM) if to_group else process.send_signal(signal.SIGTERM)
    return "".join(seen) + process.communicate(timeout=120)[0]


PROBE = ["tests/sample_log_probe.py"]


@pytest.mark.e2e
def test_a_nan_loss_stops_the_run_and_the_last_good_checkpoint_stays_newest(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    args = [*PROBE, str(tmp_path), "train_fsdp2", *SMALL, "num_train_steps=12", f"checkpoint.ckpt_dir={ckpt_dir}"]
    args += ["checkpoint.save_every_n_steps=2", "logger.log_every_n_steps=3"]
    result = launch(args, tmp_path, env={"PROBE_NAN_AT_STEP": "5"})
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in log  # a refusal: its message alone
    assert "Training diverged: the loss or gradient norm became NaN or infinite between " in log
    assert "steps 4 and 6 (read at step 6" in log
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [4, 2]  # step 6, due to be saved, was not
    assert verify_manifest(ckpt_dir / "step_0000004") is None
    assert not (ckpt_dir / "final_model").exists() and not (ckpt_dir / ".lock").exists()


@pytest.mark.e2e
def test_a_second_run_on_a_locked_folder_refuses_and_a_failed_final_save_exits_non_zero(tmp_path):
    from run_lock import RunLock

    ckpt_dir = tmp_path / "ckpt"
    args = [*PROBE, str(tmp_path), "train_fsdp2", *SMALL, "num_train_steps=4", f"checkpoint.ckpt_dir={ckpt_dir}"]
    ckpt_dir.mkdir()
    held = RunLock(ckpt_dir).acquire()  # this test process plays the other, live run
    try:
        refused = launch(args, tmp_path)
    finally:
        held.release()
    assert refused.returncode != 0
    assert f"is in use by another run (PID {os.getpid()} on " in refused.stdout + refused.stderr
    assert "Data:" not in refused.stdout and not list_checkpoints(ckpt_dir)
    failed = launch(args, tmp_path, env={"PROBE_FAIL_SAVE": "4"})  # the last step's save: the end of the run
    assert failed.returncode != 0
    assert "The checkpoint of step 4 could not be saved" in failed.stdout + failed.stderr
    assert not list_checkpoints(ckpt_dir) and not (ckpt_dir / "final_model").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB filesystem (root may mount one): far too small for the 8M model's checkpoint."""
    mount_point = tmp_path / "tiny_fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.e2e
def test_a_full_disk_says_no_space_with_the_bytes_needed_and_free(tmp_path, small_tmpfs):
    args = ["train_fsdp2.py", "--config-name", "L0_sanity", *SMALL, "num_train_steps=2"]
    result = launch([*args, f"checkpoint.ckpt_dir={small_tmpfs / 'ckpt'}", "checkpoint.save_every_n_steps=1"], tmp_path)
    log = result.stdout + result.stderr
    assert "Saving the checkpoint of step 1 failed (no space left on device: the checkpoint needs about 0." in log
    assert "GiB are free in" in log
    assert result.returncode != 0 and "The checkpoint of step 2 could not be saved" in log  # the end: not exit 0
    assert not list_checkpoints(small_tmpfs / "ckpt")


# --- the Checkpointer in this process, on a tiny model (no subprocess) ---------------------------------------------

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class Position:
    """A stand-in for the loader's position: any Stateful part."""

    def __init__(self, consumed=0):
        self.state = {"epoch": 0, "consumed": consumed, "world_size": 1}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def tiny_checkpointer(ckpt_dir, parameters=None, model_name="tiny", plan=None, overrides=(), data=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()  # so the optimizer has state to save
    parts = CheckpointParts(
        model_optim=ModelAndOptimizer(model, optimizer, DistributedStateDict()),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        data=data or Position(consumed=8),
        fp8=TEExtraState(model),
        facts={"model": model_name, "parameters": parameters or 15, "num_workers": 0}
        | ({"precision_plan": plan.as_dict()} if plan is not None else {}),
    )
    cfg = compose("L0_sanity", [f"checkpoint.ckpt_dir={ckpt_dir}", "checkpoint.save_every_n_steps=2", *overrides])
    return Checkpointer(cfg.checkpoint, CPU, parts), model


def test_a_checkpoint_with_a_nan_weight_is_refused_at_save(tmp_path):
    checkpointer, model = tiny_checkpointer(tmp_path)
    assert checkpointer.save(2)
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"step 4.*model\.0\.weight.*step_0000002 stays the newest"):
        checkpointer.save(4)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_same_size_overwrite_inside_a_shard_is_caught_and_the_previous_checkpoint_used(tmp_path, caplog):
    checkpointer, _ = tiny_checkpointer(tmp_path)
    assert checkpointer.save(2) and checkpointer.save(4)
    (shard,) = (tmp_path / "step_0000004" / "model_optim").glob("*.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\xff\xff\xff\x7f"  # a few bytes in the middle, size unchanged
    shard.write_bytes(bytes(data))
    assert "model_optim/__0_0.distcp does not match its checksum" in verify_manifest(tmp_path / "step_0000004")
    resumed, _ = tiny_checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        assert resumed.resume() == 2
    assert "Skipping checkpoint" in caplog.text and "__0_0.distcp does not match its checksum" in caplog.text


def test_a_train_state_crafted_to_run_code_is_refused_without_running_it(tmp_path):
    checkpointer, _ = tiny_checkpointer(tmp_path)
    assert checkpointer.save(2)
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    folder = tmp_path / "step_0000002"
    torch.save({"step": 2, "payload": Payload()}, folder / "train_state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())  # a forger would fix the manifest too
    manifest["files"]["train_state.pt"] = (folder / "train_state.pt").stat().st_size
    manifest["xxh3_64"]["train_state.pt"] = file_digest(folder / "train_state.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_manifest(folder) is None
    resumed, _ = tiny_checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* could be loaded .*Weights only load failed"):
        resumed.resume()
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    checkpointer, _ = tiny_checkpointer(tmp_path)
    assert checkpointer.save(2)
    other, _ = tiny_checkpointer(tmp_path, parameters=33_993_602, model_name="esm2_t12_35M_UR50D")
    with pytest.raises(CheckpointError) as error:
        other.resume()
    message = str(error.value)
    assert "checkpoint is of a tiny model (15 parameters), config asks for esm2_t12_35M_UR50D (33,993,602" in message
    assert len(message.splitlines()) == 1 and len(message) < 600


def test_the_precision_plan_travels_with_the_checkpoint_and_another_plan_is_refused(tmp_path):
    mixed = PrecisionPlan(("bf16", "fp8", "fp8", "fp8", "fp8", "bf16"), "Float8CurrentScaling")
    checkpointer, _ = tiny_checkpointer(tmp_path, plan=mixed)
    assert checkpointer.save(2)
    same, _ = tiny_checkpointer(tmp_path, plan=PrecisionPlan.from_dict(mixed.as_dict()))
    assert same.resume() == 2
    all_fp8 = PrecisionPlan(("fp8",) * 6, "Float8CurrentScaling")
    other, _ = tiny_checkpointer(tmp_path, plan=all_fp8)
    with pytest.raises(CheckpointError) as error:
        other.resume()
    message = str(error.value)
    assert "trained with the precision plan 'layers 1, 6: BF16; layers 2–5: FP8 current scaling'" in message
    assert "this run asks for 'layers 1–6: FP8 current scaling'" in message


def test_rng_states_of_older_checkpoints_still_load_safely(tmp_path):
    import numpy as np

    torch.save({"numpy": np.random.get_state()}, tmp_path / "old.pt")  # NumPy arrays, as written before
    loaded = load_small_file(tmp_path / "old.pt")["numpy"]
    assert loaded[0] == "MT19937" and (loaded[1] == np.random.get_state()[1]).all()


class LargePosition(Position):
    """A loader position that carries 17 MiB: the rank and train-state files grow past the 16 MiB hashing chunk."""

    def __init__(self):
        super().__init__(consumed=8)
        self.state["buffer"] = torch.randint(0, 256, (17 << 20,), dtype=torch.uint8, generator=torch.Generator())


def test_a_byte_changed_past_the_first_16_mib_of_a_file_is_caught(tmp_path, caplog):
    checkpointer, _ = tiny_checkpointer(tmp_path, data=LargePosition())
    assert checkpointer.save(2) and checkpointer.save(4)
    rank_file = tmp_path / "step_0000004" / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    assert len(data) > (16 << 20) + 4096
    assert file_digest(rank_file) == xxhash.xxh3_64_hexdigest(bytes(data))  # the whole file, not its first chunk
    data[-2048] ^= 0xFF  # one byte near the end, size unchanged
    rank_file.write_bytes(bytes(data))
    assert verify_manifest(tmp_path / "step_0000004") == (
        "rank_00000.pt does not match its checksum (changed or corrupted since it was written)"
    )
    resumed, _ = tiny_checkpointer(tmp_path, data=LargePosition())
    with caplog.at_level("WARNING"):
        assert resumed.resume() == 2
    assert "Skipping checkpoint" in caplog.text and "rank_00000.pt does not match its checksum" in caplog.text


def adam_step(model, optimizer, seed):
    """One optimizer step on a fixed batch: weights and AdamW state move."""
    inputs = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(inputs).square().sum().backward()
    optimizer.step()


def snapshot(model, optimizer):
    """Copies of the weights and of every AdamW state tensor."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for index, values in optimizer.state_dict()["state"].items():
        state |= {f"optim.{index}.{k}": torch.as_tensor(v).clone() for k, v in values.items()}
    return state


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_an_async_save_goes_through_dcp_async_save_holds_the_state_of_its_step_and_resumes_exactly(
    tmp_path, monkeypatch
):
    import torch.distributed.checkpoint as dcp

    calls = []
    for name in ("save", "async_save"):
        real = getattr(dcp, name)
        monkeypatch.setattr(dcp, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    checkpointer, model = tiny_checkpointer(tmp_path, overrides=["checkpoint.async_save=true"])
    optimizer = checkpointer.parts.model_optim.optimizer
    at_step_2 = snapshot(model, optimizer)
    assert checkpointer.save(2)  # staged; written in the background while training goes on
    assert calls == ["async_save"]
    adam_step(model, optimizer, seed=1)  # the next step changes weights and optimizer state in place
    after_step_3 = snapshot(model, optimizer)
    checkpointer.finish(3, completed=False)  # publishes the pending save
    assert calls == ["async_save"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    assert verify_manifest(tmp_path / "step_0000002") is None  # complete: every file, size and checksum

    resumed, resumed_model = tiny_checkpointer(tmp_path)
    resumed_optimizer = resumed.parts.model_optim.optimizer
    adam_step(resumed_model, resumed_optimizer, seed=2)  # wherever it stood, resuming replaces it
    assert resumed.resume() == 2
    assert_same_state(snapshot(resumed_model, resumed_optimizer), at_step_2)
    adam_step(resumed_model, resumed_optimizer, seed=1)
    assert_same_state(snapshot(resumed_model, resumed_optimizer), after_step_3)  # training goes on identically


@pytest.mark.parametrize("setting", ["step_0000004", "latest", "true"])
def test_resume_from_a_named_checkpoint_or_the_newest(tmp_path, setting):
    checkpointer, model = tiny_checkpointer(tmp_path)
    optimizer = checkpointer.parts.model_optim.optimizer
    saved = {}
    for step in (2, 4, 6):
        adam_step(model, optimizer, seed=step)
        saved[step] = snapshot(model, optimizer)
        assert checkpointer.save(step)
    value = str(tmp_path / setting) if setting.startswith("step_") else setting
    resumed, resumed_model = tiny_checkpointer(tmp_path, overrides=[f"checkpoint.resume_from_checkpoint={value}"])
    step = 4 if setting.startswith("step_") else 6
    assert resumed.resume() == step
    assert_same_state(snapshot(resumed_model, resumed.parts.model_optim.optimizer), saved[step])
