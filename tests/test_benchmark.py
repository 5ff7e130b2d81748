"""The benchmark on CPU: FLOP accounting, per-variant configs, settings, and the repeat/interleave/median plumbing
with a tiny model (no timing asserted)."""

import json
import math
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, launch, read_fasta_sequences
from transformers import EsmConfig, EsmForMaskedLM

from benchmark import (
    VARIANTS,
    Group,
    Plan,
    benchmark_groups,
    benchmark_plan,
    copies_of_the_data,
    gpu_clocks,
    host_cpu,
    matmul_parameters,
    merged_length,
    model_flops,
    output_dir,
    parse_nvidia_smi,
    real_lengths,
    run_benchmark,
    spread_stats,
    summarize,
    variant_config,
)
from collator import BSHDCollator, MLMMasker, THDCollator
from dataset import list_data_files, read_fasta
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


PLAN = Plan(warmup=20, timed=10, repeats=3, token_budgets=(16384,), busy_fraction=True)


def test_variant_configs_share_the_token_capacity():
    cfg = compose("benchmark")
    model_config = "esm2_t6_8M_UR50D"
    reference = variant_config(cfg, model_config, VARIANTS["hf_pad1024"], 16384, PLAN)
    assert reference.dataset.micro_batch_size * reference.dataset.max_seq_length == 16384
    assert reference.dataset.pad_to_max_length and reference.use_te == "false"
    # the LR schedule spans the session: warm-up + 3 timed windows + the traced one, one log sync per window
    assert (reference.num_train_steps, reference.logger.log_every_n_steps) == (60, 10)
    assert reference.checkpoint.ckpt_dir is None and reference.validation.every_n_steps == 0
    assert reference.logger.grad_norms_file is None and not reference.wandb.enabled  # nothing extra in the windows
    longest = variant_config(cfg, model_config, VARIANTS["hf_padlongest"], 16384, PLAN)
    assert longest.dataset.micro_batch_size == 16 and not longest.dataset.pad_to_max_length
    assert variant_config(cfg, model_config, VARIANTS["hf_padlongest"], 65536, PLAN).dataset.micro_batch_size == 64
    packed = variant_config(cfg, model_config, VARIANTS["te_thd"], 8192, PLAN)
    assert packed.use_sequence_packing and packed.token_micro_batch_size == 8192 and not packed.fp8_config.enabled
    recipes = {name: variant_config(cfg, model_config, VARIANTS[name], 16384, PLAN).fp8_config for name in VARIANTS}
    assert recipes["te_thd_fp8_delayed"].recipe == "DelayedScaling" and recipes["te_thd_fp8_delayed"].enabled
    assert recipes["te_thd_fp8_current"].recipe == "Float8CurrentScaling"
    assert recipes["te_thd_fp8_block"].recipe == "Float8BlockScaling"
    assert set(cfg.benchmark.variants) <= set(VARIANTS)


def test_variant_overrides_apply_after_the_preset_and_only_to_that_variant():
    cfg = compose("benchmark")
    assert cfg.use_fp32_master_weights
    bf16 = variant_config(cfg, "esm2_t6_8M_UR50D", VARIANTS["te_thd_bf16_weights"], 16384, PLAN)
    assert not bf16.use_fp32_master_weights and bf16.use_sequence_packing and not bf16.fp8_config.enabled
    assert variant_config(cfg, "esm2_t6_8M_UR50D", VARIANTS["te_thd"], 16384, PLAN).use_fp32_master_weights
    assert cfg.use_fp32_master_weights  # the base config is not changed


def test_benchmark_knows_the_three_strategies_of_the_entrypoints():
    import train_ddp
    import train_fsdp2
    import train_mfsdp
    from benchmark import STRATEGIES, skip_reason

    assert STRATEGIES == {"ddp": train_ddp.STRATEGY, "fsdp2": train_fsdp2.STRATEGY, "mfsdp": train_mfsdp.STRATEGY}
    cfg = variant_config(compose("benchmark"), "esm2_t6_8M_UR50D", VARIANTS["hf_padlongest"], 16384, PLAN)
    assert skip_reason(cfg, VARIANTS["hf_padlongest"], train_mfsdp.STRATEGY) == "mfsdp needs CUDA GPUs"
    assert skip_reason(cfg, VARIANTS["hf_padlongest"], train_ddp.STRATEGY) is None


