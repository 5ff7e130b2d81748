"""Precision: the presets, NVIDIA-style overrides, the per-layer plan, hardware refusals naming the capability."""

import copy
import enum
import functools
import sys
import types

import pytest
import torch
from conftest import compose
from hypothesis import given, settings
from hypothesis import strategies as st

from precision import (
    FP4_RECIPES,
    FP8_RECIPES,
    PrecisionConfigError,
    PrecisionPlan,
    build_fp4_recipe,
    build_fp8_recipe,
    check_gpu_supports,
    fp8_enabled,
    layer_ranges,
    plan_problems,
    token_multiple,
)


def test_mxfp8_on_hopper_is_refused_with_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with pytest.raises(
        PrecisionConfigError, match=r"Blackwell.*10\.0 or newer.*H100 80GB HBM3 has compute capability 9\.0"
    ):
        check_gpu_supports(compose("L0_sanity", ["precision=mxfp8"]), torch.device("cuda", 0))
    check_gpu_supports(compose("L0_sanity", ["precision=fp8_block"]), torch.device("cuda", 0))  # Hopper runs it


@pytest.mark.parametrize(
    ("preset", "recipe"),
    [("fp8_delayed", "DelayedScaling"), ("fp8_current", "Float8CurrentScaling"), ("fp8_block", "Float8BlockScaling"),
     ("mxfp8", "MXFP8BlockScaling")],
)  # fmt: skip
def test_precision_is_one_axis_and_nvidia_style_overrides_give_the_same_config(preset, recipe):
    by_preset = compose("L0_sanity", [f"precision={preset}", "use_sequence_packing=true"])
    by_keys = compose(
        "L0_sanity", ["fp8_config.enabled=true", f"fp8_config.recipe={recipe}", "use_sequence_packing=true"]
    )
    assert by_preset == by_keys
    assert fp8_enabled(by_preset) and by_preset.use_sequence_packing
    plain = compose("L0_sanity")
    assert not fp8_enabled(plain) and not plain.use_sequence_packing  # bf16, padded: the default


def plan_of(overrides, num_layers=6):
    return plan_problems(compose("L0_sanity", overrides), num_layers)


def test_the_plan_is_described_in_one_line_per_precision():
    plan, problems = plan_of(["precision=fp8_current", "fp8_layers=5-29"], num_layers=33)
    assert not problems
    assert plan.describe() == "layers 1–4, 30–33: BF16; layers 5–29: FP8 current scaling"
    plan, _ = plan_of(["precision=fp8_delayed", "fp4_config.enabled=true", "fp8_layers=[1,'2-3']"], num_layers=4)
    assert plan.layers == ("fp8", "fp8", "fp8", "fp4")
    assert plan.describe() == "layers 1–3: FP8 delayed scaling; layer 4: NVFP4"
    plan, _ = plan_of(["precision=nvfp4"], num_layers=3)
    assert plan.describe() == "layers 1–3: NVFP4" and plan.fp8_recipe is None
    plan, _ = plan_of([], num_layers=2)
    assert plan.describe() == "layers 1–2: BF16"


layer_sets = st.sets(st.integers(1, 40), max_size=40)
L0_SANITY = compose("L0_sanity")


@settings(max_examples=200, deadline=None)
@given(
    num_layers=st.integers(1, 40),
    fp8_on=st.booleans(),
    fp4_on=st.booleans(),
    fp8_layers=st.none() | layer_sets,
    fp4_layers=st.none() | layer_sets,
    as_ranges=st.booleans(),
)
def test_every_layer_gets_exactly_the_precision_the_rules_give(
    num_layers, fp8_on, fp4_on, fp8_layers, fp4_layers, as_ranges
):
    def written(layers):  # a list of numbers, or the "a-b, c" text a user may write instead
        return sorted(layers) if not as_ranges or not layers else layer_ranges(sorted(layers)).replace("–", "-")

    cfg = copy.deepcopy(L0_SANITY)  # composing anew for each of 200 examples would take most of this test's time
    cfg.fp8_config.enabled, cfg.fp4_config.enabled = fp8_on, fp4_on
    cfg.fp8_layers = None if fp8_layers is None else written(fp8_layers)
    cfg.fp4_layers = None if fp4_layers is None else written(fp4_layers)
    plan, problems = plan_problems(cfg, num_layers)
    every = set(range(1, num_layers + 1))
    lists = {"fp8": fp8_layers, "fp4": fp4_layers}
    refused = (
        any(layers is not None and not layers <= every for layers in lists.values())
        or (fp8_layers is not None and not fp8_on)
        or (fp4_layers is not None and not fp4_on)
        or (fp8_on and fp4_on and fp8_layers is None and fp4_layers is None)
        or (fp8_layers is not None and fp4_layers is not None and bool(fp8_layers & fp4_layers))
    )
    assert (plan is None) == refused and bool(problems) == refused
    if refused:
        return
    assert len(plan.layers) == num_layers and set(plan.layers) <= {"bf16", "fp8", "fp4"}
    fp8 = fp8_layers if fp8_layers is not None else (every - (fp4_layers or set())) if fp8_on else set()
    fp4 = fp4_layers if fp4_layers is not None else (every - fp8) if fp4_on else set()
    assert set(plan.numbers("fp8")) == fp8 and set(plan.numbers("fp4")) == fp4
    assert set(plan.numbers("bf16")) == every - fp8 - fp4
    assert PrecisionPlan.from_dict(plan.as_dict()) == plan


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["precision=fp8_current", "fp8_layers=[1,9]"], "fp8_layers=[1, 9]: layers [9] do not exist"),
        (["precision=fp8_current", "fp8_layers='4-2'"], "the range 4-2 runs backwards"),
        (["precision=fp8_current", "fp8_layers='1-2,x'"], "'x' is not a layer number or a range like 5-29"),
        (["fp8_layers=[1,2]"], "fp8_layers is set but that format is off: turn it on with an FP8 precision"),
        (["precision=fp8_current", "fp4_layers=[3]"], "fp4_layers is set but that format is off"),
        (["precision=fp8_current", "fp4_config.enabled=true"], "FP8 and NVFP4 are both on: say which layers"),
        (
            ["precision=fp8_current", "fp4_config.enabled=true", "fp8_layers='1-3'", "fp4_layers='3-6'"],
            "fp8_layers and fp4_layers both list layers 3: give each layer one format",
        ),
    ],
)
def test_a_plan_that_cannot_be_is_refused_naming_the_layers(overrides, message):
    plan, problems = plan_of(overrides)
    assert plan is None and any(message in problem for problem in problems), problems


