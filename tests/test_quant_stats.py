"""quant_stats (nvdlfw-inspect statistics) and health_report.py, on CPU: the config gate, the YAML written for
nvdlfw-inspect, layer names, metrics from a recorded statistics file, the underflow warning and the report PNG.

tests/data/nvdlfw_inspect_statistics_sample.log was written by nvdlfw-inspect 0.2.2's own default statistics logger
(`FileLogger._initialize_stats_logger` + `log_scalar`, nvdlfw_inspect/logging.py) with names as TE's stats buffers
form them (`f"{layer}_{tensor}_{stat}"`, transformer_engine/debug/features/utils/stats_buffer.py) for the layer names
`quant_stats.name_layers` sets: layers 1-3 (qkv, mlp.fc2; activation, weight, gradient; LogFp8TensorStats' four stats)
and an NVFP4 layer 4 (LogNvfp4TensorStats' `nvfp4_`-prefixed stats), steps 10, 20, 30. Its values are synthetic.
"""

import importlib.util
import json
import logging
import math
import re
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose
from torch import nn

import health_report
import quant_stats
import train_fsdp2
from config_validation import ConfigError, validate_config
from distributed import DistributedContext
from model import load_model_config
from perf_logger import PerfLogger
from precision import resolve_plan

SAMPLE = Path(__file__).parent / "data" / "nvdlfw_inspect_statistics_sample.log"
CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
FP8_STATS = ["underflows%", "scale_inv_min", "scale_inv_max", "mse"]  # LogFp8TensorStats' names (TE 2.20)


@pytest.fixture
def inspect_installed(monkeypatch):
    """Validation as on a host with nvdlfw-inspect installed, whether or not this one has it."""
    monkeypatch.setattr(quant_stats, "inspect_installed", lambda: True)


def validate(overrides, use_te=True):
    cfg = compose("L0_sanity", overrides)
    validate_config(cfg, load_model_config(cfg.model_tag), use_te, train_fsdp2.STRATEGY)


