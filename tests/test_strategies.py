"""The parallelism strategies on CPU (gloo, FP32): same losses on 1 and 2 ranks, Slurm launch, Megatron-FSDP refusals.

Why one rank and two ranks give the same first loss: the training sampler hands rank r positions r, r+W, r+2W, ...
of one global permutation, so 2 ranks x 4 sequences are the 8 sequences one rank takes as its micro-batch of 8;
masking is decided per sequence, and the loss is normalised by the global masked-token count (training.py), so
both runs compute the same mean over the same tokens with the same initial weights.
"""

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RECIPE_DIR, free_port, launch, read_metrics

SMALL = [
    "--config-name",
    "L0_sanity",
    "num_train_steps=3",
    "dataset.max_seq_length=64",
    "validation.every_n_steps=3",  # once, after the last step
    "logger.log_every_n_steps=1",
    "logger.progress_bar=false",
]
GLOBAL_BATCH = 8
CUDA_MESSAGE = "train_mfsdp.py needs CUDA GPUs; use train_fsdp2.py or train_ddp.py on CPU."


def cpu_env(**extra):
    """The environment of the slurm.sh launches: one thread each, so several ranks share two cores fairly."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    """An entrypoint's runs with the same global batch of 8, run once each and keyed by how they split it.

    1: one rank, micro-batch 8; 2: two ranks, micro-batch 4 each; "acc": one rank, micro-batch 4, grad_acc_steps=2.
    """

    @functools.cache
    def metrics_of(entrypoint):
        metrics = {}
        for key, nproc, grad_acc in ((1, 1, 1), (2, 2, 1), ("acc", 1, 2)):
            out_dir = tmp_path_factory.mktemp(f"{entrypoint.removesuffix('.py')}_{key}")
            metrics_file = out_dir / "metrics.jsonl"
            args = [
                entrypoint,
                *SMALL,
                f"dataset.micro_batch_size={GLOBAL_BATCH // nproc // grad_acc}",
                f"grad_acc_steps={grad_acc}",
                f"logger.metrics_file={metrics_file}",
                f"logger.grad_norms_file={out_dir / 'grad_norms.json'}",
            ]
            result = launch(args, out_dir, nproc=nproc, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            metrics[key] = read_metrics(metrics_file)
            metrics[f"log_{key}"] = result.stdout + result.stderr
            metrics[f"grad_norms_{key}"] = json.loads((out_dir / "grad_norms.json").read_text())
        return metrics

    return metrics_of


@pytest.mark.e2e
@pytest.mark.parametrize("entrypoint", ["train_ddp.py", "train_fsdp2.py"])
def test_two_rank_run_completes_with_validation(one_and_two_ranks, entrypoint):
    metrics = one_and_two_ranks(entrypoint)[2]
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert all(math.isfinite(m["train/loss"]) for m in train)
    assert math.isfinite(next(m["val/loss"] for m in metrics if "val/loss" in m))


def stored_parameter_gib(log: str) -> tuple[float, float]:
    match = re.search(r"Parameters stored on this rank: ([\d.e+-]+) GiB of the model's ([\d.e+-]+) GiB", log)
    assert match, log[-2000:]
    return float(match[1]), float(match[2])


@pytest.mark.e2e
@pytest.mark.parametrize(("entrypoint", "share"), [("train_ddp.py", 1.0), ("train_fsdp2.py", 0.5)])
def test_sharding_divides_the_parameters_each_rank_stores(one_and_two_ranks, entrypoint, share):
    runs = one_and_two_ranks(entrypoint)
    one_local, one_whole = stored_parameter_gib(runs["log_1"])
    two_local, two_whole = stored_parameter_gib(runs["log_2"])
    assert one_local == one_whole == two_whole
    assert two_local == pytest.approx(share * one_whole, rel=0.02)


@pytest.mark.e2e
@pytest.mark.parametrize("entrypoint", ["train_ddp.py", "train_fsdp2.py"])
def test_first_loss_on_two_ranks_matches_one_rank(one_and_two_ranks, entrypoint):
    metrics = one_and_two_ranks(entrypoint)
    one, two = metrics[1][0]["train/loss"], metrics[2][0]["train/loss"]
    assert abs(two - one) / one < 1e-4, (one, two)


@pytest.mark.e2e
@pytest.mark.parametrize("entrypoint", ["train_ddp.py", "train_fsdp2.py"])
def test_every_parameter_gets_the_same_gradient_on_two_ranks(one_and_two_ranks, entrypoint):
    """Parameter by parameter, the first step's gradient norms on 2 ranks equal those of 1 rank with the same batch."""
    runs = one_and_two_ranks(entrypoint)
    one, two = runs["grad_norms_1"], runs["grad_norms_2"]
    assert one["step"] == two["step"] == 1
    assert one["grad_norms"].keys() == two["grad_norms"].keys()
    assert len(one["grad_norms"]) > 6 * 16  # every layer's weights, not a handful of summaries
    for name, norm in one["grad_norms"].items():
        if "contact_head" in name:  # frozen: no gradient anywhere
            assert norm == two["grad_norms"][name] == 0.0
        else:
            assert norm > 0 and two["grad_norms"][name] == pytest.approx(norm, rel=1e-4), name