def test_plan_rounds_the_warm_up_to_whole_windows():
    plan = benchmark_plan(compose("benchmark"))
    assert plan == Plan(warmup=30, timed=30, repeats=3, token_budgets=(16384,), busy_fraction=True)
    assert plan.session_steps == 150  # 30 warm-up, 3 timed windows of 30, one traced window
    sweep = ["benchmark.token_budgets=[8192,16384,32768,65536]", "benchmark.warmup_steps=0", "benchmark.timed_steps=4"]
    plan = benchmark_plan(compose("benchmark", sweep))
    assert (plan.token_budgets, plan.warmup, plan.session_steps) == ((8192, 16384, 32768, 65536), 4, 20)


def test_groups_run_in_the_order_given_with_their_own_variants_and_budgets():
    default = compose(
        "benchmark", ["benchmark.models=[a,b]", "benchmark.variants=[x,y]", "benchmark.token_budgets=[2048,4096]"]
    )
    both = ("x", "y")
    expected = (Group("a", 2048, both), Group("a", 4096, both), Group("b", 2048, both), Group("b", 4096, both))
    assert benchmark_groups(default, benchmark_plan(default)) == expected
    cfg = compose("benchmark_targets")
    groups = benchmark_groups(cfg, benchmark_plan(cfg))
    assert [group.model_tag for group in groups[:3]] == ["esm2_t33_650M_UR50D"] * 2 + ["esm2_t30_150M_UR50D"]
    assert all(len(group.variants) == 1 for group in groups if group.model_tag == "esm2_t36_3B_UR50D")
    assert groups[-1].token_budget == 32768  # the sweep's own budget
    assert [group.profile for group in groups[:3]] == [True, True, True]
    assert [group.profile for group in groups[3:]] == [True, False, False, False]  # 3B BF16 only; no sweep profile
    small = compose("benchmark_targets_80gb")  # an 80 GB card: at most two 650M sessions alive at once
    groups_80gb = benchmark_groups(small, benchmark_plan(small))
    assert groups_80gb[0] == Group("esm2_t36_3B_UR50D", 16384, ("te_thd_graphs_optimizer_masters",))
    assert max(len(g.variants) for g in groups_80gb if g.model_tag == "esm2_t33_650M_UR50D") == 2
    rows = {(g.model_tag, g.token_budget, name) for g in groups_80gb for name in g.variants}
    reference_650m = ("esm2_t33_650M_UR50D", 16384, "hf_pad1024")  # 51 GiB: beside a graphed session, OOM at 80 GB
    assert rows == {(g.model_tag, g.token_budget, name) for g in groups for name in g.variants} - {reference_650m}
    assert {name for group in groups for name in group.variants} <= set(VARIANTS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["benchmark.groups=[{model:m}]"], "benchmark.groups[0] must give a model and its variants"),
        (["benchmark.groups=[{model:m,variants:[x],budget:1}]"], "benchmark.groups[0]: unknown keys ['budget']"),
        (["benchmark.groups=[{model:m,variants:[x],token_budgets:[512]}]"], "benchmark.groups[0].token_budgets [512]"),
        (["benchmark.groups=[{model:m,variants:[x,x]}]"], "benchmark.groups[0].variants must not list an entry twice"),
        (["benchmark.repeats=0"], "benchmark.repeats=0 must be at least 1"),
        (["benchmark.timed_steps=0"], "benchmark.timed_steps=0 must be at least 1"),
        (
            ["benchmark.token_budgets=[512,16384]"],
            "benchmark.token_budgets [512] must each be >= dataset.max_seq_length",
        ),
        (["benchmark.token_budgets=[]"], "must list at least one token budget"),
        (["benchmark.token_budgets=[2048,2048]"], "must not list an entry twice"),
        (["benchmark.strategy=zero3"], "benchmark.strategy='zero3' must be one of ('ddp', 'fsdp2', 'mfsdp')"),
        (["benchmark.epoch_copies=0"], "benchmark.epoch_copies=0 must be a positive integer"),
    ],
)
def test_settings_are_refused_before_anything_is_built_or_written(tmp_path, overrides, message):
    cfg = compose("benchmark", [*overrides, f"benchmark.output_dir={tmp_path / 'results'}"])
    with pytest.raises(ValueError, match=re.escape(message)):
        run_benchmark(cfg)
    assert not (tmp_path / "results").exists()


def test_all_problems_are_named_in_one_message():
    cfg = compose(
        "benchmark", ["benchmark.repeats=0", "benchmark.timed_steps=-1", "benchmark.token_budgets=[512,2048]"]
    )
    with pytest.raises(ValueError) as error:
        benchmark_plan(cfg)
    assert "repeats=0" in str(error.value) and "timed_steps=-1" in str(error.value)
    assert "[512] must each be >= dataset.max_seq_length (1024)" in str(error.value)


