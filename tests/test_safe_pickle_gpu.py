"""TransformerEngine's real FP8 delayed-scaling state passes the allow-list unchanged (safe_pickle.py, on a GPU)."""

import pytest
import torch
from test_modeling_te_gpu import bshd_batch, random_hf_model, te_esm, te_twin  # noqa: F401 (fixtures)

from checkpoint import TEExtraState, _checked_te_states

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]


def padded_to_16(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """FP8 GEMMs need token counts divisible by 16."""
    extra = -batch["input_ids"].shape[1] % 16
    pad = torch.nn.functional.pad
    return {
        "input_ids": pad(batch["input_ids"], (0, extra), value=pad_id),
        "attention_mask": pad(batch["attention_mask"], (0, extra)),
        "labels": pad(batch["labels"], (0, extra), value=-100),
    }


def test_delayed_scaling_state_reads_back_through_the_allow_list(te_esm, bshd_batch) -> None:  # noqa: F811
    from transformer_engine.common.recipe import DelayedScaling

    hf_model = random_hf_model("esm2_t6_8M_UR50D")
    batch = padded_to_16(bshd_batch, hf_model.config.pad_token_id)
    trained = te_twin(te_esm, hf_model, params_dtype="bfloat16").train()
    trained.set_fp8(DelayedScaling(amax_history_len=16))
    for _ in range(3):  # amax histories and scales move away from their initial values
        trained(**batch).loss.backward()
    saved = TEExtraState(trained).state_dict()
    assert sum(state.numel() > 0 for state in saved.values()) >= 12  # every FP8 module of the 6 layers has state

    restored = te_twin(te_esm, hf_model, params_dtype="bfloat16").train()
    restored.set_fp8(DelayedScaling(amax_history_len=16))
    TEExtraState(restored).load_state_dict(_checked_te_states(saved, "rank_00000.pt"))
    recorded = 0  # modules whose FP8 GEMMs ran, so their state is not the initial one
    for (_, module), (_, twin) in zip(trained.named_modules(), restored.named_modules(), strict=True):
        if "scaling_fwd" not in getattr(module, "fp8_meta", {}):
            continue
        for direction in ("scaling_fwd", "scaling_bwd"):
            torch.testing.assert_close(twin.fp8_meta[direction].scale, module.fp8_meta[direction].scale, rtol=0, atol=0)
            history = module.fp8_meta[direction].amax_history
            torch.testing.assert_close(twin.fp8_meta[direction].amax_history, history, rtol=0, atol=0)
        assert twin.fp8_meta["recipe"].amax_history_len == 16
        recorded += bool(module.fp8_meta["scaling_fwd"].amax_history.abs().sum() > 0)
    assert recorded >= 12  # QKV, output projection and MLP of each of the 6 layers (BF16 attention records none)
    torch.manual_seed(0)
    expected = trained(**batch).loss
    torch.manual_seed(0)
    assert restored(**batch).loss.item() == expected.item()  # same weights, same FP8 scales: the same loss
