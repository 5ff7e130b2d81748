"""GPU checks of rotary.py's Triton kernel against TE's fused THD RoPE, and of the TE models' kernel choices
(``rope_kernel``, ``gelu_in_gemm``) against the TE kernels they replace, on real packed proteins.

Run on a CUDA machine with TransformerEngine:  python -m pytest tests/test_rotary_gpu.py -q -s
"""

from types import ModuleType

import pytest
import torch
from gpu_checks import corrupted_batch, exact_fp32_matmuls, pack, record, rel_l2  # noqa: F401 (autouse fixture)
from test_modeling_te_gpu import SMALL, TOKENIZER_DIR, random_hf_model, te_twin

from convert import rotary_inverse_frequencies
from rotary import packed_rotary, rotate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]


@pytest.fixture(scope="module")
def te_esm() -> ModuleType:
    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")
    import modeling_esm_te

    return modeling_esm_te


@pytest.fixture(scope="module")
def packed_batch() -> dict[str, torch.Tensor | int]:
    batch = corrupted_batch(TOKENIZER_DIR, (4, 24), 8, 512, 0.15)
    return {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in pack(batch, 1).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_kernel_matches_te_fused_thd_rope(te_esm, interleaved: bool, dtype: torch.dtype) -> None:
    """Forward and backward on a strided query view of a fused QKV buffer, 650M-shaped, 37 sequences + padding."""
    from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb

    torch.manual_seed(0)
    lengths = torch.randint(1, 1025, (37,)).tolist()
    tokens, heads, head_dim = sum(lengths) + 13, 20, 64
    cu_seqlens = torch.tensor([0, *lengths, 13], device="cuda").cumsum(0).to(torch.int32)
    inv_freq = rotary_inverse_frequencies(head_dim, 10000.0, device="cuda")
    rows = max(lengths)
    qkv = torch.randn(tokens, heads, 3, head_dim, device="cuda", dtype=dtype)
    query = qkv[:, :, 0, :].detach().requires_grad_()
    grad = torch.randn(tokens, heads, head_dim, device="cuda", dtype=dtype)

    from modeling_amplify_te import AmplifyRotaryEmbedding

    table = AmplifyRotaryEmbedding if interleaved else te_esm.EsmRotaryEmbedding
    freqs = table(head_dim, 10000.0, torch.device("cuda"))(rows)
    expected = apply_rotary_pos_emb(query, freqs, "thd", fused=True, cu_seqlens=cu_seqlens, interleaved=interleaved)
    (expected_grad,) = torch.autograd.grad(expected, query, grad)
    ours = packed_rotary(inv_freq, cu_seqlens, tokens, rows).apply(query, interleaved)
    (ours_grad,) = torch.autograd.grad(ours, query, grad)

    real = int(cu_seqlens[-2])  # TE leaves nothing defined for tokens outside a sequence; compare real tokens
    for name, a, b in (("forward", ours[:real], expected[:real]), ("backward", ours_grad[:real], expected_grad[:real])):
        equal = (a == b).float().mean().item()
        worst = (a.float() - b.float()).abs().max().item()
        record(f"rope_kernel_vs_te[{name},{dtype},{interleaved}]", bit_equal_fraction=equal, max_abs_diff=worst)
        # The same float32 formula; the sines and cosines and the FMA contraction of the products may differ in their
        # last float32 bits (measured on an H200: up to 1.8e-5, 81-96% of the elements bit-equal),
        # which the BF16 output almost always rounds away (BF16 tolerance: one unit in the last place).
        rtol, atol = {torch.float32: (1e-5, 5e-5), torch.bfloat16: (2**-7, 2**-7)}[dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
        if dtype == torch.bfloat16:
            assert equal > 0.99, f"{name}: only {equal:.4f} of the elements are bit-equal to TE's"


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_in_place_kernel_equals_the_out_of_place_one(interleaved: bool) -> None:
    """The Triton kernel writing back into the query view of a fused QKV buffer: bit-equal, k and v untouched."""
    torch.manual_seed(1)
    tokens, heads, head_dim = 4099, 15, 64  # AMPLIFY 350M's heads, a token count no tile divides
    cu_seqlens = torch.tensor([0, 1000, 3000, tokens], device="cuda", dtype=torch.int32)
    rope = packed_rotary(rotary_inverse_frequencies(head_dim, 10000.0, device="cuda"), cu_seqlens, tokens, 2000)
    qkv = torch.randn(tokens, heads, 3, head_dim, device="cuda", dtype=torch.bfloat16)
    before = qkv.clone()
    expected = rotate(qkv[:, :, 0], *rope.tensors(), interleaved)
    rotate(qkv[:, :, 0], *rope.tensors(), interleaved, in_place=True)
    assert torch.equal(qkv[:, :, 0], expected) and torch.equal(qkv[:, :, 1:], before[:, :, 1:])


def test_attention_is_handed_one_packed_qkv_buffer(te_esm, packed_batch, monkeypatch) -> None:
    """With the recipe's RoPE every layer's attention reads q, k and v as one [tokens, heads, 3, d] buffer (th3d):
    no copy of v forward, one packed gradient backward."""
    from transformer_engine.pytorch.attention.dot_product_attention import utils as dpa_utils

    layouts = []
    detect = dpa_utils.get_qkv_layout

    def recording(*args: object, **kwargs: object) -> tuple:
        result = detect(*args, **kwargs)
        layouts.append(result[0])
        return result

    monkeypatch.setattr(dpa_utils, "get_qkv_layout", recording)
    model = te_twin(te_esm, random_hf_model(SMALL), attn_input_format="thd", rope_kernel="triton")
    step_outputs(model, packed_batch, autocast=True)
    assert layouts == ["th3d"] * model.config.num_hidden_layers


def step_outputs(model: torch.nn.Module, batch: dict, autocast: bool) -> dict[str, torch.Tensor | float]:
    """Logits, loss and all parameter gradients of one training forward and backward."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model.train()(**batch)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return {"logits": out.logits.float(), "loss": out.loss.item(), "grads": grads}


def differences(actual: dict, expected: dict) -> dict[str, float]:
    return {
        "logits_rel_l2": rel_l2(actual["logits"], expected["logits"]),
        "loss_rel": abs(actual["loss"] - expected["loss"]) / expected["loss"],
        "grads_rel_l2": rel_l2(actual["grads"], expected["grads"]),
    }


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_model_with_either_rope_kernel(te_esm, packed_batch, autocast: bool) -> None:
    """One packed batch through the same weights with rope_kernel=triton and =te: logits, loss and gradients."""
    hf_model = random_hf_model(SMALL)
    outputs = {
        kernel: step_outputs(
            te_twin(te_esm, hf_model, attn_input_format="thd", rope_kernel=kernel), packed_batch, autocast
        )
        for kernel in ("te", "triton")
    }
    metrics = differences(outputs["triton"], outputs["te"])
    record(f"rope_kernel_model[{'bf16' if autocast else 'fp32'}]", **metrics)
    bound = 1e-2 if autocast else 1e-3  # FP32: TE's TF32 GEMMs amplify last-bit differences (2.3e-4 on an H100)
    assert metrics["logits_rel_l2"] < bound and metrics["loss_rel"] < bound / 10 and metrics["grads_rel_l2"] < bound


def test_gelu_in_gemm_matches_separate_bias_gelu(te_esm, packed_batch) -> None:
    """BF16: GELU in the cuBLAS epilogue vs TE's compiled bias-GELU, same weights: both the tanh GELU, rounded apart."""
    hf_model = random_hf_model(SMALL)
    outputs = {}
    for fused in (False, True):
        model = te_twin(te_esm, hf_model, attn_input_format="thd", gelu_in_gemm=fused)
        assert all(layer.layernorm_mlp.bias_gelu_nvfusion is not fused for layer in model.esm.encoder.layers)
        outputs[fused] = step_outputs(model, packed_batch, autocast=True)
    metrics = differences(outputs[True], outputs[False])
    record("gelu_in_gemm_vs_bias_gelu[bf16]", **metrics)
    assert metrics["logits_rel_l2"] < 1e-2 and metrics["loss_rel"] < 1e-3 and metrics["grads_rel_l2"] < 2e-2
