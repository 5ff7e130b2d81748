"""GPU acceptance tests of modeling_esm_te against transformers' ESM-2 on real protein sequences.

Run on a CUDA machine with TransformerEngine:  python -m pytest tests/test_modeling_te_gpu.py -q -s
Measured errors are printed and, when GPU_METRICS_FILE is set, appended to that file as JSON lines. Run the FP32
tests once more with NVIDIA_TF32_OVERRIDE=0 for the strict check that only the GELU flavour differs.
"""

import os
from pathlib import Path
from types import ModuleType

import pytest
import torch
from gpu_checks import corrupted_batch, exact_fp32_matmuls, pack, record, rel_l2  # noqa: F401 (autouse fixture)
from transformers import AutoModelForMaskedLM, AutoTokenizer, EsmConfig, EsmForMaskedLM

import convert

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "model_configs"
TOKENIZER_DIR = REPO / "tokenizers" / "esm2"
FASTA = REPO / "data" / "sample" / "938293.PRJEB85.HG003687.faa"
SMALL, LARGE = "esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D"
NUM_SEQUENCES, MAX_TOKENS, MLM_PROBABILITY = 8, 512, 0.15


@pytest.fixture(scope="module")
def te_esm() -> ModuleType:
    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")
    import modeling_esm_te

    return modeling_esm_te


@pytest.fixture(scope="module")
def bshd_batch() -> dict[str, torch.Tensor]:
    """8 real proteins (≤ 512 tokens, padded) with seeded 80/10/10 MLM corruption of 15% of residues."""
    batch = corrupted_batch(TOKENIZER_DIR, (4, 24), NUM_SEQUENCES, MAX_TOKENS, MLM_PROBABILITY)
    mask_id = AutoTokenizer.from_pretrained(TOKENIZER_DIR).mask_token_id
    assert (batch["input_ids"] == mask_id).sum() > 50, "token dropout must be exercised"
    return {key: value.cuda() for key, value in batch.items()}