def test_epoch_copies_read_every_protein_that_many_times_per_epoch(tmp_path):
    cfg = compose("benchmark", ["benchmark.epoch_copies=3"])
    sample = [record["sequence"] for record in read_fasta(list_data_files(str(cfg.dataset.path)))]
    copies_of_the_data(cfg, tmp_path / "copies")
    files = list_data_files(str(cfg.dataset.path))
    assert Path(cfg.dataset.path).parent == tmp_path / "copies" and len(files) == 3
    assert [record["sequence"] for record in read_fasta(files)] == sample * 3
    for count in (3, 2):  # a later run: the same folder for the same count, its own for another
        again = compose("benchmark", [f"benchmark.epoch_copies={count}"])
        copies_of_the_data(again, tmp_path / "copies")
        assert (again.dataset.path == cfg.dataset.path) == (count == 3)
        assert [record["sequence"] for record in read_fasta(list_data_files(str(again.dataset.path)))] == sample * count


def test_busy_time_counts_overlapping_kernels_once():
    assert merged_length([]) == 0
    # [0, 10) and [5, 12) overlap (concurrent streams), [12, 15) touches, [20, 21) and [30, 40) ⊃ [32, 35) stand apart
    assert merged_length([(30, 40), (0, 10), (12, 15), (5, 12), (20, 21), (32, 35)]) == 12 + 3 + 1 + 10


def test_spread_stats_are_median_min_max_of_the_repeats():
    assert spread_stats("x", [3.0, 1.0, 2.0, 10.0]) == {
        "x": 2.5,
        "x_min": 1.0,
        "x_max": 10.0,
        "x_repeats": [3, 1, 2, 10],
    }
    assert spread_stats("x", [None, None])["x"] is None  # not measured (CPU): no median
    windows = [
        {"steps": 2, "tokens_per_s": t, "padded_tokens_per_s": 2 * t, "tflops": 1.0, "step_time_s": 0.5,
         "busy_fraction": b, "peak_memory_gib": m, "tokens": 100, "padded_tokens": 400, "sequences": 4,
         "flops": 7, "loss": 2.0, "epoch_boundary": e}
        for t, b, m, e in [(100.0, 0.5, 1.0, False), (120.0, 0.9, 3.0, True), (80.0, 0.7, 2.0, False)]
    ]  # fmt: skip
    row = summarize(windows)
    assert (row["tokens_per_s"], row["tokens_per_s_min"], row["tokens_per_s_max"]) == (100.0, 80.0, 120.0)
    assert row["spread"] == pytest.approx(0.5) and row["peak_memory_gib"] == 3.0
    assert row["busy_fraction"] is None  # never from the timed windows: a traced window of its own gives it
    assert row["padding_fraction"] == 0.75 and row["repeats"] == 3 and row["epoch_boundaries"] == 1
    assert row["reason"] == "an epoch boundary in 1/3 windows"


def _window(tokens_per_s):
    return {
        "steps": 2, "seconds": 1.0, "tokens_per_s": tokens_per_s, "padded_tokens_per_s": tokens_per_s, "tflops": 1.0,
        "step_time_s": 0.5, "busy_fraction": None, "peak_memory_gib": 1.0, "tokens": 100, "padded_tokens": 100,
        "sequences": 4, "flops": 7, "loss": 2.0, "epoch_boundary": False,
    }  # fmt: skip


