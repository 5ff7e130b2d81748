"""train_mfsdp.py on CPU: the `mfsdp.*` keys reach Megatron-FSDP's `fully_shard_model` (which itself needs CUDA)."""

import pytest
import torch
from conftest import compose, tiny_esm_config

import train_mfsdp
from collator import BatchLayout
from distributed import DistributedContext
from training import Run

TINY_ESM = tiny_esm_config()


def wrapper_arguments(monkeypatch, overrides):
    """The keyword arguments train_mfsdp.py gives `fully_shard_model` for a config (the wrapper and mesh stubbed)."""
    calls = []
    monkeypatch.setattr(train_mfsdp, "fully_shard_model", lambda **kwargs: calls.append(kwargs) or kwargs["module"])
    monkeypatch.setattr(train_mfsdp, "init_device_mesh", lambda *args, **kwargs: ("mesh", args, kwargs))
    cfg = compose("L0_sanity", overrides)
    context = DistributedContext(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    run = Run(cfg=cfg, context=context, tokenizer=None, model_config=TINY_ESM, use_te=False,
              layout=BatchLayout.from_config(cfg), train_stream=None, validation_loader=None)  # fmt: skip
    train_mfsdp.build_mfsdp_model(run)
    (kwargs,) = calls
    assert kwargs["device_mesh"] == ("mesh", ("cuda", (2, 1)), {"mesh_dim_names": ("dp", "tp")})
    return kwargs


FP32 = torch.float32
CASES = {  # overrides -> (zero_dp_strategy, overlap_grad_reduce, overlap_param_gather, main params, main grads dtype)
    (): ("optim_grads_params", True, True, FP32, FP32),
    (
        "mfsdp.zero_dp_strategy=optim_grads",
        "mfsdp.overlap_grad_reduce=false",
        "mfsdp.overlap_param_gather=false",
        "mfsdp.grad_reduce_dtype=bfloat16",
    ): ("optim_grads", False, False, FP32, torch.bfloat16),
    ("mfsdp.zero_dp_strategy=optim", "mfsdp.overlap_param_gather=false"): ("optim", True, False, FP32, FP32),
    ("use_fp32_master_weights=false", "mfsdp.grad_reduce_dtype=bfloat16"): (
        "optim_grads_params",
        True,
        True,
        None,
        None,
    ),
}


@pytest.mark.parametrize(("overrides", "expected"), CASES.items())
def test_every_mfsdp_key_reaches_the_megatron_fsdp_wrapper(monkeypatch, overrides, expected):
    kwargs = wrapper_arguments(monkeypatch, list(overrides))
    policy = kwargs["mixed_precision_policy"]
    assert (
        kwargs["zero_dp_strategy"],
        kwargs["overlap_grad_reduce"],
        kwargs["overlap_param_gather"],
        policy.main_params_dtype,
        policy.main_grads_dtype,
    ) == expected
    assert kwargs["init_model_with_meta_device"]  # sharded strategies build on the meta device


def test_no_shard_builds_the_model_in_place(monkeypatch):
    kwargs = wrapper_arguments(monkeypatch, ["mfsdp.zero_dp_strategy=no_shard"])
    assert kwargs["zero_dp_strategy"] == "no_shard" and not kwargs["init_model_with_meta_device"]
    assert not any(param.is_meta for param in kwargs["module"].parameters())
