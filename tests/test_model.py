"""Model choice and building: shipped configs, the TE-or-reference decision, the tuple output Megatron-FSDP needs."""

import pytest
import torch
from conftest import compose

from model import ModelConfigError, build_model, load_model_config, resolve_use_te, return_tuple_outputs


def test_unknown_model_config_lists_the_shipped_ones():
    with pytest.raises(ModelConfigError, match=r"esm2_t99_1T.*esm2_t12_35M_UR50D.*esm2_t6_8M_UR50D"):
        load_model_config("esm2_t99_1T")


def test_use_te_true_without_gpu_is_refused_clearly():
    with pytest.raises(ModelConfigError, match="use_te=true but no CUDA device is visible"):
        resolve_use_te("true")
    assert resolve_use_te("false") == (False, "reference transformers EsmForMaskedLM (use_te=false)")


def test_megatron_fsdp_sees_the_model_output_as_a_tuple():
    """Megatron-FSDP hooks the start of backward only on tensor/tuple/list outputs, not on a transformers dict."""
    cfg = compose("L0_sanity")
    model = build_model(cfg, load_model_config(cfg.model_tag), use_te=False, attn_input_format="bshd", device="cpu")
    input_ids = torch.tensor([[0, 5, 32, 9, 2]])
    labels = torch.tensor([[-100, -100, 6, -100, -100]])
    expected = model(input_ids=input_ids, labels=labels)
    return_tuple_outputs(model)
    output = model(input_ids=input_ids, labels=labels)
    assert isinstance(output, tuple) and not isinstance(expected, tuple)
    assert torch.equal(output.logits, expected.logits) and torch.equal(output.loss, expected.loss)
    assert output.logits is output[1]
    output.loss.backward()
    assert model.lm_head.bias.grad.abs().sum() > 0