ON = ["precision=fp8_current", "quant_stats.enabled=true"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant_stats.enabled=true"], "but this run is BF16 (fp8_config and fp4_config are off): pick a quantised"),
        ([*ON, "quant_stats.layers=[2,7]"], "quant_stats.layers=[2, 7]: layers [7] do not exist (the model has layers"),
        ([*ON, "quant_stats.layers=x"], "quant_stats.layers='x': 'x' is not a layer number or a range like 5-29"),
        ([*ON, "quant_stats.gemms=[qkv,ffn1]"], "quant_stats.gemms: 'ffn1' is not one of qkv, proj, fc1, fc2. Did you"),
        ([*ON, "quant_stats.gemms=[]"], "quant_stats.gemms=[]: must list at least one of qkv, proj, fc1, fc2"),
        ([*ON, "quant_stats.tensors=[activations]"], "'activations' is not one of activation, weight, gradient"),
        ([*ON, "quant_stats.stats=[mse,mse]"], "quant_stats.stats=['mse', 'mse']: lists an entry more than once"),
        ([*ON, "quant_stats.every_n_steps=0"], "quant_stats.every_n_steps=0: must be a positive integer"),
        ([*ON, "quant_stats.every_n_steps=2.5"], "quant_stats.every_n_steps=2.5: must be a positive integer"),
        ([*ON, "quant_stats.underflow_warn_pct=150"], "underflow_warn_pct=150: must be a percentage from 0 to 100"),
        ([*ON, "quant_stats.stats=[overflows_pct]"], "overflows_pct is only measured under FP8 delayed scaling"),
        (
            [*ON, "fp8_layers=3-6", "quant_stats.layers=1-4"],
            "quant_stats.layers='1-4': layers 1–2 run in BF16 under the precision plan (layers 1–2: BF16; layers "
            "3–6: FP8 current scaling), so nothing is quantised there to measure; choose among layers 3–6",
        ),
        ([*ON, "use_torch_compile=true"], "quant_stats.enabled=true and use_torch_compile=true exclude each other"),
        (
            [*ON, "+quant_stats.every_n_step=5"],
            "quant_stats.every_n_step: unknown key. Did you mean quant_stats.every_n_steps?",
        ),
        (["quant_stats.gemms=[fc3]"], "quant_stats.gemms: 'fc3' is not one of"),  # checked even while disabled
    ],
)
def test_bad_quant_stats_settings_are_refused_with_their_fix(inspect_installed, overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(overrides)
    assert message in str(error.value)


def test_the_reference_model_and_cuda_graphs_are_refused(inspect_installed):
    with pytest.raises(ConfigError) as error:
        validate(ON, use_te=False)
    assert "quant_stats.enabled=true needs the TransformerEngine model" in str(error.value)
    with pytest.raises(ConfigError) as error:
        validate([*ON, "use_sequence_packing=true", "cuda_graphs=true"])
    assert "quant_stats.enabled=true and cuda_graphs=true exclude each other" in str(error.value)


def test_a_missing_nvdlfw_inspect_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvdlfw_inspect" else real(name))
    with pytest.raises(ConfigError) as error:
        validate(ON)
    assert "needs nvdlfw-inspect" in str(error.value) and "pip install nvdlfw-inspect" in str(error.value)
    validate(["precision=fp8_current"])  # off: the recipe runs without it


def test_good_settings_pass(inspect_installed):
    validate(["quant_stats.enabled=false"])
    validate([*ON, "quant_stats.layers=[1,3-4]", "quant_stats.gemms='fc1,fc2'", "quant_stats.every_n_steps=10"])
    validate(["precision=fp8_delayed", "quant_stats.enabled=true", "quant_stats.stats=[overflows_pct,mse]"])


def candidate_names(num_layers):
    """Every TE debug layer name `name_layers` gives a model of this depth (LayerNormMLP adds .fc1/.fc2)."""
    return [f"layers.{n}.{module}" for n in range(1, num_layers + 1) for module in quant_stats.GEMMS.values()]


def selected(pattern, num_layers):
    return {name for name in candidate_names(num_layers) if re.compile(pattern).search(name)}


def test_the_yaml_selects_the_chosen_layers_and_gemms_with_te_names(tmp_path):
    cfg = compose("L0_sanity", [*ON, "fp8_layers=2-6", "quant_stats.layers=[2,4-5]", "quant_stats.gemms=[qkv,fc2]"])
    cfg.quant_stats.every_n_steps = 10
    config = quant_stats.inspect_config(cfg, resolve_plan(cfg, 6))
    path = quant_stats.write_inspect_config(config, tmp_path / "logs", rank=0)
    written = yaml.safe_load(path.read_text())
    assert list(written) == ["esm2_quant_stats_fp8"]
    section = written["esm2_quant_stats_fp8"]
    assert section["enabled"] is True
    pattern = section["layers"]["layer_name_regex_pattern"]
    assert selected(pattern, 6) == {f"layers.{n}.{m}" for n in (2, 4, 5) for m in ("qkv", "mlp.fc2")}
    feature = section["transformer_engine"]["LogFp8TensorStats"]
    assert feature["enabled"] is True
    assert [s["tensor"] for s in feature["tensors_struct"]] == ["activation", "weight", "gradient"]
    assert all(s["stats"] == FP8_STATS and s["freq"] == 10 for s in feature["tensors_struct"])
    assert not list((tmp_path / "logs").glob(".*"))  # the per-rank partial file was renamed into place


def test_layer_one_does_not_select_layers_ten_to_twelve():
    cfg = compose("L0_sanity", [*ON, "quant_stats.layers=[1]", "quant_stats.gemms=[fc1]"])
    config = quant_stats.inspect_config(cfg, resolve_plan(cfg, 12))
    assert selected(config["esm2_quant_stats_fp8"]["layers"]["layer_name_regex_pattern"], 12) == {"layers.1.mlp.fc1"}


def test_nvfp4_layers_get_their_own_feature_and_fp8_weights_only_scales():
    cfg = compose("L0_sanity", [*ON, "fp4_config.enabled=true", "fp4_layers=[5,6]", "quant_stats.layers=[1,6]"])
    cfg.fp8_config.quantized_model_init = True
    config = quant_stats.inspect_config(cfg, resolve_plan(cfg, 6))
    fp8, fp4 = config["esm2_quant_stats_fp8"], config["esm2_quant_stats_fp4"]
    assert selected(fp8["layers"]["layer_name_regex_pattern"], 6) == {n for n in candidate_names(6) if ".1." in n}
    assert selected(fp4["layers"]["layer_name_regex_pattern"], 6) == {n for n in candidate_names(6) if ".6." in n}
    fp8_stats = {s["tensor"]: s["stats"] for s in fp8["transformer_engine"]["LogFp8TensorStats"]["tensors_struct"]}
    assert fp8_stats == {"activation": FP8_STATS, "weight": ["scale_inv_min", "scale_inv_max"], "gradient": FP8_STATS}
    fp4_structs = fp4["transformer_engine"]["LogNvfp4TensorStats"]["tensors_struct"]
    assert all(s["stats"] == ["underflows%", "mse"] for s in fp4_structs)  # all LogNvfp4TensorStats computes


def test_nvdlfw_inspect_reads_the_yaml_and_selects_exactly_those_layers(tmp_path, monkeypatch):
    """The written file through nvdlfw-inspect's own config parser and layer matching (no TE needed for that)."""
    pytest.importorskip("nvdlfw_inspect", reason="nvdlfw-inspect (requirements.txt) is not installed")
    from nvdlfw_inspect import logging as inspect_logging
    from nvdlfw_inspect.config_manager import ConfigManager

    monkeypatch.setattr(inspect_logging, "LOGGER", None)
    inspect_logging.initialize_logger(str(tmp_path))
    cfg = compose("L0_sanity", [*ON, "quant_stats.layers=3-4", "quant_stats.gemms=[proj,fc1]"])
    path = quant_stats.write_inspect_config(quant_stats.inspect_config(cfg, resolve_plan(cfg, 6)), tmp_path, 0)
    registry = {"transformer_engine": types.SimpleNamespace(features={"LogFp8TensorStats": object()})}
    try:
        ConfigManager._load_config(str(path), registry_data=registry)
        chosen = {name for name in candidate_names(6) if ConfigManager.get_config_for_layer(name)}
        config = ConfigManager.get_config_for_layer("layers.3.mlp.fc1")
    finally:
        ConfigManager.reset()
    assert chosen == {f"layers.{n}.{m}" for n in (3, 4) for m in ("proj", "mlp.fc1")}
    assert "LogFp8TensorStats" in config["transformer_engine"]


class FakeTELayer(nn.Module):
    """The attributes of te.TransformerLayer that name_layers reads (MultiheadAttention with input LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.layernorm_qkv, self.self_attention.proj = nn.Linear(2, 6), nn.Linear(2, 2)
        self.layernorm_mlp = nn.Linear(2, 2)


def test_layer_names_are_the_ones_the_config_selects():
    model = nn.Module()
    model.esm = nn.Module()
    model.esm.encoder = nn.Module()
    model.esm.encoder.layers = nn.ModuleList(FakeTELayer() for _ in range(4))
    assert quant_stats.name_layers(model) == 4
    third = model.esm.encoder.layers[2].self_attention
    assert (third.layernorm_qkv.name, third.proj.name) == ("layers.3.qkv", "layers.3.proj")
    debug_names = set()
    for layer in model.esm.encoder.layers:
        debug_names |= {layer.self_attention.layernorm_qkv.name, layer.self_attention.proj.name}
        debug_names |= {f"{layer.layernorm_mlp.name}.{part}" for part in ("fc1", "fc2")}
    assert debug_names == set(candidate_names(4))  # TE's LayerNormMLP appends .fc1/.fc2 to its name


def raw_lines():
    """(iteration, name, value) straight from the sample's text, split by hand (independent of the module's regex)."""
    found = []
    for line in SAMPLE.read_text().splitlines():
        message = line.split(" - ", 2)[2]
        name, iteration, value = (part.strip() for part in message.split("\t") if part.strip())
        found.append((int(iteration.removeprefix("iteration=")), name, float(value.removeprefix("value="))))
    return found


def sample_records():
    collector = quant_stats.StatsCollector()
    for iteration, name, value in quant_stats.read_inspect_log(SAMPLE):
        collector.log_scalar(name, torch.tensor(value), iteration)  # device tensors, as TE's buffers log them
    return collector.drain()


def test_statistics_become_flat_metric_keys_per_step():
    raw = raw_lines()
    assert quant_stats.read_inspect_log(SAMPLE) == raw
    records = sample_records()
    assert [step for step, _ in records] == sorted({iteration for iteration, _, _ in raw})
    by_step = dict(records)
    assert sum(len(metrics) for metrics in by_step.values()) == len(raw)
    for iteration, name, value in raw:
        layer, rest = re.fullmatch(r"layers\.(\d+)\.(.+)", name).groups()
        module, tensor, stat = re.fullmatch(r"(qkv|proj|mlp\.fc\d)_(activation|weight|gradient)_(.+)", rest).groups()
        stat = stat.removeprefix("nvfp4_").replace("%", "_pct")
        key = f"quant/layer_{int(layer):02d}/{module.removeprefix('mlp.')}/{tensor}/{stat}"
        assert by_step[iteration][key] == pytest.approx(value, rel=1e-6)
    assert "quant/layer_04/qkv/activation/underflows_pct" in by_step[30]  # the NVFP4 layer's prefix is dropped
    parsed = quant_stats.parse_metric_key("quant/layer_03/fc2/gradient/scale_inv_min")
    assert parsed == (3, "fc2", "gradient", "scale_inv_min")


def test_other_names_are_kept_and_other_ranks_keep_nothing():
    assert quant_stats.metric_key("Layer_7_activation_underflows%") == "quant/other/Layer_7_activation_underflows_pct"
    assert quant_stats.parse_metric_key("quant/other/Layer_7_activation_underflows_pct") is None
    quiet = quant_stats.StatsCollector(keep=False)
    quiet.log_scalar("layers.1.qkv_activation_mse", torch.tensor(1.0), 10)
    assert quiet.drain() == []
    collector = quant_stats.StatsCollector()
    collector.log_scalar("layers.1.qkv_activation_mse", 0.5, 10)  # a plain number works too
    assert collector.drain() == [(10, {"quant/layer_01/qkv/activation/mse": 0.5})] and collector.drain() == []


def test_the_underflow_warning_names_every_tensor_past_the_threshold():
    records = sample_records()
    threshold = 5.0
    worst = {}
    for _, metrics in records:
        for key, value in metrics.items():
            if key.endswith("/underflows_pct") and value > threshold:
                worst[key.rsplit("/", 1)[0]] = max(worst.get(key.rsplit("/", 1)[0], 0), value)
    assert worst, "the sample should have underflows above the threshold"
    message = quant_stats.underflow_warning(records, threshold)
    assert f"in {len(worst)} tensor(s), steps 10–30" in message
    for where, value in worst.items():
        _, layer, gemm, tensor = where.split("/")
        assert f"layer {int(layer.removeprefix('layer_'))} {gemm} {tensor} {value:.3g}%" in message
    assert quant_stats.underflow_warning(records, 100.0) is None


def test_statistics_reach_the_metrics_file_at_log_steps_only(tmp_path, monkeypatch, caplog):
    calls = []
    api = types.SimpleNamespace(step=lambda: calls.append("step"), initialize_training_step=calls.append)
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect", types.ModuleType("nvdlfw_inspect"))
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect.api", api)
    metrics_file = tmp_path / "metrics.jsonl"
    cfg = compose("L0_sanity", [f"logger.metrics_file={metrics_file}", "logger.log_every_n_steps=20"])
    perf = PerfLogger(cfg, CPU)
    collector = quant_stats.StatsCollector()
    stats = quant_stats.QuantStats(collector, every=10, threshold=1.0, is_main=True)
    stats.begin(start_step=9)
    assert calls == [10]  # step 10's forward runs at iteration 10
    for iteration, name, value in quant_stats.read_inspect_log(SAMPLE):
        if iteration == 10:
            collector.log_scalar(name, torch.tensor(value), iteration)
    with caplog.at_level(logging.WARNING, logger="quant_stats"):
        stats.after_step(10, perf)
        assert not metrics_file.exists() and calls[1:] == ["step"]  # step 10 is no log step: nothing read yet
        stats.after_step(20, perf)
    written = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [record["step"] for record in written] == [10]
    assert dict(sample_records())[10] == pytest.approx({k: v for k, v in written[0].items() if k != "step"})
    assert any("Quantisation underflow above" in r.getMessage() for r in caplog.records)
    perf.close()


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def write_run(path, records, losses):
    with open(path, "w") as handle:
        for step, loss in losses:
            handle.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
        for step, metrics in records:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")


def test_the_report_draws_a_heat_map_of_layers_by_steps_and_the_losses(tmp_path):
    from matplotlib.image import imread

    records = sample_records()
    run, baseline = tmp_path / "fp8.jsonl", tmp_path / "bf16.jsonl"
    write_run(run, records, [(s, 3.0 - math.log(s) / 3) for s in range(1, 31)])
    write_run(baseline, [], [(s, 3.0 - math.log(s) / 3.2) for s in range(1, 31)])
    out = health_report.main([str(run), "--baseline", str(baseline), "--out", str(tmp_path / "report.png")])
    figure, _ = health_report.render(run, baseline, tmp_path / "again.png")
    width, height = figure.get_size_inches() * figure.dpi
    assert png_size(out) == (round(width), round(height))
    pixels = imread(out)
    assert pixels[..., :3].std() > 0.1  # drawn, not a blank page
    heat_maps = [ax for ax in figure.axes if ax.images]
    expected = {}
    for step, metrics in records:
        for key in metrics:
            layer, _, tensor, stat = quant_stats.parse_metric_key(key)
            if stat == "underflows_pct":
                layers, steps = expected.setdefault(tensor, (set(), set()))
                layers.add(layer), steps.add(step)
    assert [ax.images[0].get_array().shape for ax in heat_maps] == [
        (len(layers), len(steps)) for layers, steps in (expected[t] for t in ("activation", "weight", "gradient"))
    ]
    loss_lines = [line for ax in figure.axes for line in ax.get_lines()]
    assert len(loss_lines) == 2  # this run and the baseline


def test_the_report_reads_one_gemm_and_refuses_a_file_without_statistics(tmp_path):
    records = sample_records()
    run = tmp_path / "run.jsonl"
    write_run(run, records, [(1, 3.0), (30, 2.0)])
    grids = health_report.underflow_grids([{"step": step, **metrics} for step, metrics in records], gemm="fc2")
    assert [grid.tensor for grid in grids] == ["activation", "weight", "gradient"]
    assert all(grid.layers == [1, 2, 3] for grid in grids)  # layer 4 (NVFP4 sample) has qkv only
    by_step = dict(records)
    gradient = grids[2]
    for i, layer in enumerate(gradient.layers):
        for j, step in enumerate(gradient.steps):
            assert gradient.values[i, j] == by_step[step][f"quant/layer_{layer:02d}/fc2/gradient/underflows_pct"]
    plain = tmp_path / "plain.jsonl"
    write_run(plain, [], [(1, 3.0), (2, 2.9)])
    with pytest.raises(SystemExit, match="no quantisation statistics"):
        health_report.render(plain)


@pytest.mark.e2e
def test_the_training_loop_opens_names_steps_and_flushes_the_session_in_order(tmp_path, monkeypatch):
    """One in-process CPU run (DDP, reference model; ~30 s, hence e2e) with a stand-in session: where build_training
    and train_loop call quant_stats, and with what."""
    import dataclasses

    import train_ddp
    from distributed import destroy_distributed
    from loader import shutdown_workers
    from training import build_training, setup_run, train_loop

    calls = []

    class Session:
        def begin(self, start_step):
            calls.append(("begin", start_step))

        def after_step(self, step, perf):
            calls.append(("after_step", step, perf.is_log_step(step)))

        def flush(self, perf):
            calls.append(("flush",))

    session = Session()
    monkeypatch.setattr(quant_stats, "start", lambda cfg, context, layers: calls.append(("start", layers)) or session)
    monkeypatch.setattr(quant_stats, "active", lambda: session)
    monkeypatch.setattr(quant_stats, "name_layers", lambda model: calls.append(("name", type(model).__name__)))
    build = train_ddp.STRATEGY.build_model
    strategy = dataclasses.replace(train_ddp.STRATEGY, build_model=lambda run: calls.append(("build",)) or build(run))
    cfg = compose(
        "L0_sanity",
        [
            "num_train_steps=4",
            "logger.log_every_n_steps=2",
            "dataset.max_seq_length=64",
            "dataset.micro_batch_size=2",
            "dataset.num_workers=0",
            "validation.every_n_steps=0",
            "checkpoint.ckpt_dir=null",
            f"logger.metrics_file={tmp_path / 'metrics.jsonl'}",
        ],
    )
    run = setup_run(cfg, strategy)
    try:
        model, optimizer, scheduler = build_training(run, strategy)
        result = train_loop(run, model, optimizer, scheduler, strategy)
    finally:
        shutdown_workers()
        destroy_distributed()
    assert result.step == 4
    assert calls == [
        ("start", 6),
        ("build",),
        ("name", "EsmForMaskedLM"),  # the plain model, not its DDP wrapper
        ("begin", 0),
        *[("after_step", step, step % 2 == 0) for step in range(1, 5)],
        ("flush",),
    ]
