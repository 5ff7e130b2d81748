"""GPU acceptance tests of modeling_amplify_te against the plain-PyTorch AMPLIFY reference on real proteins.

Run on a CUDA machine with TransformerEngine:  python -m pytest tests/test_amplify_te_gpu.py -q -s
Measured errors are printed and, when GPU_METRICS_FILE is set, appended to that file as JSON lines.
"""

from pathlib import Path
from types import ModuleType

import pytest
import torch
from gpu_checks import corrupted_batch, exact_fp32_matmuls, pack, record, rel_l2  # noqa: F401 (autouse fixture)

import convert_amplify
from modeling_amplify import AMPLIFY, AMPLIFYConfig, amplify_state_dict_shapes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "model_configs"
TOKENIZER_DIR = REPO / "tokenizers" / "amplify"
SMALL, LARGE = "amplify_120M", "amplify_350M"
NUM_SEQUENCES, MAX_TOKENS, MLM_PROBABILITY = 8, 512, 0.15
FP8_RECIPES = ("DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling")


@pytest.fixture(scope="module")
def te_amplify() -> ModuleType:
    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")
    import modeling_amplify_te

    return modeling_amplify_te


@pytest.fixture(scope="module")
def bshd_batch() -> dict[str, torch.Tensor]:
    """8 real proteins (<= 512 tokens, padded) with seeded 80/10/10 corruption of 15% of the residues."""
    batch = corrupted_batch(TOKENIZER_DIR, (6, 27), NUM_SEQUENCES, MAX_TOKENS, MLM_PROBABILITY)
    return {key: value.cuda() for key, value in batch.items()}


def random_reference(name: str, seed: int = 0) -> AMPLIFY:
    """The reference with random weights at init scale; norms and the decoder bias perturbed so mapping bugs show."""
    torch.manual_seed(seed)
    model = AMPLIFY(AMPLIFYConfig.from_pretrained(MODEL_CONFIGS / name))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight") or param_name == "layer_norm_2.weight":
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param_name == "decoder.bias":
                param.normal_(0.0, 0.02)
    return model.cuda().eval()


def te_twin(te_amplify: ModuleType, reference: AMPLIFY, **te_options: object) -> torch.nn.Module:
    """The TE model with the reference's weights, converted with convert_amplify."""
    config = te_amplify.NVAmplifyConfig.from_amplify_config(reference.config, **te_options)
    model = te_amplify.NVAmplifyForMaskedLM(config, device="cuda")
    model.load_te_state_dict(convert_amplify.convert_amplify_to_te(reference.state_dict(), config))
    return model.eval()


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_fp32_logits_and_loss_match_the_reference(te_amplify, bshd_batch, name: str) -> None:
    reference = random_reference(name)
    model = te_twin(te_amplify, reference)
    with torch.no_grad():
        expected, actual = reference(**bshd_batch), model(**bshd_batch)
    real = bshd_batch["attention_mask"].bool()
    assert actual.logits.shape == expected.logits.shape == (*real.shape, 27)
    logits_error = rel_l2(actual.logits[real], expected.logits[real])
    loss_error = abs(actual.loss.item() - expected.loss.item()) / abs(expected.loss.item())
    record(f"amplify_fp32[{name}]", logits_rel_l2=logits_error, loss_rel=loss_error, loss=expected.loss.item())
    assert logits_error < 1e-3
    assert loss_error < 1e-3


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_bf16_logits_match_the_reference(te_amplify, bshd_batch, name: str) -> None:
    reference = random_reference(name)
    model = te_twin(te_amplify, reference)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected, actual = reference(**bshd_batch), model(**bshd_batch)
    real = bshd_batch["attention_mask"].bool()
    logits_error = rel_l2(actual.logits[real], expected.logits[real])
    loss_error = abs(actual.loss.item() - expected.loss.item()) / abs(expected.loss.item())
    record(f"amplify_bf16[{name}]", logits_rel_l2=logits_error, loss_rel=loss_error)
    assert logits_error < 2e-2


