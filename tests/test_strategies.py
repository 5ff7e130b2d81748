"""The parallelism strategies on CPU (gloo, FP32): same losses on 1 and 2 ranks, Slurm launch, Megatron-FSDP refusals.

Why one rank and two ranks give the same first loss: the training sampler hands rank r positions r, r+W, r+2W, ...
of one global permutation, so 2 ranks x 4 sequences are the 8 sequences one rank takes as its micro-batch of 8;
masking is decided per sequence, and the loss is normalised by the global masked-token count (training.py), so
both runs compute the same mean over the same tokens with the same initial weights.
"""

import functools
import itertools
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
from conftest import RECIPE_DIR, compose, free_port

import train_mfsdp
from model import build_model, load_model_config

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
CUDA_MESSAGE = "Megatron-FSDP needs CUDA GPUs; use train_fsdp2.py or train_ddp.py on CPU."


def cpu_env(**extra):
    """The test environment for child processes: one thread each, so several ranks share two cores fairly."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def launch(args, out_dir, nproc=1, timeout=300):
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*launcher, *args, f"hydra.run.dir={out_dir / 'hydra'}"],
        cwd=RECIPE_DIR,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory):
    """Metrics of an entrypoint's run on one rank (micro-batch 8) and on two ranks (micro-batch 4 each), run once."""

    @functools.cache
    def metrics_of(entrypoint):
        metrics = {}
        for nproc in (1, 2):
            out_dir = tmp_path_factory.mktemp(f"{entrypoint.removesuffix('.py')}_{nproc}")
            metrics_file = out_dir / "metrics.jsonl"
            args = [
                entrypoint,
                *SMALL,
                f"dataset.micro_batch_size={GLOBAL_BATCH // nproc}",
                f"logger.metrics_file={metrics_file}",
                f"logger.grad_norms_file={out_dir / 'grad_norms.json'}",
            ]
            result = launch(args, out_dir, nproc=nproc)
            assert result.returncode == 0, result.stderr[-3000:]
            metrics[nproc] = read_metrics(metrics_file)
            metrics[f"log_{nproc}"] = result.stdout + result.stderr
            metrics[f"grad_norms_{nproc}"] = json.loads((out_dir / "grad_norms.json").read_text())
        return metrics

    return metrics_of


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(("entrypoint", "share"), [("train_ddp.py", 1.0), ("train_fsdp2.py", 0.5)])
def test_sharding_divides_the_parameters_each_rank_stores(one_and_two_ranks, entrypoint, share):
    runs = one_and_two_ranks(entrypoint)
    one_local, one_whole = stored_parameter_gib(runs["log_1"])
    two_local, two_whole = stored_parameter_gib(runs["log_2"])
    assert one_local == one_whole == two_whole
    assert two_local == pytest.approx(share * one_whole, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("entrypoint", ["train_ddp.py", "train_fsdp2.py"])
def test_first_loss_on_two_ranks_matches_one_rank(one_and_two_ranks, entrypoint):
    metrics = one_and_two_ranks(entrypoint)
    one, two = metrics[1][0]["train/loss"], metrics[2][0]["train/loss"]
    assert abs(two - one) / one < 1e-4, (one, two)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    result = launch(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = read_metrics(metrics_file)[0]["train/loss"]
    eager = one_and_two_ranks("train_ddp.py")[1][0]["train/loss"]
    assert abs(compiled - eager) / eager < 1e-4


@pytest.mark.slow
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
        nodes.append(
            subprocess.Popen(
                ["bash", "slurm.sh", "--node", "train_ddp.py", *args],
                cwd=RECIPE_DIR,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert "--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d" in outputs[0]
    log = "\n".join(outputs)
    assert "Rank 0/2" in log and "Rank 1/2" in log
    # rank 0, which writes the metrics, lives on whichever node joined the rendezvous first
    (metrics_file,) = [f for f in (tmp_path / "node0.jsonl", tmp_path / "node1.jsonl") if f.exists()]
    assert [m["step"] for m in read_metrics(metrics_file)] == [1, 2, 3]


@pytest.mark.slow
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


@pytest.mark.slow
def test_megatron_fsdp_on_cpu_fails_before_loading_data(tmp_path):
    result = launch(["train_mfsdp.py", "--config-name", "L0_sanity"], tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert CUDA_MESSAGE in output
    assert "Model:" not in output and "Rank 0/1" not in output and "step 1" not in output  # nothing was set up


def test_megatron_fsdp_refuses_torch_compile_and_bad_options():
    cfg = compose("L0_sanity", ["++use_torch_compile=true", "++mfsdp.zero_dp_strategy=zero3", "++mfsdp.overlap=true"])
    with pytest.raises(train_mfsdp.MegatronFSDPError) as error:
        train_mfsdp.check_can_run(cfg)
    message = str(error.value)
    assert "use_torch_compile=true is not supported with Megatron-FSDP" in message
    assert "mfsdp.zero_dp_strategy='zero3' must be one of" in message
    assert "mfsdp.overlap: unknown key" in message
    assert CUDA_MESSAGE in message  # this machine has no GPU: every reason is listed at once


def test_megatron_fsdp_sees_the_model_output_as_a_tuple():
    """Megatron-FSDP hooks the start of backward only on tensor/tuple/list outputs, not on a transformers dict."""
    cfg = compose("L0_sanity")
    model = build_model(cfg, load_model_config(cfg.model_tag), use_te=False, device="cpu")
    input_ids = torch.tensor([[0, 5, 32, 9, 2]])
    labels = torch.tensor([[-100, -100, 6, -100, -100]])
    expected = model(input_ids=input_ids, labels=labels)
    train_mfsdp.return_tuple_outputs(model)
    output = model(input_ids=input_ids, labels=labels)
    assert isinstance(output, tuple) and not isinstance(expected, tuple)
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.loss, expected.loss)
    assert output.logits is output[1]
    output.loss.backward()
    assert model.lm_head.bias.grad.abs().sum() > 0


def test_megatron_fsdp_meta_materialisation_gives_esm2_init():
    """Megatron-FSDP's meta-device protocol, replayed on CPU: per owning module, to_empty then reset_parameters."""
    cfg = compose("L0_sanity")
    model = build_model(cfg, load_model_config(cfg.model_tag), use_te=False, device="meta")
    with train_mfsdp.esm2_initialisation_on_materialisation(model, torch.device("cpu")):
        owner = {}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                owner[param] = module  # the last module holding a shared weight, as Megatron-FSDP records it
        for module in dict.fromkeys(owner.values()):
            module.to_empty(device="cpu", recurse=False)
            module.reset_parameters()

    named = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    assert not [name for name, tensor in named.items() if tensor.is_meta]
    assert model.lm_head.decoder.weight is model.esm.embeddings.word_embeddings.weight
    assert not [m for m in model.modules() if "reset_parameters" in vars(m)]  # the hooks are gone again
    std = model.config.initializer_range
    for name, tensor in model.named_parameters():
        if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight") or "layer_norm_after.w" in name:
            assert torch.all(tensor == 1), name
        elif name.endswith("bias"):
            assert torch.all(tensor == 0), name
        elif tensor.dim() == 2 and tensor.numel() > 1000:
            assert abs(tensor.std().item() - std) < 0.1 * std, name
    assert torch.all(model.esm.embeddings.word_embeddings.weight[model.config.pad_token_id] == 0)
    reference = type(model)(model.config)
    for name, buffer in reference.named_buffers():
        assert torch.equal(named[name], buffer), name


def test_dockerfile_keeps_the_images_torch_and_transformer_engine():
    dockerfile = (RECIPE_DIR / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    assert "pip list --format=freeze" in dockerfile and "transformer[-_]engine" in dockerfile
    assert "--constraint /tmp/image-constraints.txt --requirement requirements.txt" in dockerfile
    assert ".git" in (RECIPE_DIR / ".dockerignore").read_text().split()