def test_nvfp4_on_hopper_is_refused_with_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cfg = compose("L0_sanity", ["precision=fp8_current", "fp4_config.enabled=true", "fp4_layers=[2]"])
    with pytest.raises(PrecisionConfigError) as error:
        check_gpu_supports(cfg, torch.device("cuda", 0))
    assert str(error.value) == (
        "fp4_config.recipe=NVFP4BlockScaling needs a Blackwell (sm_100+) GPU (compute capability 10.0 or newer), "
        "but NVIDIA H200 has compute capability 9.0. Use FP8 or BF16 on this GPU."
    )
    assert token_multiple(cfg) == 32  # NVFP4 blocks of 16 values; its GEMMs want 32-token multiples


class RecordedRecipe:
    """A TE recipe class stand-in that keeps the arguments it was built with."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def te_recipe(monkeypatch):
    """`transformer_engine.common.recipe` as a stub module (TE needs CUDA): the recipes precision.py builds are seen."""
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = enum.Enum("Format", ["E4M3", "HYBRID", "E2M1"])
    for name in [*FP8_RECIPES, *FP4_RECIPES]:
        setattr(recipe, name, type(name, (RecordedRecipe,), {}))
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe
    package = types.ModuleType("transformer_engine")
    package.common = common
    for name, module in (("", package), (".common", common), (".common.recipe", recipe)):
        monkeypatch.setitem(sys.modules, f"transformer_engine{name}", module)
    return recipe


@functools.cache
def preset(name):
    return compose("L0_sanity", [f"precision={name}"])


@pytest.mark.parametrize(
    ("name", "fp8_format", "expected"),
    [("fp8_delayed", None, "HYBRID"), ("fp8_delayed", "E4M3", "E4M3"), ("fp8_block", "HYBRID", "HYBRID"),
     ("fp8_current", None, "HYBRID"), ("fp8_block", None, "E4M3"), ("mxfp8", None, "E4M3")],
)  # fmt: skip
def test_fp8_format_reaches_the_te_recipe_of_each_preset(te_recipe, name, fp8_format, expected):
    cfg = copy.deepcopy(preset(name))
    cfg.fp8_config.format = fp8_format
    recipe = build_fp8_recipe(cfg)
    assert type(recipe) is getattr(te_recipe, FP8_RECIPES[cfg.fp8_config.recipe].te_class)
    assert recipe.kwargs == {"fp8_format": te_recipe.Format[expected]}


def test_fp8_recipe_kwargs_reach_the_te_recipe(te_recipe):
    kwargs = "+fp8_config.recipe_kwargs={amax_history_len:1024,amax_compute_algo:max}"  # `+`: new keys on the CLI
    recipe = build_fp8_recipe(compose("L0_sanity", ["precision=fp8_delayed", kwargs]))
    assert type(recipe) is te_recipe.DelayedScaling
    assert recipe.kwargs == {
        "fp8_format": te_recipe.Format.HYBRID,
        "amax_history_len": 1024,
        "amax_compute_algo": "max",
    }


def test_each_fp4_option_turns_off_its_own_te_feature(te_recipe):
    defaults = {"disable_stochastic_rounding": False, "disable_rht": False, "disable_2d_quantization": False}
    recipe = build_fp4_recipe(preset("nvfp4"))
    assert type(recipe) is te_recipe.NVFP4BlockScaling and recipe.kwargs == defaults
    for key, te_argument in (
        ("stochastic_rounding", "disable_stochastic_rounding"),
        ("random_hadamard", "disable_rht"),
        ("two_d_weight_quantization", "disable_2d_quantization"),
    ):
        cfg = copy.deepcopy(preset("nvfp4"))
        cfg.fp4_config[key] = False
        assert build_fp4_recipe(cfg).kwargs == defaults | {te_argument: True}, key


def test_fp4_recipe_kwargs_reach_the_te_recipe_and_off_builds_nothing(te_recipe):
    cfg = compose("L0_sanity", ["precision=nvfp4", "+fp4_config.recipe_kwargs={fp8_dpa:true,fp8_mha:false}"])
    recipe = build_fp4_recipe(cfg)
    assert recipe.kwargs == {
        "disable_stochastic_rounding": False,
        "disable_rht": False,
        "disable_2d_quantization": False,
        "fp8_dpa": True,
        "fp8_mha": False,
    }
    assert build_fp8_recipe(cfg) is None  # precision=nvfp4: FP8 off
    assert build_fp8_recipe(L0_SANITY) is None and build_fp4_recipe(L0_SANITY) is None  # bf16: neither