def test_backward_gradients_match_the_reference_fp32(te_amplify, bshd_batch) -> None:
    """Every parameter gradient, mapped back to the public layout with the converter itself."""
    reference = random_reference(SMALL)
    model = te_twin(te_amplify, reference)
    reference(**bshd_batch).loss.backward()
    model(**bshd_batch).loss.backward()
    te_grads = {name: param.grad for name, param in model.named_parameters()}
    te_grads[convert_amplify.TE_INV_FREQ_KEY] = model.amplify.rotary_embeddings.inv_freq
    mapped = convert_amplify.convert_te_to_amplify(te_grads, model.config)
    errors = {name: rel_l2(mapped[name], param.grad) for name, param in reference.named_parameters()}
    worst = max(errors, key=errors.get)
    record("amplify_fp32_grads[120M]", worst_grad_rel_l2=errors[worst], worst_grad_param=worst)
    assert errors[worst] < 1e-2


def test_thd_and_bshd_give_the_same_per_token_outputs(te_amplify, bshd_batch) -> None:
    torch._dynamo.reset()
    reference = random_reference(SMALL)
    bshd_model = te_twin(te_amplify, reference, attn_input_format="bshd")
    thd_model = te_twin(te_amplify, reference, attn_input_format="thd")
    packed = pack(bshd_batch, reference.config.pad_token_id)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded_out, packed_out = bshd_model(**bshd_batch), thd_model(**packed)
    real = bshd_batch["attention_mask"].bool()
    num_real = int(real.sum())
    assert packed_out.logits.shape == (1, packed["input_ids"].shape[1], 27)
    logits_error = rel_l2(packed_out.logits[0, :num_real], padded_out.logits[real])
    loss_error = abs(packed_out.loss.item() - padded_out.loss.item()) / padded_out.loss.item()
    record("amplify_thd_vs_bshd[bf16]", logits_rel_l2=logits_error, loss_rel=loss_error)
    assert logits_error < 1e-2
    assert loss_error < 1e-2
    with torch.no_grad():
        flat = thd_model(packed["input_ids"][0], cu_seqlens=packed["cu_seqlens"], max_seqlen=packed["max_seqlen"])
    assert flat.logits.shape == (packed["input_ids"].shape[1], 27)


def _fp8_recipe(name: str):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    check = te.is_fp8_block_scaling_available if name == "Float8BlockScaling" else te.is_fp8_available
    available, reason = check(return_reason=True)
    if not available:
        pytest.skip(f"{name} unavailable: {reason}")
    return getattr(recipe, name)()


