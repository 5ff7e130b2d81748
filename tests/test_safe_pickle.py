"""No pickle in a checkpoint folder runs code: DCP's `.metadata` and TE's FP8 state are read with an allow-list."""

import dataclasses
import enum
import io
import json
import os
import pickle
import sys
import types

import pytest
import torch
from test_checkpoint import tiny_checkpointer

from checkpoint import _checked_te_states, _restore_te_extra_states, file_digest, verify_manifest
from safe_pickle import TE_UNSAFE_PICKLE_ENV, UnsafePickleError, load_dcp_metadata, te_extra_state


class RunsCode:
    """What a forged pickle holds: rebuilding it calls `marker.touch()`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def forge(folder, relative, data: bytes):
    """Replace a checkpoint file and fix its manifest, as a forger would."""
    (folder / relative).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][relative] = len(data)
    manifest["xxh3_64"][relative] = file_digest(folder / relative)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify_manifest(folder) is None


def test_a_forged_dcp_metadata_is_refused_without_running_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    checkpointer, _ = tiny_checkpointer(tmp_path)
    assert checkpointer.save(2) and checkpointer.save(4)
    marker = tmp_path / "code_ran"
    forge(tmp_path / "step_0000004", "model_optim/.metadata", pickle.dumps(RunsCode(marker)))

    resumed, _ = tiny_checkpointer(tmp_path)
    with caplog.at_level("WARNING"):
        assert resumed.resume() == 2
    assert not marker.exists()
    skipped = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping checkpoint"))
    assert "step_0000004" in skipped and "model_optim/.metadata names builtins.getattr" in skipped
    assert "Traceback" not in skipped and len(skipped) < 600  # the reason, not DCP's per-rank traceback dump


def test_genuine_dcp_metadata_of_model_and_optimizer_reads_back_equal(tmp_path):
    checkpointer, _ = tiny_checkpointer(tmp_path)
    assert checkpointer.save(2)
    path = tmp_path / "step_0000002" / "model_optim" / ".metadata"
    with open(path, "rb") as handle:
        expected = pickle.load(handle)  # the file this test itself just wrote
    assert load_dcp_metadata(path) == expected
    assert {"model.0.weight", "optimizer.state.0.weight.exp_avg"} <= set(expected.state_dict_metadata)


def fake_te_recipe_module(monkeypatch):
    """A stand-in for transformer_engine.common.recipe (TE is not installed on CPU): a data class and an enum."""
    module = types.ModuleType("transformer_engine.common.recipe")

    class Format(enum.Enum):
        E4M3 = "e4m3"
        HYBRID = "hybrid"

    @dataclasses.dataclass
    class DelayedScaling:
        margin: int = 0
        fp8_format: Format = Format.HYBRID
        amax_history_len: int = 1024

    for cls in (Format, DelayedScaling):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    for name in ("transformer_engine", "transformer_engine.common"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def as_tensor(obj) -> torch.Tensor:
    """How TE's get_extra_state returns its state: a pickle in a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def test_te_delayed_scaling_state_decodes_to_the_same_recipe_and_tensors(monkeypatch):
    recipe = fake_te_recipe_module(monkeypatch)
    state = {
        "recipe": recipe.DelayedScaling(margin=1, amax_history_len=16),
        "scale_fwd": torch.tensor([1.0, 2.0, 448.0]),
        "amax_history_bwd": torch.arange(32.0).reshape(16, 2),
        "extra_fp8_variables": {"num_gemms": 3, "fp8_checkpoint": True},
    }
    decoded = pickle.loads(te_extra_state(as_tensor(state), "rank_00000.pt").numpy().tobytes())
    assert decoded["recipe"] == state["recipe"] and decoded["recipe"].fp8_format is recipe.Format.HYBRID
    assert torch.equal(decoded["scale_fwd"], state["scale_fwd"])
    assert torch.equal(decoded["amax_history_bwd"], state["amax_history_bwd"])
    assert decoded["extra_fp8_variables"] == state["extra_fp8_variables"]
    empty = torch.empty(0, dtype=torch.uint8)  # stateless recipes (current, block scaling): nothing to decode
    assert te_extra_state(empty, "rank_00000.pt") is empty


def test_a_forged_te_state_is_refused_naming_the_file_and_the_module(tmp_path, monkeypatch):
    fake_te_recipe_module(monkeypatch)
    marker = tmp_path / "code_ran"
    forged = {"layers.0.self_attention": as_tensor({"recipe": RunsCode(marker)})}
    with pytest.raises(UnsafePickleError, match=r"rank_00001\.pt \(FP8 state of layers\.0\.self_attention\) names"):
        _checked_te_states(forged, tmp_path / "rank_00001.pt")
    assert not marker.exists()


def test_code_hidden_in_a_tensor_storage_of_the_te_state_is_refused(tmp_path, monkeypatch):
    """A pickled tensor's storage is itself a torch.save blob, which torch would load with weights_only=False."""
    fake_te_recipe_module(monkeypatch)
    marker = tmp_path / "code_ran"
    blob = io.BytesIO()
    torch.save(RunsCode(marker), blob)

    class Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (blob.getvalue(),))

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        te_extra_state(as_tensor({"scale_fwd": Storage()}), "rank_00000.pt")
    assert not marker.exists()


def test_te_fp8_state_is_restored_with_the_pickle_permission_scoped_to_the_call(monkeypatch):
    monkeypatch.delenv(TE_UNSAFE_PICKLE_ENV, raising=False)
    seen = {}

    class FakeTELayer(torch.nn.Module):
        def get_extra_state(self):
            return torch.tensor([1, 2, 3], dtype=torch.uint8)

        def set_extra_state(self, state):
            seen["state"], seen["permission"] = state, os.environ.get(TE_UNSAFE_PICKLE_ENV)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), FakeTELayer())
    _restore_te_extra_states(model, _checked_te_states({"1": as_tensor({"scale": 2.5})}, "rank_00000.pt"))
    assert seen["permission"] == "1" and pickle.loads(seen["state"].numpy().tobytes()) == {"scale": 2.5}
    assert TE_UNSAFE_PICKLE_ENV not in os.environ
