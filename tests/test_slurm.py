"""`slurm.sh` under a real one-node SLURM cluster (slurmctld + slurmd + munge), started for these tests on this machine.

The cluster is CPU-only and needs no cgroups (`proctrack/linuxproc`, `task/none`). `.ci/run` installs Debian's
`slurm-wlm` and `munge` when they are missing; elsewhere the tests skip, saying what is missing.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RECIPE_DIR, free_port

pytestmark = pytest.mark.e2e
DAEMONS = ("sbatch", "scancel", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
JOB = [
    "--config-name",
    "L0_sanity",
    "dataset.max_seq_length=64",
    "logger.log_every_n_steps=1",
    "validation.every_n_steps=0",
]


def poll(condition, timeout_s: float, what: str):
    """Check `condition()` until it returns something truthy (that is returned) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)  # between checks of a daemon's state: nothing is timed by it
    raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")


def slurm_conf(folder: Path, host: str) -> str:
    cpus, memory_mib = os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return "\n".join(
        [
            "ClusterName=recipe-ci",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmctldPidFile={folder}/slurmctld.pid",
            f"SlurmdPidFile={folder}/slurmd.pid",
            f"SlurmdSpoolDir={folder}/spool",
            f"StateSaveLocation={folder}/state",
            f"SlurmctldLogFile={folder}/slurmctld.log",
            f"SlurmdLogFile={folder}/slurmd.log",
            f"NodeName={host} CPUs={cpus} RealMemory={max(memory_mib - 1024, 1024)} State=UNKNOWN",
            f"PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            "",
        ]
    )


def start_munge() -> None:
    """munged, unless one already answers (its socket directory is made the way Debian's service makes it)."""
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster: the environment that submits to it, and its start-up time in seconds."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a SLURM cluster for the tests needs root (slurmd runs jobs as their users)")
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "spool").mkdir()
    (folder / "state").mkdir()
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host))
    env = {**os.environ, "SLURM_CONF": str(conf), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # torchrun of this Python
    begin = time.monotonic()
    start_munge()
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(conf)], env=env, check=True)
    try:
        poll(lambda: sinfo_state(env) == "idle", 60, f"the SLURM node {host} becoming idle")
        yield env, time.monotonic() - begin
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for daemon in ("slurmd", "slurmctld"):
            pid_file = folder / f"{daemon}.pid"
            if pid_file.is_file():
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def sinfo_state(env) -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()


def job_field(env, job: str, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((part.split("=", 1)[1] for part in text.split() if part.startswith(f"{field}=")), "")


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sbatch(env, out: Path, *args, wait=True, ranks=1, extra_env=None):
    """`sbatch slurm.sh ...` as a user submits it (one node, no GPUs): the completed process (stdout: job id).

    With `wait`, its return code is the job's exit code once the job has ended, as `sbatch --wait` gives it; the
    job's state is polled here because `--wait` checks ever more rarely (up to half a minute apart).
    """
    command = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--output={out}", "slurm.sh", *args]
    submitted = subprocess.run(
        command,
        cwd=RECIPE_DIR,
        env={**env, "GPUS_PER_NODE": str(ranks), "OMP_NUM_THREADS": str(max(1, 2 // ranks)), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    job = submitted.stdout.strip()
    if not wait or submitted.returncode != 0:
        return submitted
    poll(lambda: job_field(env, job, "JobState") in ENDED, 600, f"the end of job {job}")
    submitted.returncode = int(job_field(env, job, "ExitCode").split(":")[0])
    return submitted


def losses(metrics_file: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in map(json.loads, metrics_file.read_text().splitlines())}


def test_an_l0_sanity_job_of_two_ranks_finishes(slurm, tmp_path):
    env, startup_s = slurm
    print(f"SLURM cluster started in {startup_s:.1f} s")
    metrics = tmp_path / "metrics.jsonl"
    result = sbatch(
        env,
        tmp_path / "job.out",
        "train_fsdp2.py",
        *JOB,
        "num_train_steps=4",
        "logger.log_every_n_steps=2",
        f"logger.metrics_file={metrics}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        ranks=2,
    )
    log = (tmp_path / "job.out").read_text()
    assert result.returncode == 0, log[-3000:] + result.stderr
    assert "1 nodes x 2 GPUs" in log and "Rank 0/2" in log and "Rank 1/2" not in log  # rank 1 keeps quiet
    assert "Run finished at step 4 of 4 (4 steps in this job)" in log
    assert "\r" not in log  # no progress-bar frames in a batch log
    assert sorted(losses(metrics)) == [2, 4]


def test_a_preempted_job_requeues_itself_and_resumes_exactly(slurm, tmp_path):
    env, _ = slurm
    run = [*JOB, "num_train_steps=10", "checkpoint.save_every_n_steps=0", f"hydra.run.dir={tmp_path / 'hydra'}"]
    straight = tmp_path / "straight.jsonl"
    reference = sbatch(env, tmp_path / "straight.out", "train_fsdp2.py", *run, f"logger.metrics_file={straight}")
    assert reference.returncode == 0, reference.stderr

    log, metrics = tmp_path / "preempted.out", tmp_path / "preempted.jsonl"
    args = [*run, f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}", f"logger.metrics_file={metrics}"]
    submitted = sbatch(env, log, "train_fsdp2.py", *args, wait=False, extra_env={"REQUEUE_ON_PREEMPT": "1"})
    job = submitted.stdout.strip()
    poll(lambda: log.is_file() and "\nstep 3:" in log.read_text(), 300, "step 3 of the job")
    # what SLURM sends before a time limit (--signal=B:USR1@300), delivered now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    poll(lambda: job_field(env, job, "Restarts") == "1", 300, "the job's requeue")
    # A requeued job waits a couple of minutes before it may start again; a test need not. It must not start within
    # the second its first run was stopped in, though: slurmd would take its credential for the revoked one.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, capture_output=True)
    state = poll(lambda: (s := job_field(env, job, "JobState")) in ENDED and s, 600, "the end of the job")
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "preempted after a checkpoint; requeueing it to resume" in text and "Resumed from" in text
    stopped_at = int(text.split("Stopping at step ")[1].split()[0])
    assert 3 <= stopped_at < 10
    assert losses(metrics) == losses(straight)  # every step, bit for bit, across the preemption


def test_a_failing_job_exits_non_zero_with_the_recipes_error(slurm, tmp_path):
    env, _ = slurm
    result = sbatch(env, tmp_path / "job.out", "train_fsdp2.py", *JOB, "num_train_steps=0")
    log = (tmp_path / "job.out").read_text()
    assert result.returncode != 0
    assert "Invalid configuration" in log and "num_train_steps=0: must be a positive integer" in log
