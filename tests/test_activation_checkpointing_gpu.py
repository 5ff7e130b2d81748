"""GPU check of activation checkpointing on the TE model: the same losses with and without it, BF16 and FP8.

Run on a CUDA machine with TransformerEngine:  python -m pytest tests/test_activation_checkpointing_gpu.py -q -s
Twenty AdamW steps of a small TE ESM-2 on packed (THD) batches of real proteins from one initial state; the losses of
every checkpointing mode are printed beside those without checkpointing and must agree.
"""

import copy

import pytest
import torch
from conftest import compose, read_fasta_sequences
from transformers import AutoTokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and TransformerEngine"),
]

STEPS, TOKENS = 20, 4096
MODES = [("full", "mlp"), ("selective", "mlp"), ("selective", "attention")]


def packed_batches(device: torch.device) -> list[dict]:
    """STEPS packed batches of real proteins (≤ 512 tokens each, padded to a multiple of 16), 15% of residues masked."""
    tokenizer = AutoTokenizer.from_pretrained("tokenizers/esm2")
    ids = [t[:512] for t in tokenizer(read_fasta_sequences(400))["input_ids"]]
    generator = torch.Generator().manual_seed(0)
    batches, cursor = [], 0
    for _ in range(STEPS):
        pack, used = [], 0
        while used + len(ids[cursor % len(ids)]) <= TOKENS:
            pack.append(torch.tensor(ids[cursor % len(ids)]))
            used += len(pack[-1])
            cursor += 1
        if used % 16:  # FP8 GEMMs need a token count divisible by 16: one padding segment, as the collator adds
            pack.append(torch.full((16 - used % 16,), tokenizer.pad_token_id))
        tokens = torch.cat(pack)
        masked = (torch.rand(tokens.shape, generator=generator) < 0.15) & (tokens > 3)  # specials are 0-3
        labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
        tokens = torch.where(masked, torch.full_like(tokens, tokenizer.mask_token_id), tokens)
        lengths = torch.tensor([0] + [len(p) for p in pack])
        batches.append(
            {
                "input_ids": tokens.to(device),
                "labels": labels.to(device),
                "cu_seqlens": lengths.cumsum(0).to(torch.int32).to(device),
                "max_seqlen": int(lengths.max()),
            }
        )
    return batches


def train_losses(precision: str, mode: str, part: str, initial: dict, batches: list[dict]) -> list[float]:
    from model import build_model, load_model_config

    cfg = compose(
        "L0_sanity",
        [
            "use_te=true",
            "use_sequence_packing=true",
            f"precision={precision}",
            f"activation_checkpointing.mode={mode}",
            f"activation_checkpointing.selective_part={part}",
        ],
    )
    device = torch.device("cuda")
    model = build_model(cfg, load_model_config(cfg.model_tag), use_te=True, attn_input_format="thd", device=device)
    model.load_state_dict(copy.deepcopy(initial))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).cpu()]


@pytest.mark.parametrize("precision", ["bf16", "fp8_delayed", "fp8_current"])
def test_checkpointing_keeps_the_losses_of_twenty_steps(precision):
    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")
    from model import build_model, load_model_config

    torch.manual_seed(0)
    cfg = compose("L0_sanity", ["use_te=true", "use_sequence_packing=true"])
    reference = build_model(cfg, load_model_config(cfg.model_tag), use_te=True, attn_input_format="thd", device="cuda")
    initial = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    del reference
    batches = packed_batches(torch.device("cuda"))
    baseline = train_losses(precision, "none", "mlp", initial, batches)
    assert baseline[-1] < baseline[0]
    for mode, part in MODES:
        losses = train_losses(precision, mode, part, initial, batches)
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, baseline, strict=True))
        print(
            f"\n[checkpointing] {precision} {mode}/{part}: max rel. loss diff {worst:.2e} over {STEPS} steps; "
            f"first {losses[0]:.5f} vs {baseline[0]:.5f}, last {losses[-1]:.5f} vs {baseline[-1]:.5f}"
        )
        assert worst < 1e-3, (mode, part, losses, baseline)
