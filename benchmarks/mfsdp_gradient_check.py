"""Megatron-FSDP gradients on N GPUs against an unsharded copy of the same model, parameter by parameter.

    torchrun --nproc_per_node=2 benchmarks/mfsdp_gradient_check.py [--strategy optim_grads_params] [--trace]

Every rank wraps the TE ESM-2 model exactly as train_mfsdp.py does (`apply_megatron_fsdp`), runs one forward and
backward on its own batch, and reads the reduced gradient norms with `parallel.gradient_norms`. Every rank also
holds a plain copy of the same BF16 weights and computes the gradient of the same global mean loss over all ranks'
batches. With correct averaging the two agree to BF16 rounding; a parameter whose ratio is 2 (summed, not
averaged) or 0 (lost) is a bug. `--trace` also prints Megatron-FSDP's gradient buckets, how often each was
reduced, and the gradient hooks on every parameter. Writes a JSON report to --out on rank 0 and exits non-zero
when a parameter is off by more than 5%.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_mfsdp
from collator import IGNORE_INDEX
from model import cast_parameters, load_model_config
from modeling_esm_te import NVEsmConfig, NVEsmForMaskedLM
from parallel import gradient_norms
from train_mfsdp import apply_megatron_fsdp, mfsdp_grad_sync
from training import mlm_loss, model_inputs

TOLERANCE = 0.05
CLS_ID, EOS_ID = 0, 2  # the ESM alphabet's <cls> and <eos> (tokenizers/esm2)


def make_batch(rank: int, config: NVEsmConfig, device: torch.device, size: int, length: int) -> dict[str, torch.Tensor]:
    """Random residues between <cls> and <eos>, 15% of them masked for the loss; seeded by the rank."""
    generator = torch.Generator().manual_seed(1000 + rank)
    input_ids = torch.randint(4, 24, (size, length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = CLS_ID, EOS_ID
    selected = torch.rand(input_ids.shape, generator=generator) < 0.15
    selected[:, 0] = selected[:, -1] = False
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    input_ids = input_ids.masked_fill(selected, config.mask_token_id)
    mask = torch.ones_like(input_ids)
    return {
        key: value.to(device) for key, value in (("input_ids", input_ids), ("attention_mask", mask), ("labels", labels))
    }


def summed_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return mlm_loss(model(**model_inputs(batch)).logits, batch["labels"], reduction="sum")


class HookCounter:
    """Counts the post-accumulate-grad hooks registered on each parameter while Megatron-FSDP wraps the model."""

    def __init__(self) -> None:
        self.counts: collections.Counter[int] = collections.Counter()
        self._original = torch.Tensor.register_post_accumulate_grad_hook

    def __enter__(self) -> HookCounter:
        counts, original = self.counts, self._original

        def counting(tensor: torch.Tensor, hook):
            counts[id(tensor)] += 1
            return original(tensor, hook)

        torch.Tensor.register_post_accumulate_grad_hook = counting
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.register_post_accumulate_grad_hook = self._original


def trace_reductions() -> collections.Counter[tuple[int, ...]]:
    """Count Megatron-FSDP's gradient reductions per bucket group."""
    from megatron_fsdp.param_and_grad_buffer import GradReducePipeline

    counts: collections.Counter[tuple[int, ...]] = collections.Counter()
    original = GradReducePipeline._bucket_group_gradient_reduce

    def counting(self, bucket_group, *args, **kwargs):
        counts[tuple(bucket_group)] += 1
        return original(self, bucket_group, *args, **kwargs)

    GradReducePipeline._bucket_group_gradient_reduce = counting
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="esm2_t6_8M_UR50D")
    parser.add_argument("--strategy", default="optim_grads_params")
    parser.add_argument("--no-overlap", action="store_true", help="overlap_grad_reduce/param_gather off")
    parser.add_argument("--meta", action="store_true", help="build on meta and let Megatron-FSDP initialise")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument(
        "--dict-output", action="store_true", help="skip train_mfsdp.return_tuple_outputs (shows the defect it fixes)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    config = NVEsmConfig.from_esm_config(load_model_config(args.model), attn_input_format="bshd")

    torch.manual_seed(0)
    source = NVEsmForMaskedLM(config, device="meta" if args.meta else device)
    mesh = init_device_mesh("cuda", (world, 1), mesh_dim_names=("dp", "tp"))
    reductions = trace_reductions() if args.trace else collections.Counter()
    if args.dict_output:
        train_mfsdp.return_tuple_outputs = lambda model: None
    with HookCounter() as hooks:
        wrapped = apply_megatron_fsdp(
            source,
            mesh,
            device,
            zero_dp_strategy=args.strategy,
            main_params_dtype=torch.float32,
            main_grads_dtype=torch.float32,
            overlap_grad_reduce=not args.no_overlap,
            overlap_param_gather=not args.no_overlap,
            on_meta=args.meta,
        )

    # The unsharded twin: every weight gathered from the shards (collectives in the same order on every rank).
    from megatron_fsdp.uneven_dtensor import uneven_dtensor_to_full_tensor
    from torch.distributed.tensor import DTensor

    full = {}
    for name, param in wrapped.module.named_parameters():
        value = uneven_dtensor_to_full_tensor(param) if isinstance(param, DTensor) else param
        full[name] = value.detach().to(torch.bfloat16)
    reference = NVEsmForMaskedLM(config, device=device)
    cast_parameters(reference, torch.bfloat16)
    absent = [name for name, _ in reference.named_parameters() if name not in full]
    assert not absent, f"parameters not found in the wrapped model: {absent}"
    reference.load_state_dict(full, strict=False)

    batches = [make_batch(r, config, device, args.batch, args.length) for r in range(world)]
    total = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))

    wrapped.train()
    with mfsdp_grad_sync(wrapped, True):
        loss = summed_loss(wrapped, batches[rank]) * (world / total)
        loss.backward()
    got = gradient_norms(wrapped)

    reference.train()
    reference_loss = sum(summed_loss(reference, batch) / total for batch in batches)
    reference_loss.backward()
    expected = {name: param.grad.float().norm().item() for name, param in reference.named_parameters()}
    losses = torch.stack([loss.detach() / world]).float()
    dist.all_reduce(losses)

    rows = []
    for name, norm in got.items():
        want = expected.get(name)
        ratio = norm / want if want else float("nan")
        rows.append({"param": name, "mfsdp": norm, "reference": want, "ratio": ratio})
    bad = [row for row in rows if not abs(row["ratio"] - 1) <= TOLERANCE]
    report = {
        "strategy": args.strategy,
        "meta": args.meta,
        "overlap": not args.no_overlap,
        "dict_output": args.dict_output,
        "world_size": world,
        "loss_mfsdp": losses.item(),
        "loss_reference": reference_loss.item(),
        "params_off": [row["param"] for row in bad],
        "rows": rows,
    }
    if args.trace:
        buffer = wrapped.param_and_grad_buffer
        report["buckets"] = [
            {
                "id": index,
                "fsdp_unit": group.fsdp_unit_id,
                "params": [buffer.param_to_name[p] for p in group.params],
                "bucket_group": buffer.bucket_to_bucket_group[index],
            }
            for index, group in enumerate(buffer.parameter_groups)
            if group.fsdp_unit_id is None
        ]
        report["reductions"] = {str(list(group)): count for group, count in reductions.items()}
        report["hooks_per_param"] = {
            name: hooks.counts[id(param)] for name, param in wrapped.raw_param.items() if hooks.counts[id(param)] != 1
        }
        report["shared_flags"] = {
            name: bool(getattr(param, "_is_shared", False)) for name, param in wrapped.raw_param.items()
        }
        report["module_tied"] = (
            wrapped.module.lm_head.decoder.weight is wrapped.module.esm.embeddings.word_embeddings.weight
        )
    if rank == 0:
        summary = {key: value for key, value in report.items() if key != "rows"}
        print(json.dumps(summary, indent=1))
        for row in rows:
            flag = "  <-- off" if row in bad else ""
            print(f"{row['ratio']:8.4f}  {row['mfsdp']:10.4e}  {row['reference'] or 0:10.4e}  {row['param']}{flag}")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