def test_a_variant_that_fails_is_dropped_and_the_others_go_on(monkeypatch):
    import benchmark

    closed, ran = [], []

    class FakeSession:
        def __init__(self, name):
            self.name, self.windows = name, []

        def close(self):
            closed.append(self.name)

    def start_variant(cfg, model_tag, budget, name, plan):
        row = {"model": model_tag, "token_budget": budget, "variant": name, "status": "pending"}
        if name == "broken_build":
            return row | {"status": "failed", "reason": "RuntimeError: boom"}, None
        return row, FakeSession(name)

    def timed_window(session, plan):
        ran.append(session.name)
        if session.name == "oom_later" and session.windows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _window(100.0 * len(ran))

    monkeypatch.setattr(benchmark, "start_variant", start_variant)
    monkeypatch.setattr(benchmark, "timed_window", timed_window)
    cfg = compose("benchmark")
    report = {"rows": [], "windows": []}
    plan = Plan(warmup=2, timed=2, repeats=3, token_budgets=(2048,), busy_fraction=False)
    group = Group("esm2_t6_8M_UR50D", 2048, ("steady", "broken_build", "oom_later"))
    benchmark.measure_group(cfg, group, plan, report, save=lambda: None)
    assert ran == ["steady", "oom_later", "steady", "oom_later", "steady"]  # oom_later dropped after its OOM
    assert closed == ["oom_later", "steady"]  # the dropped session at once, the others at the end of the group
    steady, broken, oom = report["rows"]
    assert (broken["status"], oom["status"]) == ("failed", "OOM")
    assert oom["reason"] == "CUDA out of memory. Tried to allocate 2.00 GiB"  # the allocator's figures kept
    assert steady["status"] == "ok" and steady["tokens_per_s_repeats"] == [100.0, 300.0, 500.0]
    assert [(w["variant"], w["repeat"]) for w in report["windows"]] == [
        ("steady", 0), ("oom_later", 0), ("steady", 1), ("steady", 2)
    ]  # fmt: skip


def test_busy_fraction_comes_from_one_more_traced_window_per_variant(monkeypatch):
    """Timed windows run untraced; after the rounds each variant runs one traced window, which gives Busy only."""
    import benchmark

    calls = []

    class FakeSession:
        def __init__(self, name):
            self.name, self.windows = name, []
            self.run = types.SimpleNamespace(context=types.SimpleNamespace(device=torch.device("cuda", 0)))

        def close(self):
            pass

    def start_variant(cfg, model_tag, budget, name, plan):
        return {"model": model_tag, "token_budget": budget, "variant": name, "status": "pending"}, FakeSession(name)

    def timed_window(session, plan, traced=False):
        calls.append((session.name, traced))
        if traced and session.name == "b":
            raise RuntimeError("CUPTI unavailable")
        return _window(50.0 if traced else 100.0) | {"busy_fraction": 0.9 if traced else None}

    monkeypatch.setattr(benchmark, "start_variant", start_variant)
    monkeypatch.setattr(benchmark, "timed_window", timed_window)
    monkeypatch.setattr(benchmark, "shutdown_workers", lambda: None)
    cfg = compose("benchmark")
    report = {"rows": [], "windows": []}
    plan = Plan(warmup=2, timed=2, repeats=2, token_budgets=(2048,), busy_fraction=True)
    benchmark.measure_group(cfg, Group("esm2_t6_8M_UR50D", 2048, ("a", "b")), plan, report, save=lambda: None)
    assert calls == [("a", False), ("b", False), ("a", False), ("b", False), ("a", True), ("b", True)]
    a, b = report["rows"]
    assert a["tokens_per_s_repeats"] == [100.0, 100.0] and a["repeats"] == 2  # the traced window is not a repeat
    assert (a["busy_fraction"], a["traced_tokens_per_s"]) == (0.9, 50.0)
    assert b["status"] == "ok" and b["busy_fraction"] is None and "CUPTI unavailable" in b["busy_error"]
    assert [w.get("traced", False) for w in report["windows"]] == [False] * 4 + [True]


def test_host_and_gpu_facts_on_this_machine():
    import os

    host = host_cpu()
    assert host["cpu_count"] == os.cpu_count() and 1 <= host["cpu_affinity"] <= os.cpu_count()
    assert host["host_cpu"] and host["host_cpu"] != "not available"
    assert gpu_clocks(torch.device("cpu")) == "not available"
    line = "1980 MHz, 1980 MHz, 2619 MHz, 2619 MHz, 700.00 W\n"
    assert parse_nvidia_smi(line) == {
        "sm_mhz": 1980.0, "sm_max_mhz": 1980.0, "memory_mhz": 2619.0, "memory_max_mhz": 2619.0, "power_limit_w": 700.0
    }  # fmt: skip
    assert parse_nvidia_smi("345 MHz, 1980 MHz, [N/A], 2619 MHz, 700.00 W")["memory_mhz"] is None
    assert parse_nvidia_smi("") == "not available"


def test_cpu_results_default_away_from_the_committed_gpu_tables():
    bench = compose("benchmark").benchmark
    assert output_dir(bench, torch.device("cpu")) == Path("outputs/benchmark")
    assert output_dir(bench, torch.device("cuda", 0)) == Path("benchmarks/results")
    bench.output_dir = "/tmp/elsewhere"
    assert output_dir(bench, torch.device("cpu")) == Path("/tmp/elsewhere")


