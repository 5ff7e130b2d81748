"""The benchmark on CPU: FLOP accounting, per-variant configs and the report plumbing (no timing asserted)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose, launch, read_fasta_sequences
from transformers import EsmConfig, EsmForMaskedLM

from benchmark import VARIANTS, matmul_parameters, model_flops, real_lengths, variant_config
from collator import BSHDCollator, MLMMasker, THDCollator
from model import load_model_config


def test_flops_match_a_hand_computation():
    config = EsmConfig(vocab_size=5, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    # P_matmul = L(4H² + 2HI) + H² + HV = 2·(4·64 + 2·8·16) + 64 + 8·5 = 1024 + 104
    assert matmul_parameters(config) == 1128
    # two sequences of 3 and 5 real tokens: 6·P·(3 + 5) + 12·L·H·(3² + 5²) = 54,144 + 6,528
    assert model_flops(np.array([3, 5]), config) == 60_672
    assert model_flops(np.array([], dtype=np.int64), config) == 0


def test_matmul_parameters_are_the_reference_models_linear_weights():
    config = load_model_config("esm2_t6_8M_UR50D")
    with torch.device("meta"):
        model = EsmForMaskedLM(config)
    linear = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "contact_head" not in name
    )
    assert matmul_parameters(config) == linear


def test_real_lengths_of_hand_made_batches():
    pad = 1
    bshd = {"input_ids": torch.tensor([[0, 5, 6, 2, pad, pad], [0, 5, 6, 7, 8, 2], [pad] * 6])}
    assert real_lengths(bshd, pad).tolist() == [4, 6]
    thd = {
        "input_ids": torch.tensor([[0, 5, 2, 0, 6, 7, 2, pad]]),
        "cu_seqlens": torch.tensor([0, 3, 7, 8], dtype=torch.int32),
    }
    assert real_lengths(thd, pad).tolist() == [3, 4]


def test_real_lengths_of_collated_batches_are_the_cropped_sequences(tokenizer):
    ids = tokenizer(read_fasta_sequences(12))["input_ids"]
    expected = [min(len(x), 300) for x in ids]
    masker = MLMMasker.from_tokenizer(tokenizer, max_seq_length=300, seed=0)
    samples = [{"input_ids": x} for x in ids]
    pad = tokenizer.pad_token_id
    padded = BSHDCollator(masker, pad, pad_to_length=300)(samples)
    packed = THDCollator(masker, pad, token_multiple=128)(samples)
    assert packed["cu_seqlens"][-1] > sum(expected)  # a trailing padding segment that must not count
    assert real_lengths(padded, pad).tolist() == expected
    assert real_lengths(packed, pad).tolist() == expected


def test_variant_configs_share_the_token_capacity():
    cfg = compose("benchmark")
    model_config = "esm2_t6_8M_UR50D"
    reference = variant_config(cfg, model_config, VARIANTS["hf_pad1024"], warmup=20, timed=10)
    assert reference.dataset.micro_batch_size * reference.dataset.max_seq_length == 16384
    assert reference.dataset.pad_to_max_length and reference.use_te == "false"
    assert (reference.num_train_steps, reference.logger.log_every_n_steps) == (30, 10)
    assert reference.checkpoint.ckpt_dir is None and reference.validation.every_n_steps == 0
    longest = variant_config(cfg, model_config, VARIANTS["hf_padlongest"], warmup=20, timed=10)
    assert longest.dataset.micro_batch_size == 16 and not longest.dataset.pad_to_max_length
    packed = variant_config(cfg, model_config, VARIANTS["te_thd"], warmup=20, timed=10)
    assert packed.use_sequence_packing and packed.token_micro_batch_size == 16384 and not packed.fp8_config.enabled
    recipes = {name: variant_config(cfg, model_config, VARIANTS[name], 20, 10).fp8_config for name in VARIANTS}
    assert recipes["te_thd_fp8_delayed"].recipe == "DelayedScaling" and recipes["te_thd_fp8_delayed"].enabled
    assert recipes["te_thd_fp8_current"].recipe == "Float8CurrentScaling"
    assert recipes["te_thd_fp8_block"].recipe == "Float8BlockScaling"
    assert set(cfg.benchmark.variants) <= set(VARIANTS)


@pytest.mark.e2e
def test_benchmark_writes_table_json_and_chart_on_cpu(tmp_path):
    out = tmp_path / "results"
    result = launch(
        [
            "benchmark.py",
            "--config-name",
            "benchmark",
            "benchmark.models=[esm2_t6_8M_UR50D]",
            "benchmark.variants=[hf_pad1024,hf_padlongest,te_thd]",
            "dataset.max_seq_length=256",
            "benchmark.token_budget=512",
            "benchmark.warmup_steps=3",
            "benchmark.timed_steps=3",
            "benchmark.profile=true",
            "benchmark.profile_steps=1",
            "dataset.num_workers=1",
            f"benchmark.output_dir={out}",
        ],
        tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (markdown,) = out.glob("benchmark_cpu_*_ddp_fp32-master.md")  # the default strategy and weights, in the name
    for suffix in (".json", ".png", ".svg"):
        assert markdown.with_suffix(suffix).stat().st_size > 0
    report = json.loads(markdown.with_suffix(".json").read_text())
    assert report["meta"]["ceilings_tflops"]["fp32"] > 0
    assert (report["meta"]["warmup_steps"], report["meta"]["timed_steps"]) == (3, 3)
    assert (report["meta"]["strategy"], report["meta"]["weights"]) == ("ddp", "FP32 master weights")
    rows = {row["variant"]: row for row in report["rows"]}
    for name in ("hf_pad1024", "hf_padlongest"):
        row = rows[name]
        assert row["status"] == "ok", row
        for key in ("tokens_per_s", "tflops", "mfu", "step_time_s", "peak_memory_gib"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        # The FLOPs are those of the timed window's batches: the tokens recorded for them, over the window's
        # duration, reproduce the throughput the training loop logged for that window.
        assert row["window_tokens"] / (3 * row["step_time_s"]) == pytest.approx(row["tokens_per_s"], rel=1e-9)
        assert row["tflops"] == pytest.approx(row["window_flops"] / (3 * row["step_time_s"]) / 1e12)
    assert rows["hf_pad1024"]["speedup"] == 1.0
    assert rows["hf_pad1024"]["padding_fraction"] >= rows["hf_padlongest"]["padding_fraction"]
    assert rows["te_thd"]["status"] == "skipped"
    assert "no CUDA device is visible" in rows["te_thd"]["reason"]
    table = markdown.read_text()
    assert "| ESM-2 8M | te_thd | skipped |" in table and "12·L·H·s²" in table
    assert "| ESM-2 8M | hf_padlongest |" in result.stdout  # the table is printed last, for remote runs
    for name in ("hf_pad1024", "hf_padlongest"):
        assert (out / "profile" / f"esm2_t6_8M_UR50D_{name}_kernels.txt").stat().st_size > 0
        assert (out / "profile" / f"esm2_t6_8M_UR50D_{name}_trace.json.gz").stat().st_size > 0


def _run_benchmark(tmp_path, *overrides):
    return launch(
        ["benchmark.py", "--config-name", "benchmark", "benchmark.models=[esm2_t6_8M_UR50D]",
         "dataset.max_seq_length=256", "benchmark.token_budget=512", "dataset.num_workers=0",
         f"benchmark.output_dir={tmp_path / 'results'}", *overrides],
        tmp_path, timeout=300,
    )  # fmt: skip


@pytest.mark.e2e
def test_benchmark_wraps_like_the_fsdp2_entrypoint_on_request(tmp_path):
    result = _run_benchmark(
        tmp_path,
        "benchmark.strategy=fsdp2",
        "use_fp32_master_weights=false",
        "benchmark.variants=[hf_padlongest]",
        "benchmark.warmup_steps=1",
        "benchmark.timed_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("benchmark_cpu_*_fsdp2_bf16-weights.json")
    report = json.loads(path.read_text())
    assert report["meta"]["strategy"] == "fsdp2" and "BF16 weights" in report["meta"]["weights"]
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["tokens_per_s"] > 0, row
    assert "FSDP2 on one device" in path.with_suffix(".md").read_text()


@pytest.mark.e2e
def test_benchmark_refuses_an_unknown_strategy_before_measuring(tmp_path):
    result = _run_benchmark(tmp_path, "benchmark.strategy=zero3", "benchmark.variants=[hf_padlongest]")
    assert result.returncode != 0
    assert "benchmark.strategy='zero3' must be one of ('ddp', 'fsdp2', 'mfsdp')" in result.stderr
    assert not list((tmp_path / "results").glob("*.json"))


def test_benchmark_knows_the_three_strategies_of_the_entrypoints():
    import train_ddp
    import train_fsdp2
    import train_mfsdp
    from benchmark import STRATEGIES, skip_reason

    assert STRATEGIES == {"ddp": train_ddp.STRATEGY, "fsdp2": train_fsdp2.STRATEGY, "mfsdp": train_mfsdp.STRATEGY}
    cfg = variant_config(compose("benchmark"), "esm2_t6_8M_UR50D", VARIANTS["hf_padlongest"], warmup=2, timed=2)
    assert skip_reason(cfg, VARIANTS["hf_padlongest"], train_mfsdp.STRATEGY) == "mfsdp needs CUDA GPUs"
    assert skip_reason(cfg, VARIANTS["hf_padlongest"], train_ddp.STRATEGY) is None
