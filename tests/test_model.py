"""Model choice and building: shipped configs, the TE-or-reference decision, the tuple output Megatron-FSDP needs."""

import pytest
import torch
from conftest import RECIPE_DIR, compose, tiny_esm_config

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


def tiny_esm(seed):
    from transformers import EsmForMaskedLM

    torch.manual_seed(seed)
    return EsmForMaskedLM(tiny_esm_config())


def tiny_amplify(seed):
    from modeling_amplify import AMPLIFY, AMPLIFYConfig

    torch.manual_seed(seed)
    return AMPLIFY(AMPLIFYConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48))


def save_checkpoint(model, directory):
    """A checkpoint folder as published: config.json and the weights (transformers' or AMPLIFY's public layout)."""
    if type(model).__name__ == "AMPLIFY":
        from convert_amplify import export_amplify_model

        tokenizer = RECIPE_DIR / "tokenizers" / "amplify"
        return export_amplify_model(model.state_dict(), model.config, directory, tokenizer, source_format="amplify")
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", ["esm2", "amplify"])
def test_pretrained_true_starts_from_the_checkpoints_weights_and_false_from_a_random_init(tmp_path, family):
    published = (tiny_esm if family == "esm2" else tiny_amplify)(seed=1)
    directory = save_checkpoint(published, tmp_path / "published")
    expected = published.state_dict()
    built = {}
    for pretrained in (True, False):
        cfg = compose("L0_sanity", [f"model_tag={directory}", f"pretrained={str(pretrained).lower()}"])
        torch.manual_seed(2)  # another seed than the checkpoint's: a random init cannot match it
        model = build_model(cfg, load_model_config(cfg.model_tag), use_te=False, attn_input_format="bshd", device="cpu")
        built[pretrained] = model.state_dict()
    assert built[True].keys() == expected.keys() == built[False].keys()
    for name, tensor in expected.items():
        assert torch.equal(built[True][name], tensor), name
    weights = [name for name in expected if name.endswith("weight") and "norm" not in name.lower()]
    assert len(weights) > 8 and not any(torch.equal(built[False][name], expected[name]) for name in weights)
