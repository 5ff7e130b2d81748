"""Refusals end a run in one message with status 1 and no traceback; anything else keeps its traceback."""

import os
import subprocess
import sys

import pytest
from conftest import RECIPE_DIR, launch

import cli_help
from errors import TRACEBACK_ENV, RecipeError, refusals_exit_cleanly


class Refused(RecipeError):
    pass


def test_a_refusal_logs_its_message_once_and_exits_1(monkeypatch, caplog):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)

    @refusals_exit_cleanly
    def task():
        raise Refused("dataset.path='x' does not exist. Point dataset.path at a FASTA file.")

    with pytest.raises(SystemExit) as stop:
        task()
    assert stop.value.code == 1
    assert [r.getMessage() for r in caplog.records] == [
        "dataset.path='x' does not exist. Point dataset.path at a FASTA file."
    ]
    assert caplog.records[0].exc_info is None  # no traceback


def test_hydra_full_error_shows_the_traceback_and_other_errors_are_untouched(monkeypatch):
    @refusals_exit_cleanly
    def refuse():
        raise Refused("no")

    @refusals_exit_cleanly
    def crash():
        raise KeyError("a bug")

    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(Refused):
        refuse()
    monkeypatch.delenv(TRACEBACK_ENV)
    with pytest.raises(KeyError):
        crash()


def rank_1_refusing(tmp_path, before: str) -> subprocess.CompletedProcess:
    """Rank 1 of a torchrun job meeting a shared refusal, after running `before`."""
    script = f"import errors, os, signal\n{before}\nerrors.exit_refused('the message')\n"
    env = {**os.environ, "RANK": "1", "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(RECIPE_DIR)}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_another_rank_leaves_a_shared_refusal_to_rank_0_and_reports_it_if_not_stopped(tmp_path):
    """Under torchrun rank 1 waits for the launcher's SIGTERM (sent once rank 0 has failed) and prints nothing."""
    stopped = rank_1_refusing(tmp_path, "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
                                        "os.kill(os.getpid(), signal.SIGTERM)")  # fmt: skip
    assert stopped.returncode == 1 and stopped.stdout + stopped.stderr == ""
    alone = rank_1_refusing(tmp_path, "errors.RANK_0_GRACE_S = 0.01")  # nobody stops it: it reports the problem
    assert alone.returncode == 1 and alone.stderr == "Error: [rank 1] the message\n"


def test_an_unknown_key_is_refused_with_the_closest_one_before_anything_is_imported():
    problems = cli_help.unknown_override_problems(
        ["optimizer.lrr=1", "optimzer.lr=2", "num_train_step=3", "dataset.path=x", "+optimizer.foo=1"], "L0_sanity"
    )
    assert problems == [
        "optimizer.lrr: unknown key. Did you mean optimizer.lr? Known: betas, eps, lr, max_grad_norm, weight_decay.",
        "optimzer.lr: unknown key. Did you mean optimizer.lr? Every key is documented in hydra_config/defaults.yaml.",
        "num_train_step: unknown key. Did you mean num_train_steps? Every key is documented in "
        "hydra_config/defaults.yaml.",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["precision=fp8_current", "fp8_config.recipe=Float8CurrentScaling", "fp4_config.random_hadamard=false"],
        ["fp8_config.recipe_kwargs.margin=1", "hydra.run.dir=/tmp/x", "hydra/job_logging=disabled", "~wandb.dir"],
        ["benchmark.models=[esm2_t6_8M_UR50D]", "--config-name", "benchmark", "benchmark.timed_steps=3"],
    ],
)
def test_valid_overrides_and_those_left_to_hydra_pass(argv):
    config_name = "benchmark" if "benchmark" in argv else "L0_sanity"
    assert cli_help.unknown_override_problems([a for a in argv if not a.startswith("--")], config_name) == []


@pytest.mark.e2e
def test_a_misspelled_nested_key_stops_the_entrypoint_in_one_line(tmp_path):
    result = launch(["train_fsdp2.py", "--config-name", "L0_sanity", "optimizer.lrr=1"], tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stdout + result.stderr == (
        "Error: Invalid command line:\n"
        "  - optimizer.lrr: unknown key. Did you mean optimizer.lr? Known: betas, eps, lr, max_grad_norm, "
        "weight_decay.\n"
    )


@pytest.mark.e2e
def test_a_configuration_error_prints_no_traceback_and_exits_1(tmp_path):
    result = launch(["train_ddp.py", "--config-name", "L0_sanity", "optimizer.lr=-1", "num_train_steps=0"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output and "Error executing job" not in output
    assert output.count("Invalid configuration:") == 1
    assert "- num_train_steps=0: must be a positive integer\n  - optimizer.lr=-1: must be positive" in output

    data = launch(["train_ddp.py", "--config-name", "L0_sanity", f"dataset.path={tmp_path / 'none.fasta'}"], tmp_path)
    assert data.returncode == 1 and "Traceback" not in data.stdout + data.stderr
    assert f"dataset.path='{tmp_path / 'none.fasta'}' does not exist" in data.stdout + data.stderr
