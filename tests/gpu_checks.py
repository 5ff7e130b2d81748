"""What the GPU parity tests of the TE models share: exact FP32 GEMMs, metric records, and real masked batches.

Imported by tests/test_modeling_te_gpu.py (ESM-2) and tests/test_amplify_te_gpu.py (AMPLIFY); pure torch, so the
batch helpers also run on CPU.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import read_fasta_sequences
from transformers import AutoTokenizer


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """FP32 comparisons need true FP32 GEMMs on both sides (TF32 alone gives ~1e-3 relative error)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def record(test: str, **metrics: float | str) -> None:
    """Print a test's measured errors and, when GPU_METRICS_FILE is set, append them there as one JSON line."""
    print(f"\n[metrics] {test}: {json.dumps(metrics)}")
    if path := os.environ.get("GPU_METRICS_FILE"):
        with open(path, "a") as handle:
            handle.write(json.dumps({"test": test, **metrics}) + "\n")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def corrupted_batch(
    tokenizer_dir: Path, residue_ids: tuple[int, int], count: int, max_tokens: int, probability: float
) -> dict[str, torch.Tensor]:
    """`count` real proteins (padded, at most `max_tokens`) with seeded 80/10/10 corruption of `probability` of the
    residues; random replacements come from the family's amino-acid ids `residue_ids` (low, high exclusive). On CPU."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = tokenizer(
        read_fasta_sequences(count), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    generator = torch.Generator().manual_seed(1234)
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    selected = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    action = torch.rand(input_ids.shape, generator=generator)
    random_residues = torch.randint(*residue_ids, input_ids.shape, generator=generator)
    corrupted = input_ids.clone()
    corrupted[selected & (action < 0.8)] = tokenizer.mask_token_id
    replace = selected & (action >= 0.8) & (action < 0.9)
    corrupted[replace] = random_residues[replace]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    assert attention_mask.sum(-1).min() < attention_mask.shape[1], "padding must be exercised"
    return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}


def pack(batch: dict[str, torch.Tensor], pad_token_id: int, multiple: int = 16) -> dict[str, torch.Tensor | int]:
    """The same sequences packed (thd) plus a trailing padding segment that makes the token count a multiple."""
    real = batch["attention_mask"].bool()
    lengths = real.sum(-1).tolist()
    input_ids, labels = batch["input_ids"][real], batch["labels"][real]
    padding = multiple - len(input_ids) % multiple
    input_ids = torch.cat([input_ids, input_ids.new_full((padding,), pad_token_id)])
    labels = torch.cat([labels, labels.new_full((padding,), -100)])
    boundaries = torch.tensor([0, *lengths, padding]).cumsum(0)
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "cu_seqlens": boundaries.to(device=input_ids.device, dtype=torch.int32),
        "max_seqlen": max(*lengths, padding),
    }


def packed_batches(
    tokenizer_dir: Path, count: int, tokens: int, multiple: int = 128, max_length: int = 512, seed: int = 0
) -> list[dict[str, torch.Tensor | int]]:
    """`count` packed (thd) batches of real proteins, each at most `tokens` tokens before a trailing padding segment
    that makes the count a multiple of `multiple` (128 serves every FP8 recipe); the proteins are cropped to
    `max_length` tokens and follow each other through the sample, 15% of residues seeded-selected for the loss
    (80% <mask>, 10% a random residue, 10% kept). On CPU."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    proteins = [ids[:max_length] for ids in tokenizer(read_fasta_sequences(1000))["input_ids"]]
    special = torch.tensor(tokenizer.all_special_ids)
    residues = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    generator = torch.Generator().manual_seed(seed)
    batches, cursor = [], 0
    for _ in range(count):
        pack, used = [], 0
        while used + len(proteins[cursor % len(proteins)]) <= tokens:
            pack.append(torch.tensor(proteins[cursor % len(proteins)]))
            used += len(pack[-1])
            cursor += 1
        padding = -used % multiple
        ids = torch.cat([*pack, torch.full((padding,), tokenizer.pad_token_id)])
        selected = (torch.rand(ids.shape, generator=generator) < 0.15) & ~torch.isin(ids, special)
        action = torch.rand(ids.shape, generator=generator)
        random_residues = residues[torch.randint(len(residues), ids.shape, generator=generator)]
        corrupted = torch.where(selected & (action < 0.8), tokenizer.mask_token_id, ids)
        corrupted = torch.where(selected & (action >= 0.8) & (action < 0.9), random_residues, corrupted)
        lengths = [len(p) for p in pack] + ([padding] if padding else [])
        batches.append(
            {
                "input_ids": corrupted[None],
                "labels": torch.where(selected, ids, -100)[None],
                "cu_seqlens": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32),
                "max_seqlen": max(lengths),
            }
        )
    return batches


def final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's exported final model (`<ckpt_dir>/final_model`), in FP32 on the CPU."""
    from safetensors.torch import load_file

    files = sorted((Path(ckpt_dir) / "final_model").glob("*.safetensors"))
    assert files, f"no exported final model in {ckpt_dir}"
    return {name: tensor.float() for file in files for name, tensor in load_file(file).items()}


def weights_difference(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float | str]:
    """Relative L2 difference of two sets of the same weights: all together, and the worst tensor with its name."""
    assert actual.keys() == expected.keys()
    names = [name for name in expected if expected[name].norm() > 0]
    per_tensor = {name: rel_l2(actual[name], expected[name]) for name in names}
    worst = max(per_tensor, key=per_tensor.get)
    flat = [torch.cat([weights[name].flatten() for name in names]) for weights in (actual, expected)]
    return {"all_weights_rel_l2": rel_l2(*flat), "worst_tensor_rel_l2": per_tensor[worst], "worst_tensor": worst}
