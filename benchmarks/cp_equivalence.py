"""Context parallelism against one GPU holding every sequence whole: logits, loss and gradients on real proteins.

    NVIDIA_TF32_OVERRIDE=0 torchrun --nproc_per_node=2 benchmarks/cp_equivalence.py [--out results.json]

Every rank builds the same packed batch of sample proteins (THDCollator, ESM-2 masking, token dropout on), runs it
whole through a TE model, then its own CP shard (context_parallel.shard_collated_batch) through an identical model
split over the CP group of all ranks (model.enable_context_parallel: the recipe's own path). The shards' logits,
gathered, must match the whole batch's, the loss normalised by the global masked count must match, and the summed
gradients of the CP ranks must match the whole batch's: relative L2 below 2e-2. ESM-2 8M and the tiny AMPLIFY (the
shared backbone hook), with TE's p2p ring and, for ESM-2, all_gather and a2a. Exits 1 if any check fails;
tests/test_context_parallel_gpu.py runs it.

"float32" means FP32 weights under BF16 autocast (the recipe's default master weights), not FP32 attention: TE has no
FP32 attention kernel under CP (its unfused attention refuses context parallelism, and its fused and flash kernels
take FP16/BF16 only: transformer_engine/pytorch/attention/dot_product_attention/utils.py), so both sides attend in
BF16 and differ by the ring's order of partial softmax sums.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collator import MLMMasker, THDCollator
from context_parallel import IGNORE_INDEX, gather_shards, shard_collated_batch
from dataset import read_fasta
from distributed import DistributedContext, destroy_distributed, init_distributed, parallel_mesh
from model import enable_context_parallel, load_model_config

RECIPE = Path(__file__).resolve().parents[1]
LIMITS = {"float32": 2e-2, "bfloat16": 2e-2}  # relative L2 of logits and gradients, relative loss difference
CASES = [  # (model config, tokenizer, params dtype, cp_comm_type)
    ("esm2_t6_8M_UR50D", "esm2", "float32", "p2p"),
    ("esm2_t6_8M_UR50D", "esm2", "bfloat16", "p2p"),
    ("esm2_t6_8M_UR50D", "esm2", "bfloat16", "all_gather"),
    ("esm2_t6_8M_UR50D", "esm2", "bfloat16", "a2a"),
    ("amplify_tiny", "amplify", "float32", "p2p"),
    ("amplify_tiny", "amplify", "bfloat16", "p2p"),
]


def packed_batch(tokenizer_name: str, count: int = 8, max_seq_length: int = 1024) -> tuple[dict, int]:
    """The same packed batch on every rank: the sample's first proteins, masked under a fixed seed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(RECIPE / "tokenizers" / tokenizer_name)
    records = read_fasta([str(RECIPE / "data" / "sample" / "938293.PRJEB85.HG003687.faa")])
    samples = [{"input_ids": tokenizer(next(records)["sequence"].rstrip("*"))["input_ids"]} for _ in range(count)]
    masker = MLMMasker.from_tokenizer(tokenizer, max_seq_length=max_seq_length, seed=1234)
    return THDCollator(masker, tokenizer.pad_token_id, token_multiple=16)(samples), tokenizer.pad_token_id


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    """FP32 weights compute under BF16 autocast, as training does; BF16 weights as they are."""
    if dtype == "float32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(tag: str, dtype: str) -> torch.nn.Module:
    """The TE model of `tag` for packed batches, seeded: every call gives the same weights."""
    config = load_model_config(tag)
    torch.manual_seed(0)
    if tag.startswith("amplify"):
        from modeling_amplify_te import NVAmplifyConfig, NVAmplifyForMaskedLM

        te_config = NVAmplifyConfig.from_amplify_config(config, attn_input_format="thd", params_dtype=dtype)
        return NVAmplifyForMaskedLM(te_config, device="cuda")
    from modeling_esm_te import NVEsmConfig, NVEsmForMaskedLM

    te_config = NVEsmConfig.from_esm_config(config, attn_input_format="thd", params_dtype=dtype)
    return NVEsmForMaskedLM(te_config, device="cuda")


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def compare(case: tuple[str, str, str, str], context: DistributedContext) -> dict:
    tag, tokenizer_name, dtype, comm_type = case
    batch, pad_id = packed_batch(tokenizer_name)
    count = (batch["labels"] != IGNORE_INDEX).sum().item()
    whole_model = build(tag, dtype)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with autocast(dtype):
        whole = whole_model(inputs["input_ids"], cu_seqlens=inputs["cu_seqlens"], max_seqlen=inputs["max_seqlen"])
    whole_loss = summed_loss(whole.logits, inputs["labels"]) / count
    whole_loss.backward()

    cp_model = build(tag, dtype)
    enable_context_parallel(cp_model, context.cp_size, comm_type)
    shard = shard_collated_batch(batch, context.cp_size, context.cp_rank, pad_id, token_multiple=16)
    shard = {k: v.cuda() if torch.is_tensor(v) else v for k, v in shard.items()}
    with autocast(dtype):
        logits = cp_model(**{k: v for k, v in shard.items() if k != "labels"}).logits
    loss = summed_loss(logits, shard["labels"]) / count
    loss.backward()
    cp_loss = loss.detach().clone()
    dist.all_reduce(cp_loss)
    grads = flat_grads(cp_model)
    dist.all_reduce(grads)  # what DDP/FSDP2 sum (and the loss scale undoes their mean): every CP rank's part
    pieces = [torch.empty_like(logits[0]) for _ in range(context.cp_size)]
    dist.all_gather(pieces, logits[0].contiguous())
    gathered = gather_shards(pieces, shard["cu_seqlens_padded"])
    real = shard_collated_batch(batch, context.cp_size, 0, pad_id, 16)  # any rank's boundaries: all alike
    lengths, padded = batch["cu_seqlens"].diff().cuda(), real["cu_seqlens_padded"].diff().cuda()
    position = torch.arange(int(padded.sum()), device="cuda") - torch.repeat_interleave(
        real["cu_seqlens_padded"][:-1].cuda(), padded
    )
    keep = position < torch.repeat_interleave(lengths, padded)
    result = {
        "model": tag,
        "dtype": dtype,
        "cp_comm_type": comm_type,
        "tokens": int(batch["cu_seqlens"][-1]),
        "logits_rel_l2": rel_l2(gathered[keep], whole.logits.reshape(-1, whole.logits.shape[-1])),
        "loss_rel": abs(cp_loss.item() / whole_loss.item() - 1),
        "grad_rel_l2": rel_l2(grads, flat_grads(whole_model)),
    }
    limit = LIMITS[dtype]
    result["ok"] = all(result[key] < limit for key in ("logits_rel_l2", "loss_rel", "grad_rel_l2"))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    context = init_distributed(cp_size=int(os.environ.get("WORLD_SIZE", 1)))  # one CP group of every rank
    parallel_mesh(context.cp_size)
    results = [compare(case, context) for case in CASES]
    if context.is_main:
        text = json.dumps(results, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text)
    ok = all(result["ok"] for result in results)
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
