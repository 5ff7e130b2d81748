"""Checkpoints on CPU (gloo, FP32): exact stop-and-go, crashes mid-write, full disks, elastic resume, export."""

import json
import os
import zlib

import pytest
import torch
from conftest import RECIPE_DIR, launch, read_fasta_sequences
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForMaskedLM, AutoTokenizer

from checkpoint import CheckpointError, check_writable, list_checkpoints, verify_manifest

pytestmark = pytest.mark.e2e

SMALL = [
    "dataset.max_seq_length=64",
    "dataset.micro_batch_size=4",
    "validation.every_n_steps=0",
    "logger.log_every_n_steps=1",
    "logger.progress_bar=false",
]


def losses(metrics_file):
    return {m["step"]: m["train/loss"] for m in map(json.loads, metrics_file.read_text().splitlines())}


@pytest.mark.parametrize("entrypoint", ["train_fsdp2.py", "train_ddp.py"])
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

    # a truncated newest checkpoint is recognised and skipped
    shard = next((ckpt_dir / "step_0000009" / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    again = launch([*args[:4], *SMALL, "num_train_steps=10", *args[-4:]], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Skipping checkpoint" in again.stdout and "step_0000009" in again.stdout
    assert "(step 6)" in again.stdout


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
    assert "Saving the checkpoint of step 4 failed" in log and "No space left on device" in log
    assert "the previous checkpoint step_0000002 is intact" in log
    assert [step for step, _ in list_checkpoints(ckpt_dir)] == [6, 2]
    assert not list(ckpt_dir.glob("*.tmp"))


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

    def scramble(step):  # same size, so the manifest still matches: only loading can tell
        rank_file = ckpt_dir / f"step_{step:07d}" / "rank_00000.pt"
        rank_file.write_bytes(bytes(reversed(rank_file.read_bytes())))

    scramble(4)
    resumed = launch([*args, "num_train_steps=5"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping checkpoint" in resumed.stdout and "step_0000004: loading failed" in resumed.stdout
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


def test_te_fp8_state_is_restored_with_the_pickle_permission_scoped_to_the_call(monkeypatch):
    from checkpoint import TE_UNSAFE_PICKLE_ENV, _restore_te_extra_states

    monkeypatch.delenv(TE_UNSAFE_PICKLE_ENV, raising=False)
    seen = {}

    class FakeTELayer(torch.nn.Module):
        def get_extra_state(self):
            return torch.tensor([1, 2, 3], dtype=torch.uint8)

        def set_extra_state(self, state):
            seen["state"], seen["permission"] = state, os.environ.get(TE_UNSAFE_PICKLE_ENV)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), FakeTELayer())
    _restore_te_extra_states(model, {"1": torch.tensor([7], dtype=torch.uint8)})
    assert seen["permission"] == "1" and seen["state"].tolist() == [7]
    assert TE_UNSAFE_PICKLE_ENV not in os.environ