def random_hf_model(name: str, seed: int = 0) -> EsmForMaskedLM:
    """transformers ESM-2 with random weights; biases and LayerNorms perturbed so mapping mistakes show."""
    torch.manual_seed(seed)
    config = EsmConfig.from_pretrained(MODEL_CONFIGS / name, attn_implementation="eager")
    model = EsmForMaskedLM(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "LayerNorm.weight" in param_name or "layer_norm.weight" in param_name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model.cuda().eval()


def te_twin(te_esm: ModuleType, hf_model: EsmForMaskedLM, **te_options: object) -> torch.nn.Module:
    """TE model with the transformers model's weights, converted with convert.py."""
    config = te_esm.NVEsmConfig.from_esm_config(hf_model.config, **te_options)
    model = te_esm.NVEsmForMaskedLM(config, device="cuda")
    model.load_te_state_dict(convert.convert_hf_to_te(hf_model.state_dict(), config))
    return model.eval()


def te_grads_as_hf(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """TE parameter gradients renamed and reshaped to transformers' layout with the converter itself."""
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("_extra_state")}
    del state[convert.DECODER_KEY]  # tied: its gradient is the embedding's
    for name, param in model.named_parameters():
        state[name] = param.grad if param.grad is not None else torch.zeros_like(param)
    return convert.convert_te_to_hf(state, model.config)


def hf_grads(model: EsmForMaskedLM, batch: dict[str, torch.Tensor], autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_fp32_logits_and_loss_match_transformers(te_esm, bshd_batch, name: str, monkeypatch) -> None:
    """FP32 logits, loss and every parameter gradient against transformers with the same weights.

    TE runs its FP32 GEMMs on TF32 tensor cores (torch's allow_tf32 flags do not reach it), which dominates the
    measured error; with NVIDIA_TF32_OVERRIDE=0 in the environment the GEMMs are true FP32 and the test also checks
    that, once the reference uses TE's tanh GELU, nothing else differs.
    """
    hf_model = random_hf_model(name)
    te_model = te_twin(te_esm, hf_model)
    expected = hf_model(**bshd_batch)
    actual = te_model(**bshd_batch)
    expected.loss.backward()
    actual.loss.backward()
    real = bshd_batch["attention_mask"].bool()
    assert actual.logits.shape == expected.logits.shape
    logits_error = rel_l2(actual.logits[real], expected.logits[real])
    loss_error = abs(actual.loss.item() - expected.loss.item()) / abs(expected.loss.item())
    te_grads = te_grads_as_hf(te_model)
    grad_errors = {
        key: rel_l2(te_grads[key], param.grad)
        for key, param in hf_model.named_parameters()
        if param.grad is not None and param.grad.norm() > 0
    }
    worst_grad = max(grad_errors, key=grad_errors.get)

    # Attribution: give the reference TE's tanh-approximated MLP GELU; what remains is everything else.
    from transformers.models.esm import modeling_esm

    monkeypatch.setattr(
        modeling_esm.EsmIntermediate,
        "forward",
        lambda self, hidden: torch.nn.functional.gelu(self.dense(hidden), approximate="tanh"),
    )
    with torch.no_grad():
        tanh_reference = hf_model(**bshd_batch)
    tanh_error = rel_l2(actual.logits[real], tanh_reference.logits[real])
    record(
        f"fp32[{name}]",
        logits_rel_l2=logits_error,
        loss_rel=loss_error,
        logits_rel_l2_vs_tanh_gelu_reference=tanh_error,
        loss=expected.loss.item(),
        worst_grad_rel_l2=grad_errors[worst_grad],
        worst_grad_param=worst_grad,
        median_grad_rel_l2=sorted(grad_errors.values())[len(grad_errors) // 2],
    )
    assert logits_error < 1e-3
    assert loss_error < 1e-3
    assert grad_errors[worst_grad] < 1e-2
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":  # true FP32 GEMMs: only TE's tanh GELU is left
        assert tanh_error < 1e-5


@pytest.mark.parametrize("fp32_residual", [False, True], ids=["bf16_residual", "fp32_residual"])
@pytest.mark.parametrize("name", [SMALL, LARGE])
def test_bf16_logits_and_gradients_match_transformers(te_esm, bshd_batch, name: str, fp32_residual: bool) -> None:
    """BF16 autocast on both sides; gradients are judged against transformers' BF16 and FP32 gradients.

    transformers under autocast keeps its residual stream in FP32 (only the GEMMs run in BF16); te.TransformerLayer
    rounds it to BF16 unless `fp32_residual_connection` is on. With the option on, all gradients together must be
    within the issue's 1e-2 of transformers-BF16. Per parameter, no two BF16 implementations agree to 1e-2
    (transformers' own BF16 gradients differ from FP32 by up to 3-4e-2 at 650M), so per parameter the test asserts
    that TE-BF16 is about as accurate as transformers-BF16, both against FP32: every parameter outside the attention
    Q/K projections, plus a loose bound on Q/K, whose gradients flow through the softmax of near-uniform random-init
    attention, where TE's fused (flash-style) attention backward is several times noisier than eager attention. The
    exact Q/K mapping is checked per parameter in FP32 (test_fp32_logits_and_loss_match_transformers).
    """
    hf_model = random_hf_model(name)
    te_model = te_twin(te_esm, hf_model, fp32_residual_connection=fp32_residual)
    fp32_grads = hf_grads(hf_model, bshd_batch, autocast=False)
    bf16_grads = hf_grads(hf_model, bshd_batch, autocast=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = hf_model(**bshd_batch)
        actual = te_model(**bshd_batch)
    actual.loss.backward()

    real = bshd_batch["attention_mask"].bool()
    logits_error = rel_l2(actual.logits[real], expected.logits[real])
    te_grads = te_grads_as_hf(te_model)
    names = [key for key, grad in fp32_grads.items() if grad.norm() > 0]
    assert len(names) >= 16 * hf_model.config.num_hidden_layers
    flat = {
        label: torch.cat([grads[key].flatten() for key in names])
        for label, grads in (("te", te_grads), ("bf16", bf16_grads), ("fp32", fp32_grads))
    }
    global_error = rel_l2(flat["te"], flat["bf16"])
    te_global, hf_global = rel_l2(flat["te"], flat["fp32"]), rel_l2(flat["bf16"], flat["fp32"])
    te_error = {key: rel_l2(te_grads[key], fp32_grads[key]) for key in names}
    hf_error = {key: rel_l2(bf16_grads[key], fp32_grads[key]) for key in names}
    query_key = [key for key in names if ".attention.self.query." in key or ".attention.self.key." in key]
    others = [key for key in names if key not in query_key]
    excess = {key: te_error[key] - 1.5 * hf_error[key] for key in others}
    worst_other, worst_query_key = max(excess, key=excess.get), max(query_key, key=te_error.get)
    record(
        f"bf16[{name}, {'fp32' if fp32_residual else 'bf16'} residual]",
        logits_rel_l2=logits_error,
        all_grads_rel_l2_vs_hf_bf16=global_error,
        all_grads_te_vs_fp32=te_global,
        all_grads_hf_bf16_vs_fp32=hf_global,
        worst_non_qk_param=worst_other,
        worst_non_qk_te_vs_fp32=te_error[worst_other],
        worst_non_qk_hf_bf16_vs_fp32=hf_error[worst_other],
        median_te_vs_fp32=sorted(te_error.values())[len(te_error) // 2],
        median_hf_bf16_vs_fp32=sorted(hf_error.values())[len(hf_error) // 2],
        worst_qk_param=worst_query_key,
        worst_qk_te_vs_fp32=te_error[worst_query_key],
        worst_qk_hf_bf16_vs_fp32=hf_error[worst_query_key],
        max_te_over_hf_error_ratio_non_qk=max(te_error[key] / hf_error[key] for key in others),
    )
    assert logits_error < 2e-2
    assert te_global < 1.5 * hf_global
    assert excess[worst_other] < 2e-3
    assert te_error[worst_query_key] < 0.25
    if fp32_residual or name == SMALL:
        assert global_error < 1e-2


def test_fp32_residual_connection_changes_only_rounding(te_esm, bshd_batch) -> None:
    """The FP32-residual layer computes the same function: identical in FP32, and it trains with BF16 weights."""
    hf_model = random_hf_model(SMALL)
    plain = te_twin(te_esm, hf_model)
    fp32_residual = te_twin(te_esm, hf_model, fp32_residual_connection=True)
    with torch.no_grad():
        fp32_error = rel_l2(fp32_residual(**bshd_batch).logits, plain(**bshd_batch).logits)
    # Without autocast and with BF16 weights (FSDP2's mixed precision), the residual is FP32 and the layers BF16.
    bf16_weights = fp32_residual.to(torch.bfloat16).train()
    output = bf16_weights(**bshd_batch)
    output.loss.backward()
    grads = [param.grad for param in bf16_weights.parameters() if param.requires_grad]
    with torch.no_grad():
        reference_loss = plain(**bshd_batch).loss.item()
    bf16_loss_error = abs(output.loss.item() - reference_loss) / reference_loss
    record("fp32_residual", fp32_logits_rel_l2=fp32_error, bf16_weights_loss_rel=bf16_loss_error)
    assert fp32_error < 1e-5
    assert output.logits.dtype == torch.bfloat16
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert bf16_loss_error < 1e-2


def test_thd_and_bshd_give_the_same_per_token_outputs(te_esm, bshd_batch) -> None:
    # TE compiles its bias-dropout-add with torch.compile; after the 650M tests it may have hit the recompile limit
    # and run one format compiled and the other eagerly (different BF16 rounding). Start both from the same state.
    torch._dynamo.reset()
    hf_model = random_hf_model(SMALL)
    bshd_model = te_twin(te_esm, hf_model, attn_input_format="bshd")
    thd_model = te_twin(te_esm, hf_model, attn_input_format="thd")
    packed = pack(bshd_batch, hf_model.config.pad_token_id)
    assert packed["input_ids"].shape[1] % 16 == 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded_out = bshd_model(**bshd_batch)
        packed_out = thd_model(**packed)
    real = bshd_batch["attention_mask"].bool()
    num_real = int(real.sum())
    assert packed_out.logits.shape == (1, packed["input_ids"].shape[1], hf_model.config.vocab_size)
    logits_error = rel_l2(packed_out.logits[0, :num_real], padded_out.logits[real])
    loss_error = abs(packed_out.loss.item() - padded_out.loss.item()) / padded_out.loss.item()
    record("thd_vs_bshd[bf16]", logits_rel_l2=logits_error, loss_rel=loss_error)
    assert logits_error < 1e-2
    assert loss_error < 1e-2

    flat = thd_model(
        input_ids=packed["input_ids"][0],
        cu_seqlens=packed["cu_seqlens"],
        max_seqlen=packed["max_seqlen"],
    )
    assert flat.logits.shape == (packed["input_ids"].shape[1], hf_model.config.vocab_size)


def test_packed_training_step_never_syncs_host_and_device(te_esm, bshd_batch) -> None:
    """The training loop must not wait on the GPU each step: no .item()/nonzero/host copies in forward or backward."""
    hf_model = random_hf_model(SMALL)
    thd_model = te_twin(te_esm, hf_model, attn_input_format="thd").train()
    packed = pack(bshd_batch, hf_model.config.pad_token_id)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        thd_model(**packed).loss.backward()  # warm-up: TE picks kernels and compiles fusions on first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = thd_model(**packed).loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("fuse_qkv", [True, False])
def test_meta_construction_then_init_weights(te_esm, fuse_qkv: bool) -> None:
    config = te_esm.NVEsmConfig.from_esm_config(
        EsmConfig.from_pretrained(MODEL_CONFIGS / SMALL), fuse_qkv_params=fuse_qkv
    )
    allocated_before = torch.cuda.memory_allocated()
    model = te_esm.NVEsmForMaskedLM(config, device="meta")
    assert torch.cuda.memory_allocated() == allocated_before
    assert all(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    te_state = {key: tuple(value.shape) for key, value in model.state_dict().items() if "_extra_state" not in key}
    assert te_state == convert.te_state_dict_shapes(config)

    model.to_empty(device="cuda")
    model.init_weights()

    std = config.initializer_range
    embedding = model.esm.embeddings.word_embeddings.weight
    assert model.lm_head.decoder.weight is embedding
    worst_std_ratio = 1.0
    for name, param in model.named_parameters():
        if name.endswith("layer_norm_weight") or "layer_norm.weight" in name or "emb_layer_norm_after.weight" in name:
            assert torch.all(param == 1), name
        elif name.endswith("bias"):
            assert torch.all(param == 0), name
        else:
            values = param[: config.vocab_size] if param is embedding else param
            if param is embedding:
                values = values[torch.arange(config.vocab_size, device=param.device) != config.pad_token_id]
            ratio = values.std().item() / std
            worst_std_ratio = ratio if abs(ratio - 1) > abs(worst_std_ratio - 1) else worst_std_ratio
            assert abs(ratio - 1) < 0.05, (name, ratio)
            assert abs(values.mean().item()) < 0.05 * std, name
    assert torch.all(embedding[config.pad_token_id] == 0)
    assert torch.all(embedding[config.vocab_size :] == 0)
    proj = model.esm.encoder.layers[-1].self_attention.proj.weight
    assert abs(proj.std().item() / std - 1) < 0.05  # output projections are not depth-scaled
    inv_freq = model.esm.rotary_embeddings.inv_freq
    assert inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq.cpu(), convert.rotary_inverse_frequencies(2 * inv_freq.numel(), 10000.0))
    assert torch.all(model.esm.contact_head.regression_bias == 0)
    assert model.esm.contact_head.regression_weight.abs().sum() > 0
    record(f"meta_init[fuse_qkv={fuse_qkv}]", worst_weight_std_over_0_02=worst_std_ratio)


def test_fp8_runs_forward_and_backward(te_esm, bshd_batch) -> None:
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    available, reason = te.is_fp8_available(return_reason=True)
    if not available:
        pytest.skip(f"FP8 unavailable: {reason}")
    hf_model = random_hf_model(SMALL)
    batch = dict(bshd_batch)  # FP8 GEMMs need token counts divisible by 16: pad the sequence dimension.
    extra = -batch["input_ids"].shape[1] % 16
    batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=hf_model.config.pad_token_id)
    batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra))
    batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=-100)

    losses = {}
    for label, fp8_layers in (("all", None), ("first_only", [1])):
        model = te_twin(te_esm, hf_model, params_dtype="bfloat16", fp8_layers=fp8_layers).train()
        reference_loss = model(**batch).loss.item()
        model.set_fp8(DelayedScaling())
        for _ in range(2):  # the second step uses the amax history recorded by the first
            output = model(**batch)
            output.loss.backward()
        layers = model.esm.encoder.layers
        expected_fp8 = [fp8_layers is None or number in fp8_layers for number in range(1, len(layers) + 1)]
        assert [layer.self_attention.layernorm_qkv.fp8 for layer in layers] == expected_fp8
        assert torch.isfinite(output.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.lm_head.dense.weight.grad is not None
        losses[label] = (output.loss.item(), reference_loss)
        assert abs(output.loss.item() - reference_loss) / reference_loss < 5e-2

    packed = pack(bshd_batch, hf_model.config.pad_token_id)
    thd_model = te_twin(te_esm, hf_model, params_dtype="bfloat16", attn_input_format="thd").train()
    thd_model.set_fp8(DelayedScaling())
    thd_loss = thd_model(**packed).loss
    thd_loss.backward()
    assert torch.isfinite(thd_loss)
    record("fp8_smoke", **{f"{k}_loss_fp8_vs_bf16": f"{v[0]:.4f} vs {v[1]:.4f}" for k, v in losses.items()})


def test_hf_checkpoint_round_trip_through_te(te_esm, bshd_batch, tmp_path: Path) -> None:
    """from_hf_checkpoint loads a transformers checkpoint; the exported TE model loads back with plain transformers."""
    hf_model = random_hf_model(SMALL)
    hf_model.save_pretrained(tmp_path / "hf")
    te_model = te_esm.NVEsmForMaskedLM.from_hf_checkpoint(tmp_path / "hf").eval()
    assert te_model.lm_head.decoder.weight is te_model.esm.embeddings.word_embeddings.weight

    export_dir = convert.export_hf_model(te_model.state_dict(), te_model.config, tmp_path / "export", TOKENIZER_DIR)
    reloaded = AutoModelForMaskedLM.from_pretrained(export_dir, attn_implementation="eager").cuda().eval()
    assert AutoTokenizer.from_pretrained(export_dir).mask_token_id == hf_model.config.mask_token_id
    with torch.no_grad():
        expected = hf_model(**bshd_batch).logits
        via_te = te_model(**bshd_batch).logits
        reloaded_logits = reloaded(**bshd_batch).logits
    assert torch.equal(reloaded_logits, expected)
    real = bshd_batch["attention_mask"].bool()
    assert rel_l2(via_te[real], expected[real]) < 1e-3

    unfused = te_esm.NVEsmForMaskedLM.from_hf_checkpoint(tmp_path / "hf", config=te_model.config, fuse_qkv_params=False)
    assert not unfused.config.fuse_qkv_params
    assert unfused.config.padded_vocab_size == te_model.config.padded_vocab_size
    with torch.no_grad():
        assert rel_l2(unfused.eval()(**bshd_batch).logits[real], expected[real]) < 1e-3


def test_config_validation(te_esm) -> None:
    esm_config = EsmConfig.from_pretrained(MODEL_CONFIGS / SMALL)
    config = te_esm.NVEsmConfig.from_esm_config(esm_config, attn_input_format="thd", fp8_layers=[1, 6])
    assert (config.model_type, config.padded_vocab_size, config.num_hidden_layers) == ("nv_esm", 64, 6)
    for bad_options, message in (
        ({"attn_input_format": "sbhd"}, "attn_input_format must be one of"),
        ({"fp8_layers": [0]}, r"fp8_layers must list 1-based layer numbers in 1\.\.6"),
        ({"fp8_layers": [2, 2]}, "more than once"),
        ({"padded_vocab_size": 32}, r"padded_vocab_size \(32\) must be >= vocab_size \(33\)"),
        ({"params_dtype": "fp8"}, "params_dtype must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            te_esm.NVEsmConfig.from_esm_config(esm_config, **bad_options)

    bshd_model = te_esm.NVEsmForMaskedLM(te_esm.NVEsmConfig.from_esm_config(esm_config), device="meta")
    ids = torch.ones(2, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"cu_seqlens given but config\.attn_input_format is 'bshd'"):
        bshd_model(ids, cu_seqlens=torch.zeros(3, dtype=torch.int32, device="meta"), max_seqlen=8)
    thd_model = te_esm.NVEsmForMaskedLM(config, device="meta")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        thd_model(ids[:1])
    with pytest.raises(TypeError, match="max_seqlen must be a Python int"):
        thd_model(ids[:1], cu_seqlens=torch.zeros(3, dtype=torch.int32, device="meta"), max_seqlen=torch.tensor(8))


def test_fp8_primary_weights_train_with_fresh_transposes(te_esm, bshd_batch) -> None:
    """FP8 primary weights (quantized_model_init) under TE's FusedAdam with FP32 master weights, as train_ddp.py runs.

    Hopper's backward GEMMs read a transposed FP8 copy of each weight; the optimizer rewrites the weight, so every
    backward after a step must see a transpose of the new data, not the first step's.
    """
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    from checkpoint import DistributedStateDict
    from training import master_weights_adam

    available, reason = te.is_fp8_available(return_reason=True)
    if not available:
        pytest.skip(f"FP8 unavailable: {reason}")
    packed = pack(bshd_batch, 1)
    recipe = DelayedScaling()
    config = te_esm.NVEsmConfig.from_esm_config(
        EsmConfig.from_pretrained(MODEL_CONFIGS / SMALL),
        params_dtype="bfloat16",
        attn_input_format="thd",
        fp8_layers=[2, 3, 4, 5],
    )
    torch.manual_seed(0)
    model = te_esm.NVEsmForMaskedLM(config, device="cuda", fp8_weights_recipe=recipe).train()
    model.set_fp8(recipe)
    fp8_weights = {n: p for n, p in model.named_parameters() if isinstance(p, te.QuantizedTensor)}
    layers_with_fp8 = sorted({int(n.split(".")[3]) + 1 for n in fp8_weights})
    assert layers_with_fp8 == [2, 3, 4, 5] and all(n.endswith("weight") for n in fp8_weights)
    assert not isinstance(model.esm.embeddings.word_embeddings.weight, te.QuantizedTensor)

    optimizer = master_weights_adam(
        list(model.parameters()), {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 0.01}
    )
    losses, stale = [], []
    for _ in range(4):
        loss = model(**packed).loss
        loss.backward()
        losses.append(loss.item())
        for name, param in fp8_weights.items():
            transpose = getattr(param, "_transpose", None)
            if transpose is not None and not param._transpose_invalid:
                stale += [name] if not torch.equal(transpose, param._data.t().contiguous()) else []
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert not stale, f"backward read stale FP8 transposes: {stale[:3]}"
    assert losses[-1] < losses[0], losses
    masters = [optimizer.state[p]["master_param"] for p in fp8_weights.values()]
    assert all(m.dtype == torch.float32 for m in masters)

    exported = DistributedStateDict().full_model_state_dict(model)
    for name, param in fp8_weights.items():
        assert type(exported[name]) is torch.Tensor and exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], param.dequantize().cpu())
    record("fp8_primary_weights", losses=[round(v, 4) for v in losses], fp8_weights=len(fp8_weights))


def test_a_failed_capture_does_not_switch_fp8_off_for_later_ones(te_esm, monkeypatch) -> None:
    """TE's capture patches StaticShapeLayers.__call__ with its FP8 autocast and undoes it only on success; after a
    capture that raised, the encoder undoes it itself (else later captures in the process ran with FP8 off)."""

    def capture_that_runs_out_of_memory(modules, *args, **kwargs):
        type(modules[0]).__call__ = lambda self, *a, **k: None  # what TE leaves behind when the capture raises
        raise torch.OutOfMemoryError("CUDA out of memory")

    model = te_twin(te_esm, random_hf_model(SMALL), attn_input_format="thd").train()
    monkeypatch.setattr(te_esm.te, "make_graphed_callables", capture_that_runs_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        model.esm.encoder.make_cuda_graphs((), 64)
    assert "__call__" not in te_esm.StaticShapeLayers.__dict__
    assert te_esm.StaticShapeLayers.__call__ is torch.nn.Module.__call__


def test_graphs_capture_each_run_of_layers_under_one_recipe_as_one(te_esm) -> None:
    """One graph per run of layers with the same precision, so replays copy no hidden states between layers; a plan
    with BF16 first and last layers is three runs, the middle one FP8."""
    from transformer_engine.common.recipe import Float8CurrentScaling

    model = te_twin(te_esm, random_hf_model(SMALL), attn_input_format="thd", fp8_layers=[2, 3, 4, 5])
    encoder = model.esm.encoder
    assert [len(run) for run in encoder.precision_runs()] == [6]  # BF16 throughout: one graph
    encoder.fp8_recipe = Float8CurrentScaling()
    runs = encoder.precision_runs()
    assert [[layer.layer_number for layer in run] for run in runs] == [[1], [2, 3, 4, 5], [6]]
    assert [encoder.layer_uses_fp8(run[0].layer_number) for run in runs] == [False, True, False]
