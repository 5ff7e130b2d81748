"""Precision: the presets, NVIDIA-style overrides, hardware refusals naming the compute capability."""

import pytest
import torch
from conftest import compose

from precision import PrecisionConfigError, check_gpu_supports, fp8_enabled


def test_mxfp8_on_hopper_is_refused_with_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with pytest.raises(
        PrecisionConfigError, match=r"Blackwell.*10\.0 or newer.*H100 80GB HBM3 has compute capability 9\.0"
    ):
        check_gpu_supports("MXFP8BlockScaling", torch.device("cuda", 0))
    check_gpu_supports("Float8BlockScaling", torch.device("cuda", 0))  # Hopper runs block scaling


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