@pytest.mark.e2e
@pytest.mark.parametrize("entrypoint", ["train_ddp.py", "train_fsdp2.py"])
def test_two_ranks_equal_one_rank_with_grad_acc_steps_2(one_and_two_ranks, entrypoint):
    """The README's claim: N GPUs compute what 1 GPU computes with grad_acc_steps=N (same global batch)."""
    runs = one_and_two_ranks(entrypoint)
    two, acc = runs["grad_norms_2"]["grad_norms"], runs["grad_norms_acc"]["grad_norms"]
    assert two.keys() == acc.keys()
    for name, norm in acc.items():
        assert two[name] == pytest.approx(norm, rel=1e-4, abs=1e-12), name
    losses = [[m["train/loss"] for m in runs[key] if "train/loss" in m] for key in (2, "acc")]
    assert len(losses[0]) == len(losses[1]) == 3
    for two_ranks, accumulated in zip(*losses, strict=True):  # every step, not only the first
        assert two_ranks == pytest.approx(accumulated, rel=1e-4)
    assert losses[0][0] != losses[0][2]  # the runs trained: the loss moved


@pytest.mark.e2e
def test_ddp_and_fsdp2_start_from_the_same_loss(one_and_two_ranks):
    """Same seed, whole model built before wrapping: the strategies differ in memory and speed, not in results."""
    ddp, fsdp2 = (
        one_and_two_ranks(entrypoint)[1][0]["train/loss"] for entrypoint in ("train_ddp.py", "train_fsdp2.py")
    )
    assert abs(ddp - fsdp2) / ddp < 1e-6
    ddp_norms, fsdp2_norms = (
        one_and_two_ranks(entrypoint)["grad_norms_2"]["grad_norms"] for entrypoint in ("train_ddp.py", "train_fsdp2.py")
    )
    assert ddp_norms.keys() == fsdp2_norms.keys()  # the same names once the wrappers' prefixes are dropped
    for name, norm in ddp_norms.items():
        assert fsdp2_norms[name] == pytest.approx(norm, rel=1e-5, abs=1e-12), name


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("entrypoint", "checkpointing"),
    [
        ("train_ddp.py", ["activation_checkpointing.mode=selective"]),
        ("train_fsdp2.py", ["activation_checkpointing.mode=full"]),
    ],
)
def test_two_ranks_with_activation_checkpointing_train_exactly_as_without(
    one_and_two_ranks, tmp_path, entrypoint, checkpointing
):
    """Recomputing activations in the backward pass changes memory and time, not the losses or the gradients."""
    metrics_file = tmp_path / "metrics.jsonl"
    args = [
        entrypoint,
        *SMALL,
        f"dataset.micro_batch_size={GLOBAL_BATCH // 2}",
        *checkpointing,
        f"logger.metrics_file={metrics_file}",
        f"logger.grad_norms_file={tmp_path / 'grad_norms.json'}",
    ]
    result = launch(args, tmp_path, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Activation checkpointing: " in result.stdout + result.stderr
    plain = one_and_two_ranks(entrypoint)
    losses = [[m["train/loss"] for m in run if "train/loss" in m] for run in (read_metrics(metrics_file), plain[2])]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    recomputed = json.loads((tmp_path / "grad_norms.json").read_text())["grad_norms"]
    for name, norm in plain["grad_norms_2"]["grad_norms"].items():
        assert recomputed[name] == pytest.approx(norm, rel=1e-6, abs=1e-12), name


@pytest.mark.e2e
def test_ddp_with_torch_compile_gives_the_same_first_loss(one_and_two_ranks, tmp_path):
    metrics_file = tmp_path / "metrics.jsonl"
    args = [
        "train_ddp.py",
        *SMALL,
        "num_train_steps=1",
        "validation.every_n_steps=0",  # evaluation mode would compile the layers a second time
        f"dataset.micro_batch_size={GLOBAL_BATCH}",
        "++use_torch_compile=true",
        f"logger.metrics_file={metrics_file}",
    ]
    result = launch(args, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = read_metrics(metrics_file)[0]["train/loss"]
    eager = one_and_two_ranks("train_ddp.py")[1][0]["train/loss"]
    assert abs(compiled - eager) / eager < 1e-4


@pytest.mark.e2e
def test_slurm_launch_line_runs_two_nodes(tmp_path):
    """The per-node launch of slurm.sh, started twice as two "nodes" of one job, trains one 2-rank model."""
    port = free_port()
    nodes = []
    for node in (0, 1):
        env = cpu_env(
            SLURM_NNODES="2",
            SLURM_NODEID=str(node),
            SLURM_JOB_ID="strategies-test",
            GPUS_PER_NODE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this Python's torchrun
            RECIPE_DIR=str(RECIPE_DIR),
        )
        args = [
            *SMALL,
            "dataset.micro_batch_size=2",
            "validation.every_n_steps=0",
            f"logger.metrics_file={tmp_path / f'node{node}.jsonl'}",
            f"hydra.run.dir={tmp_path / f'hydra{node}'}",
        ]
        log_file = (tmp_path / f"node{node}.log").open("w")  # a file, not a pipe: neither node can block on it
        nodes.append(
            subprocess.Popen(
                ["bash", "slurm.sh", "--node", "train_ddp.py", *args],
                cwd=RECIPE_DIR,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a stuck node is stopped with its torchrun and ranks
            )
        )
    deadline = time.monotonic() + 300
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # reported below, with both nodes' logs
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    outputs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert "--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d" in outputs[0]
    log = "\n".join(outputs)
    assert "node 0 of 2" in log and "node 1 of 2" in log and "Rank 0/2" in log
    assert "Rank 1/2" not in log  # ranks other than 0 log warnings and errors only
    # rank 0, which writes the metrics, lives on whichever node joined the rendezvous first
    (metrics_file,) = [f for f in (tmp_path / "node0.jsonl", tmp_path / "node1.jsonl") if f.exists()]
    assert [m["step"] for m in read_metrics(metrics_file)] == [1, 2, 3]


@pytest.mark.e2e
def test_slurm_passes_the_preemption_signal_to_the_training_ranks(tmp_path):
    """SIGUSR1 to a node's launcher reaches its training processes (which stop early), not torchrun."""
    metrics_file = tmp_path / "metrics.jsonl"
    node = subprocess.Popen(
        [
            "bash",
            "slurm.sh",
            "--node",
            "train_fsdp2.py",
            *SMALL,
            "num_train_steps=1000",
            "dataset.micro_batch_size=2",
            "validation.every_n_steps=0",
            f"logger.metrics_file={metrics_file}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=RECIPE_DIR,
        env=cpu_env(
            GPUS_PER_NODE="2",
            MASTER_PORT=str(free_port()),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            RECIPE_DIR=str(RECIPE_DIR),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (metrics_file.exists() and metrics_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    node.send_signal(signal.SIGUSR1)
    output = node.communicate(timeout=120)[0]
    assert node.returncode == 0, output[-3000:]
    assert read_metrics(metrics_file)[-1]["step"] < 1000  # stopped at the signal, not at the end


def test_slurm_job_runs_one_launcher_per_node_in_the_container(tmp_path):
    """The batch part of slurm.sh (dry run): rendezvous on the first node, pyxis flags, the per-node launch."""
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho gpu-node-07\necho gpu-node-08\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SLURM_DRY_RUN": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_SUBMIT_DIR": str(RECIPE_DIR),
        "CONTAINER_IMAGE": "/images/esm2-te.sqsh",
        "CONTAINER_MOUNTS": "/data:/data",
    }
    for name in ("GPUS_PER_NODE", "MASTER_PORT", "RECIPE_DIR"):
        env.pop(name, None)
    args = ["train_fsdp2.py", "--config-name", "L1_650M", "num_train_steps=10"]
    batch_script = tmp_path / "slurm_script"  # sbatch runs a copy of the script from its spool folder
    batch_script.write_text((RECIPE_DIR / "slurm.sh").read_text())
    result = subprocess.run(["bash", batch_script, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("MASTER_ADDR=gpu-node-07 MASTER_PORT=21234 GPUS_PER_NODE=8 srun --ntasks-per-node=1")
    assert f"--container-image=/images/esm2-te.sqsh --container-mounts={RECIPE_DIR}:{RECIPE_DIR},/data:/data" in line
    assert line.endswith(f"bash {RECIPE_DIR}/slurm.sh --node {' '.join(args)}")


@pytest.mark.e2e
def test_megatron_fsdp_on_cpu_fails_before_loading_data(tmp_path):
    result = launch(["train_mfsdp.py", "--config-name", "L0_sanity"], tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert CUDA_MESSAGE in output
    assert "Model:" not in output and "Rank 0/1" not in output and "step 1" not in output  # nothing was set up


def test_dockerfile_keeps_the_images_torch_and_transformer_engine():
    dockerfile = (RECIPE_DIR / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "pip list --format=freeze" in dockerfile and "transformer[-_]engine" in dockerfile
    assert "--constraint /tmp/image-constraints.txt --requirement requirements.txt" in dockerfile
    assert ".git" in (RECIPE_DIR / ".dockerignore").read_text().split()


# TE's attention backward made deterministic, so that the eager run's own drift between runs leaves the comparison;
# graphs replay the same kernels. GRAPHED_WEIGHTS (relative L2 of all final weights) is an estimate, not
# yet measured on a GPU: each run records the figure ("graphed_vs_eager[...]" in GPU_METRICS_FILE).
DETERMINISTIC_GPU = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
GRAPHED_LOSS, GRAPHED_WEIGHTS = 2e-3, 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine")
@pytest.mark.parametrize(
    ("config_name", "precision", "plan"),
    [
        ("L0_sanity", "fp8_current", ["fp8_layers=[2,3,4,5]"]),  # three graphs: BF16, FP8, BF16 layers
        ("L0_sanity_amplify", "bf16", []),
        ("L0_sanity", "fp8_current", []),
        ("L0_sanity", "fp8_delayed", []),
        ("L0_sanity", "bf16", []),
        ("L0_sanity", "bf16", ["master_weights=optimizer"]),  # BF16 parameters, FP32 masters in TE's FusedAdam
    ],
)
def test_cuda_graphed_training_gives_the_eager_losses(tmp_path, config_name, precision, plan):
    """train_ddp.py with cuda_graphs=true against the same static-shape run without graphs, ESM-2 and AMPLIFY:
    the per-step losses and the exported final weights after 12 steps.

    The first two steps match bit for bit (the same kernels on the same weights and batches). Without
    DETERMINISTIC_GPU the runs then drift apart by up to ~3e-4 of the loss (35M and 650M on an H200), as two eager
    runs of the same command do (35M: 2 of 50 steps identical, up to 1.8e-4 apart).
    """
    from gpu_checks import final_weights, record, weights_difference

    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")
    losses, weights = {}, {}
    for mode in ("static_shapes=true", "cuda_graphs=true"):
        out = tmp_path / mode.split("=")[0]
        result = launch(
            [
                "train_ddp.py",
                "--config-name",
                config_name,
                f"precision={precision}",
                *plan,
                "use_te=true",
                "use_sequence_packing=true",
                mode,
                "num_train_steps=12",
                "logger.log_every_n_steps=1",
                "validation.every_n_steps=0",
                f"logger.metrics_file={out / 'metrics.jsonl'}",
                f"checkpoint.ckpt_dir={out / 'ckpt'}",
                "checkpoint.save_every_n_steps=1000",
            ],
            out,
            env=DETERMINISTIC_GPU,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        losses[mode] = [m["train/loss"] for m in read_metrics(out / "metrics.jsonl") if "train/loss" in m]
        weights[mode] = final_weights(out / "ckpt")
    graphed, eager = losses["cuda_graphs=true"], losses["static_shapes=true"]
    assert len(graphed) == len(eager) == 12
    worst = max(abs(g - e) / e for g, e in zip(graphed, eager, strict=True))
    difference = weights_difference(weights["cuda_graphs=true"], weights["static_shapes=true"])
    record(
        f"graphed_vs_eager[{config_name}, {precision}{', ' + ' '.join(plan) if plan else ''}]",
        max_loss_rel=worst,
        identical_steps=sum(g == e for g, e in zip(graphed, eager, strict=True)),
        **difference,
    )
    assert graphed[:2] == eager[:2]
    assert worst < GRAPHED_LOSS
    assert difference["all_weights_rel_l2"] < GRAPHED_WEIGHTS