PADDED = ("hf_padlongest", "hf_pad1024")  # the order of benchmark.variants: windows run A B A B A B per budget
BUDGETS = (512, 1024)  # 2 and 4 sequences of up to 256 tokens per step


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """One CPU run of the 8M model: two variants that run, one skipped (TE), two budgets, 3 repeats of 2 steps."""
    tmp_path = tmp_path_factory.mktemp("benchmark")
    result = _run_benchmark(
        tmp_path,
        f"benchmark.variants=[{','.join(PADDED)},te_thd_bf16_weights]",
        f"benchmark.token_budgets=[{','.join(map(str, BUDGETS))}]",
        "benchmark.repeats=3",
        "benchmark.warmup_steps=2",
        "benchmark.timed_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (markdown,) = (tmp_path / "results").glob("benchmark_cpu_*_ddp_fp32-master.md")  # strategy and weights named
    return markdown, json.loads(markdown.with_suffix(".json").read_text()), result.stdout


def _windows(report, budget, variant):
    return [w for w in report["windows"] if (w["token_budget"], w["variant"]) == (budget, variant)]


@pytest.mark.e2e
def test_windows_run_interleaved_and_each_session_continues_its_data(interleaved):
    _, report, _ = interleaved
    order = [(w["token_budget"], w["repeat"], w["variant"]) for w in report["windows"]]
    assert order == [(budget, repeat, variant) for budget in BUDGETS for repeat in range(3) for variant in PADDED]
    for budget in BUDGETS:
        for variant in PADDED:
            windows = _windows(report, budget, variant)
            assert [(w["start_step"], w["steps"]) for w in windows] == [(2, 2), (4, 2), (6, 2)]
            # the stream goes on: a restarted epoch would give every window the warm-up's batches again
            assert len({tuple(w["lengths"]) for w in windows}) == 3
        # and every variant trains on the same proteins in the same order
        assert [w["lengths"] for w in _windows(report, budget, PADDED[0])] == [
            w["lengths"] for w in _windows(report, budget, PADDED[1])
        ]


@pytest.mark.e2e
def test_rows_give_median_and_range_of_three_repeats(interleaved):
    _, report, _ = interleaved
    rows = {(r["token_budget"], r["variant"]): r for r in report["rows"]}
    for budget in BUDGETS:
        for variant in PADDED:
            row, windows = rows[budget, variant], _windows(report, budget, variant)
            assert row["status"] == "ok" and row["repeats"] == 3, row
            assert row["tokens_per_s_repeats"] == [w["tokens"] / w["seconds"] for w in windows]
            assert row["step_time_s_repeats"] == [w["seconds"] / 2 for w in windows]
            for key in ("tokens_per_s", "padded_tokens_per_s", "tflops", "mfu", "step_time_s"):
                values = row[f"{key}_repeats"]
                assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), (key, values)
                assert row[key] == pytest.approx(np.median(values), rel=1e-12)
                assert row[f"{key}_min"] == min(values) <= row[key] <= row[f"{key}_max"] == max(values)
            assert row["spread"] == pytest.approx(row["tokens_per_s_max"] / row["tokens_per_s_min"] - 1)
            assert row["busy_fraction"] is None and row["traced_tokens_per_s"] is None  # CPU: not measured
            assert row["peak_memory_gib"] == max(row["peak_memory_gib_repeats"]) > 0
            assert row["weights"] == "FP32 master" and row["fp8_recipe"] is None
        baseline = rows[budget, "hf_pad1024"]
        assert baseline["speedup"] == 1.0
        longest = rows[budget, "hf_padlongest"]
        assert longest["speedup"] == pytest.approx(longest["tokens_per_s"] / baseline["tokens_per_s"])
        assert baseline["padding_fraction"] >= longest["padding_fraction"]


