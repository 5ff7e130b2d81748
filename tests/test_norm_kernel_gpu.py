"""GPU checks of ``norm_kernel``: cuDNN's LayerNorm/RMSNorm kernels against TE's own, in the TE models' training step.

Each check runs one packed batch through twin models (same weights) with ``norm_kernel=te`` and ``=cudnn``, records
which kernels ran, and compares logits, loss and gradients.

Run on a CUDA machine with TransformerEngine:  python -m pytest tests/test_norm_kernel_gpu.py -q -s
"""

from collections.abc import Callable

import pytest
import torch
from gpu_checks import pack, record
from test_amplify_te_gpu import SMALL as AMPLIFY_SMALL
from test_amplify_te_gpu import bshd_batch, random_reference, te_amplify  # noqa: F401 (fixtures)
from test_amplify_te_gpu import te_twin as amplify_twin
from test_modeling_te_gpu import SMALL, random_hf_model, te_twin
from test_rotary_gpu import differences, packed_batch, step_outputs, te_esm  # noqa: F401 (fixtures)

from norm_kernel import NORM_KERNELS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]
TE_NORM_NAMESPACE = "transformer_engine::normalization"  # TE's own LayerNorm/RMSNorm kernels live here


def profiled_step(model: torch.nn.Module, batch: dict, autocast: bool) -> tuple[dict, list[str]]:
    """One training step after a warm-up step (cuDNN builds its plans there): outputs and TE's norm kernels run."""
    step_outputs(model, batch, autocast)
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        outputs = step_outputs(model, batch, autocast)
        torch.cuda.synchronize()
    te_kernels = sorted({event.name for event in prof.events() if TE_NORM_NAMESPACE in event.name})
    return outputs, te_kernels


def compare(build: Callable[[str], torch.nn.Module], batch: dict, autocast: bool, name: str) -> dict[str, float]:
    """Both kernel choices on twin models: TE's own kernels must run only under norm_kernel=te."""
    outputs, te_kernels = {}, {}
    for kernel in NORM_KERNELS:
        outputs[kernel], te_kernels[kernel] = profiled_step(build(kernel), batch, autocast)
    assert te_kernels["te"], "norm_kernel=te ran none of TE's normalization kernels"
    assert not te_kernels["cudnn"], f"norm_kernel=cudnn still ran TE's kernels: {te_kernels['cudnn'][:3]}"
    metrics = differences(outputs["cudnn"], outputs["te"])
    record(name, **metrics)
    return metrics


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_esm_layernorm_cudnn_matches_te(te_esm, packed_batch, autocast: bool) -> None:  # noqa: F811
    hf_model = random_hf_model(SMALL)

    def build(kernel: str) -> torch.nn.Module:
        return te_twin(te_esm, hf_model, attn_input_format="thd", norm_kernel=kernel)

    metrics = compare(build, packed_batch, autocast, f"norm_kernel_esm[{'bf16' if autocast else 'fp32'}]")
    bound = 1e-2 if autocast else 1e-3  # last-bit differences of the norms, carried through TF32/BF16 GEMMs
    assert metrics["logits_rel_l2"] < bound and metrics["loss_rel"] < bound / 10 and metrics["grads_rel_l2"] < bound


def test_esm_layernorm_cudnn_under_fp8(te_esm, packed_batch) -> None:  # noqa: F811
    """FP8 delayed scaling: the LayerNorm writes the FP8 input of the QKV and FC1 GEMMs; cuDNN's must do it too."""
    from transformer_engine.common.recipe import DelayedScaling

    hf_model = random_hf_model(SMALL)

    def build(kernel: str) -> torch.nn.Module:
        model = te_twin(te_esm, hf_model, attn_input_format="thd", norm_kernel=kernel, params_dtype="bfloat16")
        model.set_fp8(DelayedScaling())
        return model

    metrics = compare(build, packed_batch, False, "norm_kernel_esm[fp8_delayed]")
    assert metrics["logits_rel_l2"] < 5e-2 and metrics["loss_rel"] < 5e-3 and metrics["grads_rel_l2"] < 1e-1


def test_amplify_rmsnorm_cudnn_matches_te(te_amplify, bshd_batch) -> None:  # noqa: F811
    reference = random_reference(AMPLIFY_SMALL)
    packed = pack(bshd_batch, reference.config.pad_token_id)

    def build(kernel: str) -> torch.nn.Module:
        return amplify_twin(te_amplify, reference, attn_input_format="thd", norm_kernel=kernel)

    metrics = compare(build, packed, True, "norm_kernel_amplify[bf16]")
    # 1.05e-2 on an H100: BF16 rounding of the norm outputs, as large as TE's BF16 logits against the reference's
    assert metrics["logits_rel_l2"] < 2e-2 and metrics["loss_rel"] < 1e-3 and metrics["grads_rel_l2"] < 2e-2


def test_each_model_runs_its_own_choice(te_esm, packed_batch) -> None:  # noqa: F811
    """TE's switch is process-wide: two live models with different choices each get theirs, in either order."""
    hf_model = random_hf_model(SMALL)
    models = {kernel: te_twin(te_esm, hf_model, attn_input_format="thd", norm_kernel=kernel) for kernel in NORM_KERNELS}
    for kernel in (*NORM_KERNELS, *reversed(NORM_KERNELS)):
        _, te_kernels = profiled_step(models[kernel], packed_batch, True)
        assert bool(te_kernels) == (kernel == "te"), f"{kernel}: TE's normalization kernels run: {te_kernels[:3]}"


def test_graphs_keep_the_choice_made_at_capture(te_esm, packed_batch) -> None:  # noqa: F811
    """A graphed model replays the kernels of its own choice, whatever another model set since (or before capture)."""
    from norm_kernel import select_norm_kernel

    hf_model = random_hf_model(SMALL)
    model = te_twin(te_esm, hf_model, attn_input_format="thd", norm_kernel="cudnn", params_dtype="bfloat16").train()
    select_norm_kernel("te")  # as if another model had run last
    segments = packed_batch["cu_seqlens"].numel() - 1
    model.make_cuda_graphs(packed_batch["input_ids"].numel(), segments, packed_batch["max_seqlen"], None)
    _, te_kernels = profiled_step(model, packed_batch, False)
    assert not te_kernels, f"the graphed layers run TE's normalization kernels: {te_kernels[:3]}"
