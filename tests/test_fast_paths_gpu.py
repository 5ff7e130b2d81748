"""Each fast path against its plain twin on one GPU, through the recipe's own entrypoints (`conftest.launch`).

Run on a CUDA machine with TransformerEngine:  NVIDIA_TF32_OVERRIDE=0 python -m pytest tests/test_fast_paths_gpu.py
(`make test-gpu` runs it with the other GPU tests). Measured differences are printed and, when GPU_METRICS_FILE is
set, appended to that file as JSON lines.

- Equivalence: the same seed and the same batches through two ways of training; the per-step losses and the exported
  final weights (`<ckpt_dir>/final_model`) must agree within the bound each test states. FSDP2 (meta-device build,
  BF16 MixedPrecisionPolicy), Megatron-FSDP and `use_torch_compile` against train_ddp.py, and the Triton RoPE kernel
  against TE's on sequences beyond ESM-2's 1,026 positions. CUDA graphs against eager are in test_strategies.py.
- Stop-and-go: N steps straight against N/2, a checkpoint, and N/2 after resuming must give the same losses and final
  weights bit for bit, with FP8 delayed scaling state, FP8 primary weights, and the master weights in FusedAdam.
- The start-up memory estimate against the measured peak (`torch.cuda.max_memory_allocated`), three shapes.

Every run asks for deterministic kernels (`DETERMINISTIC`: TE's fused attention without its non-deterministic
backward), which stop-and-go needs to be bit-exact and which leaves the path under test as the only source of a
difference.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import RECIPE_DIR, compose, launch, read_metrics
from gpu_checks import final_weights, record, weights_difference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]

DETERMINISTIC = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
COMMON = [
    "--config-name",
    "L0_sanity",  # ESM-2 8M, the shipped sample, 8 x 256 = 2,048 tokens per step
    "use_te=true",
    "use_sequence_packing=true",
    "logger.log_every_n_steps=1",
    "logger.progress_bar=false",
    "validation.every_n_steps=0",
    "checkpoint.save_every_n_steps=1000",
]
STEPS = 12


@pytest.fixture(autouse=True, scope="module")
def _needs_te() -> None:
    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")


@dataclass
class Trained:
    """What a run left: its per-step losses, its exported final weights (if any), its log and its peak memory."""

    losses: list[float]
    weights: dict[str, torch.Tensor] | None
    log: str
    peak_gib: float


def train(
    out: Path,
    entrypoint: str,
    *overrides: str,
    steps: int = STEPS,
    ckpt: Path | None = None,
    metrics: Path | None = None,
    checkpoints: bool = True,
) -> Trained:
    """Run `entrypoint` on L0_sanity with `overrides`; the metrics of every step and, with `checkpoints`, the
    final model exported to `ckpt` (default `out/ckpt`)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt or out / "ckpt"
    metrics = metrics or out / "metrics.jsonl"
    args = [
        entrypoint,
        *COMMON,
        f"num_train_steps={steps}",
        f"logger.metrics_file={metrics}",
        f"checkpoint.ckpt_dir={ckpt if checkpoints else 'null'}",
        *overrides,
    ]
    result = launch(args, out, env=DETERMINISTIC, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    rows = [row for row in read_metrics(metrics) if "train/loss" in row]
    completed = checkpoints and (ckpt / "final_model").exists()
    return Trained(
        [row["train/loss"] for row in rows],
        final_weights(ckpt) if completed else None,
        log,
        max(row["train/peak_memory_gib"] for row in rows),
    )


def compare(test: str, actual: Trained, expected: Trained) -> dict[str, float | str]:
    """Per-step losses and final weights of two runs; recorded, then returned for the test's bounds."""
    assert len(actual.losses) == len(expected.losses) == STEPS
    gaps = [abs(a - e) / e for a, e in zip(actual.losses, expected.losses, strict=True)]
    metrics = {
        "max_loss_rel": max(gaps),
        "first_loss_rel": gaps[0],
        "identical_steps": sum(a == e for a, e in zip(actual.losses, expected.losses, strict=True)),
        "losses": [round(v, 5) for v in actual.losses],
        "expected_losses": [round(v, 5) for v in expected.losses],
        **weights_difference(actual.weights, expected.weights),
    }
    record(test, **metrics)
    assert expected.losses[-1] < expected.losses[0], "the reference run must train"
    return metrics


def initial_states(config_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The TE model's weights after one seed, built in place (DDP) and on the meta device then materialised (FSDP2)."""
    from model import build_model, load_model_config, materialize

    cfg = compose(config_name, ["use_te=true", "use_sequence_packing=true"])
    model_config = load_model_config(cfg.model_tag)
    states = {}
    for device in ("cuda", "meta"):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, model_config, use_te=True, attn_input_format="thd", device=device)
        if device == "meta":
            materialize(model, torch.device("cuda"))
        states[device] = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return states


@pytest.mark.parametrize("config_name", ["L0_sanity", "L0_sanity_amplify"])
def test_te_model_built_on_meta_gets_the_weights_it_gets_built_in_place(config_name: str, monkeypatch) -> None:
    """FSDP2 builds the TE model on the meta device and initialises it after sharding; DDP builds it in place. From
    one seed both must hold the same weights, or no run of one can be compared with a run of the other.

    Negative control: with the modules' own initial draws moving the generators again (as before
    `construction_draws_kept_apart`), the check finds the weights apart."""
    import contextlib

    import modeling_amplify_te
    import modeling_esm_te

    def differing(states: dict[str, dict[str, torch.Tensor]]) -> list[str]:
        assert states["cuda"].keys() == states["meta"].keys()
        return [k for k, v in states["cuda"].items() if not torch.equal(v, states["meta"][k])]

    different = differing(initial_states(config_name))
    for module in (modeling_esm_te, modeling_amplify_te):
        monkeypatch.setattr(module, "construction_draws_kept_apart", lambda device: contextlib.nullcontext())
    broken = differing(initial_states(config_name))
    record(f"meta_vs_in_place_init[{config_name}]", differing_tensors=len(different), without_fix=len(broken))
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert broken, "the negative control must find the weights apart"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Trained:
    """train_ddp.py on L0_sanity with the TE model, packed BF16: the twin of FSDP2 and torch.compile."""
    return train(tmp_path_factory.mktemp("ddp"), "train_ddp.py")


# Bounds of the equivalence tests: relative per-step loss and relative L2 of all final weights after STEPS steps.
# They are estimates of BF16 rounding apart, not yet measured on a GPU (FSDP2 and Megatron-FSDP compute with BF16
# parameters, embeddings and LayerNorms too, where DDP casts FP32 ones under autocast; torch.compile fuses other
# kernels; the two RoPE kernels differ in the last bit of 0.005% of their outputs). Each run records its figures
# ("fsdp2_vs_ddp" and the like in GPU_METRICS_FILE), which are to replace them, with the card and the TE version.
FSDP2_LOSS, FSDP2_WEIGHTS = 5e-3, 5e-3
MFSDP_LOSS, MFSDP_WEIGHTS = 5e-3, 5e-3
COMPILE_LOSS, COMPILE_WEIGHTS = 5e-3, 5e-3
ROPE_LOSS, ROPE_WEIGHTS = 5e-3, 5e-3


@pytest.mark.xdist_group("ddp_twin")
def test_fsdp2_with_the_te_model_trains_as_ddp(ddp_run, tmp_path) -> None:
    fsdp2 = train(tmp_path, "train_fsdp2.py")  # use_meta_device=true: built on meta, allocated after sharding
    metrics = compare("fsdp2_vs_ddp", fsdp2, ddp_run)
    assert metrics["max_loss_rel"] < FSDP2_LOSS
    assert metrics["all_weights_rel_l2"] < FSDP2_WEIGHTS


@pytest.mark.xdist_group("ddp_twin")
def test_torch_compile_with_the_te_model_trains_as_eager(ddp_run, tmp_path) -> None:
    compiled = train(tmp_path, "train_ddp.py", "use_torch_compile=true")
    metrics = compare("torch_compile_vs_eager", compiled, ddp_run)
    assert metrics["max_loss_rel"] < COMPILE_LOSS
    assert metrics["all_weights_rel_l2"] < COMPILE_WEIGHTS


@pytest.fixture(scope="module")
def bf16_exact_model(tmp_path_factory) -> Path:
    """A random ESM-2 8M in transformers' format with weights that BF16 holds exactly.

    Megatron-FSDP materialises a meta-device model module by module in its own order and draws other numbers than
    DDP from the same seed, and it keeps BF16 compute weights with FP32 main weights copied from them; started from
    these weights (`pretrained=true`), both strategies hold the same FP32 values at step 0.
    """
    from transformers import EsmConfig, EsmForMaskedLM

    torch.manual_seed(0)
    model = EsmForMaskedLM(EsmConfig.from_pretrained(RECIPE_DIR / "model_configs" / "esm2_t6_8M_UR50D"))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    path = tmp_path_factory.mktemp("bf16_exact") / "esm2_8M"
    model.save_pretrained(path)
    return path


def test_megatron_fsdp_trains_as_ddp(bf16_exact_model, tmp_path) -> None:
    start = ["pretrained=true", f"model_tag={bf16_exact_model}"]
    ddp = train(tmp_path / "ddp", "train_ddp.py", *start)
    mfsdp = train(tmp_path / "mfsdp", "train_mfsdp.py", *start)
    metrics = compare("mfsdp_vs_ddp", mfsdp, ddp)
    assert metrics["max_loss_rel"] < MFSDP_LOSS
    assert metrics["all_weights_rel_l2"] < MFSDP_WEIGHTS


@pytest.fixture(scope="module")
def long_proteins(tmp_path_factory) -> Path:
    """48 records of at least 3,000 residues (sample proteins joined end to end)."""
    path = tmp_path_factory.mktemp("long") / "long.faa"
    script = RECIPE_DIR / "benchmarks" / "make_long_proteins.py"
    command = [sys.executable, script, "--out", path, "--count", "48", "--min-length", "3000"]
    subprocess.run(command, check=True, capture_output=True)
    return path


def test_triton_rope_trains_sequences_beyond_1026_tokens_as_te_rope(long_proteins, tmp_path) -> None:
    """4,096-token windows of the long records, two per 8,192-token pack: positions up to 4,095."""
    data = [
        f"dataset.path={long_proteins}",
        "dataset.max_seq_length=4096",
        "token_micro_batch_size=8192",
        "dataset.validation_size=0",
    ]
    runs = {
        kernel: train(tmp_path / kernel, "train_ddp.py", *data, f"rope_kernel={kernel}") for kernel in ("te", "triton")
    }
    assert "beyond the 1026 positions" in runs["triton"].log
    metrics = compare("rope_triton_vs_te_long", runs["triton"], runs["te"])
    assert metrics["max_loss_rel"] < ROPE_LOSS
    assert metrics["all_weights_rel_l2"] < ROPE_WEIGHTS


STOP_AND_GO = {  # name: (entrypoint, overrides)
    "fp8_delayed_state": ("train_ddp.py", ["precision=fp8_delayed"]),
    "fp8_primary_weights": (
        "train_ddp.py",
        ["precision=fp8_delayed", "fp8_config.quantized_model_init=true", "master_weights=optimizer"],
    ),
    "fused_adam_masters": ("train_ddp.py", ["master_weights=optimizer"]),
    "fsdp2_fp8_delayed_state": ("train_fsdp2.py", ["precision=fp8_delayed"]),  # DTensor shards, FP8 state
    "mfsdp_fp8_delayed_state": ("train_mfsdp.py", ["precision=fp8_delayed"]),  # Megatron-FSDP's uneven shards
}


@pytest.mark.parametrize("name", list(STOP_AND_GO))
def test_stop_and_go_on_the_gpu_is_bit_exact(tmp_path, name: str) -> None:
    """8 steps straight against 4, a checkpoint and `exit_after_n_steps`, then 4 more after resuming."""
    entrypoint, overrides = STOP_AND_GO[name]
    straight = train(tmp_path / "straight", entrypoint, *overrides, steps=8)
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    first = train(
        tmp_path / "first",
        entrypoint,
        *overrides,
        "checkpoint.exit_after_n_steps=4",
        steps=8,
        ckpt=ckpt,
        metrics=metrics,
    )
    assert len(first.losses) == 4 and first.weights is None
    second = train(tmp_path / "second", entrypoint, *overrides, steps=8, ckpt=ckpt, metrics=metrics)
    assert "Resumed from" in second.log and "(step 4)" in second.log, second.log[-3000:]
    differing = [key for key, value in straight.weights.items() if not torch.equal(value, second.weights[key])]
    record(
        f"stop_and_go[{name}]",
        straight=straight.losses,
        resumed=second.losses,
        identical_steps=sum(a == b for a, b in zip(straight.losses, second.losses, strict=True)),
        differing_tensors=len(differing),
        **weights_difference(second.weights, straight.weights),
    )
    assert second.losses == straight.losses  # all 8 steps, bit for bit
    assert not differing, differing[:5]


MEMORY_SHAPES = {
    "650M_bf16_8k": ["model_tag=esm2_t33_650M_UR50D", "token_micro_batch_size=8192"],
    "150M_fp8_delayed_16k": ["model_tag=esm2_t30_150M_UR50D", "precision=fp8_delayed", "token_micro_batch_size=16384"],
    "650M_bf16_full_checkpointing_16k": [
        "model_tag=esm2_t33_650M_UR50D",
        "activation_checkpointing.mode=full",
        "token_micro_batch_size=16384",
    ],
}


def test_memory_estimate_is_within_15_percent_of_the_measured_peak(tmp_path) -> None:
    """The start-up estimate against `torch.cuda.max_memory_allocated` after 3 steps, one process per shape (run one
    after the other: each holds up to ~20 GiB)."""
    results = {}
    for name, overrides in MEMORY_SHAPES.items():
        run = train(
            tmp_path / name, "train_ddp.py", *overrides, "dataset.max_seq_length=1024", steps=3, checkpoints=False
        )
        match = re.search(r"Estimated peak memory per rank: ([\d.]+) GiB", run.log)
        assert match, run.log[-3000:]
        estimate = float(match[1])
        results[name] = {"estimate_gib": estimate, "measured_gib": run.peak_gib, "rel": estimate / run.peak_gib - 1}
    record("memory_estimate", **results)
    for name, result in results.items():
        assert abs(result["rel"]) < 0.15, (name, result)