@pytest.mark.e2e
def test_window_flops_are_those_of_the_recorded_lengths(interleaved):
    _, report, _ = interleaved
    config = load_model_config("esm2_t6_8M_UR50D")
    for window in report["windows"]:
        lengths = np.array(window["lengths"])
        assert window["flops"] == model_flops(lengths, config) > 0
        assert (window["tokens"], window["sequences"]) == (lengths.sum(), len(lengths))
        assert window["sequences"] == 2 * (window["token_budget"] // 256)  # 2 full padded batches of the budget
        assert lengths.min() >= 1 and lengths.max() <= 256
        assert window["tflops"] == pytest.approx(window["flops"] / window["seconds"] / 1e12, rel=1e-12)
    for row in report["rows"]:
        if row["status"] == "ok":
            windows = _windows(report, row["token_budget"], row["variant"])
            assert row["window_flops_repeats"] == [w["flops"] for w in windows]
            assert row["window_tokens_repeats"] == [w["tokens"] for w in windows]
    pad_to_max = _windows(report, 1024, "hf_pad1024")[0]
    assert pad_to_max["padded_tokens"] == 2 * 4 * 256  # every sequence padded to max_seq_length


@pytest.mark.e2e
def test_budget_sweep_gives_a_row_per_budget_and_variant(interleaved):
    markdown, report, stdout = interleaved
    meta = report["meta"]
    assert meta["token_budgets"] == list(BUDGETS) and (meta["repeats"], meta["timed_steps"]) == (3, 2)
    assert meta["warmup_steps"] == 2 and meta["busy_fraction"] is False
    rows = [(r["token_budget"], r["variant"], r["status"]) for r in report["rows"]]
    variants = [*PADDED, "te_thd_bf16_weights"]
    assert rows == [(b, v, "skipped" if v.startswith("te_") else "ok") for b in BUDGETS for v in variants]
    skipped = report["rows"][2]
    assert "no CUDA device is visible" in skipped["reason"]
    assert skipped["weights"] == "BF16" and meta["weights"] == "FP32 master weights"  # per row; meta: the base
    table = markdown.read_text()
    assert "| ESM-2 8M | 1,024 | te_thd_bf16_weights | – | BF16 | skipped |" in table
    assert "median (min–max) | Spread |" in table and "| Busy |" in table and "12·L·H·s²" in table
    assert re.search(r"\| ESM-2 8M \| 512 \| hf_padlongest \| – \| FP32 master \| [\d,]+ \([\d,]+–[\d,]+\) \|", table)
    assert "| ESM-2 8M | 1,024 | hf_pad1024 |" in stdout  # the table is printed last, for remote runs


@pytest.mark.e2e
def test_each_finished_group_leaves_no_model_alive(interleaved):
    _, report, stdout = interleaved
    assert [left["group"] for left in report["left_after_groups"]] == [f"esm2_t6_8M_UR50D {b}" for b in BUDGETS]
    assert all(left["models_alive"] == {} and left["allocated_gib"] == 0 for left in report["left_after_groups"])
    assert "left after esm2_t6_8M_UR50D 512: 0.00 GiB allocated, models alive none" in stdout


@pytest.mark.e2e
def test_report_names_the_host_and_writes_the_chart(interleaved):
    markdown, report, _ = interleaved
    meta = report["meta"]
    assert meta["ceilings_tflops"]["fp32"] > 0 and meta["gpu_clocks"] == "not available"
    assert meta["cpu_count"] >= meta["cpu_affinity"] >= 1 and meta["host_cpu"] in markdown.read_text()
    for suffix in (".png", ".svg"):
        assert markdown.with_suffix(suffix).stat().st_size > 0


def _run_benchmark(tmp_path, *overrides):
    return launch(
        ["benchmark.py", "--config-name", "benchmark", "benchmark.models=[esm2_t6_8M_UR50D]",
         "dataset.max_seq_length=256", "benchmark.token_budgets=[512]", "dataset.num_workers=0",
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
        "benchmark.repeats=1",
        "benchmark.warmup_steps=1",
        "benchmark.timed_steps=2",
        "benchmark.profile=true",
        "benchmark.profile_steps=1",
        "dataset.num_workers=1",  # a worker process, which the session's stream keeps across windows
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("benchmark_cpu_*_fsdp2_bf16-weights.json")
    report = json.loads(path.read_text())
    assert report["meta"]["strategy"] == "fsdp2" and "BF16 weights" in report["meta"]["weights"]
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["weights"] == "BF16", row
    assert row["repeats"] == 1 and row["spread"] == 0.0
    assert "train_fsdp2.py's model on one device," in path.with_suffix(".md").read_text()
    profile = tmp_path / "results" / "profile"  # after the timed windows: top operators and a Chrome trace
    kernels = (profile / "esm2_t6_8M_UR50D_512_hf_padlongest_kernels.txt").read_text()
    by_shape = kernels.split("by input shapes:")[1]  # the ops once more, told apart by their input shapes
    assert "Input Shapes" in by_shape and "aten::mm" in by_shape and "[512, 320]" in by_shape, by_shape[:2000]
    assert (profile / "esm2_t6_8M_UR50D_512_hf_padlongest_trace.json.gz").stat().st_size > 0