@pytest.mark.parametrize("recipe_name", FP8_RECIPES)
def test_fp8_runs_forward_and_backward(te_amplify, bshd_batch, recipe_name: str) -> None:
    recipe = _fp8_recipe(recipe_name)
    reference = random_reference(SMALL)
    packed = pack(bshd_batch, reference.config.pad_token_id, multiple=128)  # block scaling needs 128-token tiles
    model = te_twin(te_amplify, reference, params_dtype="bfloat16", attn_input_format="thd").train()
    bf16_loss = model(**packed).loss.item()
    model.set_fp8(recipe)
    for _ in range(2):  # delayed scaling's second step uses the amax history of the first
        model.zero_grad(set_to_none=True)
        output = model(**packed)
        output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(layer.self_attention.layernorm_qkv.fp8 for layer in model.amplify.encoder.layers)
    assert not model.decoder.fp8, "the decoder must stay out of FP8"
    grads = [param.grad for param in model.parameters() if param.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    loss_change = abs(output.loss.item() - bf16_loss) / bf16_loss
    record(f"amplify_fp8[{recipe_name}]", loss_fp8=output.loss.item(), loss_bf16=bf16_loss, loss_rel=loss_change)
    assert loss_change < 5e-2


def test_meta_construction_then_init_weights(te_amplify) -> None:
    config = te_amplify.NVAmplifyConfig.from_amplify_config(AMPLIFYConfig.from_pretrained(MODEL_CONFIGS / SMALL))
    allocated_before = torch.cuda.memory_allocated()
    model = te_amplify.NVAmplifyForMaskedLM(config, device="meta")
    assert torch.cuda.memory_allocated() == allocated_before
    assert all(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items() if "_extra_state" not in key}
    assert shapes == convert_amplify.te_amplify_state_dict_shapes(config)

    model.to_empty(device="cuda")
    model.init_weights()
    embedding = model.amplify.embeddings.word_embeddings.weight
    assert torch.all(embedding[config.vocab_size :] == 0) and torch.all(embedding[config.pad_token_id] == 0)
    assert torch.all(model.decoder.weight[config.vocab_size :] == 0) and torch.all(model.decoder.bias == 0)
    uniform_std = config.decoder_init_range / 3**0.5
    for name, param in model.named_parameters():
        if name.endswith("layer_norm_weight"):
            assert torch.all(param == 1), name
        elif name.endswith("bias"):
            continue
        else:
            values = param[1 : config.vocab_size] if param.shape[0] == 32 else param
            assert values.abs().max() <= config.decoder_init_range, name
            assert abs(values.std().item() / uniform_std - 1) < 0.1, name
    inv_freq = model.amplify.rotary_embeddings.inv_freq
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq.cpu(), convert_amplify.rotary_inverse_frequencies(64, 10000.0))
    assert model.amplify.rotary_embeddings(4).shape == (4, 1, 1, 64)
    assert torch.equal(model.amplify.rotary_embeddings(4)[:, 0, 0, 0], model.amplify.rotary_embeddings(4)[:, 0, 0, 1])


def test_checkpoint_round_trip_through_te(te_amplify, bshd_batch, tmp_path: Path) -> None:
    """A public-layout checkpoint loads into TE; TE's export loads back into the reference with identical logits."""
    reference = random_reference(SMALL)
    state = {key: value.cpu() for key, value in reference.state_dict().items()}
    assert state.keys() == amplify_state_dict_shapes(reference.config).keys()
    source = convert_amplify.export_amplify_model(
        state, reference.config, tmp_path / "public", TOKENIZER_DIR, source_format="amplify"
    )
    model = te_amplify.NVAmplifyForMaskedLM.from_amplify_checkpoint(source, attn_input_format="bshd").eval()
    exported = convert_amplify.export_amplify_model(model.state_dict(), model.config, tmp_path / "te", TOKENIZER_DIR)
    reloaded = convert_amplify.load_amplify_checkpoint(exported).cuda().eval()
    with torch.no_grad():
        expected = reference(**bshd_batch).logits
        assert torch.equal(reloaded(**bshd_batch).logits, expected)
        real = bshd_batch["attention_mask"].bool()
        assert rel_l2(model(**bshd_batch).logits[real], expected[real]) < 1e-3


def test_config_validation(te_amplify) -> None:
    base = AMPLIFYConfig.from_pretrained(MODEL_CONFIGS / SMALL)
    config = te_amplify.NVAmplifyConfig.from_amplify_config(base, attn_input_format="thd", fp8_layers=[1, 24])
    assert (config.model_type, config.padded_vocab_size, config.num_hidden_layers) == ("nv_amplify", 32, 24)
    for bad_options, message in (
        ({"attn_input_format": "sbhd"}, "attn_input_format must be one of"),
        ({"fp8_layers": [0]}, r"fp8_layers must list 1-based layer numbers in 1\.\.24"),
        ({"padded_vocab_size": 16}, r"padded_vocab_size must be an int >= vocab_size \(27\)"),
        ({"params_dtype": "fp8"}, "params_dtype must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            te_amplify.NVAmplifyConfig.from_amplify_config(base, **bad_options)
    thd_model = te_amplify.NVAmplifyForMaskedLM(config, device="meta")
    ids = torch.ones(1, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        thd_model(ids)
