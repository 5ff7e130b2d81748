"""Context parallelism on CPU ranks: the (dp, cp) grid, the loader's per-group batches, and exact gradients.

TE's ring attention needs GPUs (tests/test_context_parallel_gpu.py), so the multi-rank test here trains a tokenwise
stand-in for ESM-2 (embeddings with token dropout, per-token layers, an LM head): on 4 gloo ranks as 2 data-parallel
x 2 context-parallel ranks it must give the gradients, token-dropout fractions and loss of one process holding both
packed batches whole. That checks everything CP adds except attention: the mesh and its groups, each rank's share
of the batch, token-dropout counts reduced over the CP group only, the loss normaliser over dp x cp, the model's
extra inputs reaching the backbone, and DDP's and FSDP2's gradient reduction over every rank.
"""

import multiprocessing
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import compose, free_port
from torch import nn

from collator import BatchLayout, MLMMasker, THDCollator
from context_parallel import IGNORE_INDEX, gather_shards, masked_fraction, pad_sequences, shard_collated_batch
from distributed import DistributedContext
from model import MaskedLMTuple

PAD, MASK, WORLD, CP = 1, 32, 4, 2
LENGTHS = ([37, 64, 5, 90], [120, 33, 17])  # the packed batch of data-parallel rank 0, and of rank 1


def collated_batch(dp_rank: int) -> dict:
    """Data-parallel rank `dp_rank`'s packed batch as THDCollator builds it (<cls>, residues, <eos>; padded to 8)."""
    masker = MLMMasker(
        mask_token_id=MASK, special_token_ids=[0, 1, 2, 3, MASK], random_token_ids=range(4, 24), max_seq_length=512
    )
    rng = np.random.default_rng(dp_rank)
    samples = [{"input_ids": [0, *rng.integers(4, 24, n - 2).tolist(), 2]} for n in LENGTHS[dp_rank]]
    return THDCollator(masker, PAD, token_multiple=8)(samples)


class Backbone(nn.Module):
    """ESM-2's token-dropout embeddings and residual per-token layers: no attention, so CP needs no exchange."""

    cp_group = None

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(33, 16)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

    def forward(self, input_ids, cu_seqlens, cu_seqlens_padded=None, local_cu_seqlens=None):
        ids = input_ids.reshape(-1)
        is_mask = ids == MASK
        if local_cu_seqlens is None:
            fraction = masked_fraction(is_mask, cu_seqlens, cu_seqlens)
        else:
            fraction = masked_fraction(is_mask, local_cu_seqlens, cu_seqlens, reduce=self._sum_over_cp)
        self.last_fraction = fraction
        hidden = self.embed(ids).masked_fill(is_mask[:, None], 0.0) * (1 - 0.12) / (1 - fraction)[:, None]
        for layer in self.encoder.layer:
            hidden = hidden + torch.tanh(layer(hidden))
        return hidden

    def _sum_over_cp(self, counts):
        import torch.distributed as dist

        dist.all_reduce(counts, group=self.cp_group)
        return counts


class TokenwiseMLM(nn.Module):
    """A masked LM whose forward takes a CP shard's inputs as NVEsmForMaskedLM's does, and passes them on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.esm = Backbone()
        self.head = nn.Linear(16, 33)

    def forward(self, input_ids, cu_seqlens, max_seqlen, cu_seqlens_padded=None, local_cu_seqlens=None):
        hidden = self.esm(input_ids, cu_seqlens, cu_seqlens_padded=cu_seqlens_padded, local_cu_seqlens=local_cu_seqlens)
        return MaskedLMTuple(None, self.head(hidden))  # a tuple: FSDP2 sees it


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    from parallel import plain_name

    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[plain_name(name)] = grad.detach().clone()
    return grads


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import train_ddp
    import train_fsdp2
    from distributed import destroy_distributed, init_distributed, parallel_mesh, sharding_mesh
    from training import forward_backward

    context = init_distributed(cp_size=CP)
    mesh = parallel_mesh(CP)
    out = {
        "grid": (context.dp_rank, context.cp_rank),
        "cp_group": dist.get_process_group_ranks(mesh["cp"].get_group()),
        "dp_group": dist.get_process_group_ranks(mesh["dp"].get_group()),
    }
    shard = shard_collated_batch(collated_batch(context.dp_rank), CP, context.cp_rank, PAD, token_multiple=8)
    out["shard_tokens"] = shard["input_ids"].numel()
    for strategy in (train_ddp.STRATEGY, train_fsdp2.STRATEGY):
        model = TokenwiseMLM()
        model.esm.cp_group = mesh["cp"].get_group()
        if strategy.name == "ddp":
            wrapped = train_ddp.apply_ddp(model, context.device)
        else:
            wrapped = model
            train_fsdp2.apply_fsdp2(model, sharding_mesh(context), None, None, reshard=True)
        loss = forward_backward(wrapped, strategy, [shard], context.world_size)
        out[strategy.name] = (float(loss), _full_grads(wrapped), model.esm.last_fraction.clone())
    results[rank] = out
    destroy_distributed()


def _reference() -> tuple[float, dict[str, torch.Tensor], list[torch.Tensor]]:
    """One process, both packed batches whole: the mean loss over every masked token, its gradients, the fractions."""
    model = TokenwiseMLM()
    batches = [collated_batch(dp) for dp in range(2)]
    count = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
    loss, fractions = 0.0, []
    for batch in batches:
        logits = model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"]).logits
        fractions.append(model.esm.last_fraction)
        loss = loss + torch.nn.functional.cross_entropy(
            logits.reshape(-1, 33), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    loss = loss / count
    loss.backward()
    return loss.item(), _full_grads(model), fractions


def test_two_by_two_grid_trains_exactly_like_one_process_with_whole_sequences():
    results = mp.Manager().dict()
    # Forked from a server that imported the recipe once: 4 ranks importing torch and the recipe on 2 cores took 9 s
    # more. The preload applies when this process starts its fork server (else it is already running: slower only).
    multiprocessing.set_forkserver_preload([__name__, "train_ddp", "train_fsdp2"])
    mp.start_processes(_worker, args=(free_port(), results), nprocs=WORLD, join=True, start_method="forkserver")
    ranks = [results[rank] for rank in range(WORLD)]
    # the grid is row-major: CP groups are neighbouring ranks, data-parallel groups take one rank of each
    assert [r["grid"] for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["cp_group"] for r in ranks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp_group"] for r in ranks] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["shard_tokens"] % 8 == 0 for r in ranks)  # each rank's share meets the precision's multiple
    loss, grads, fractions = _reference()
    for name in ("ddp", "fsdp2"):
        assert sum(r[name][0] for r in ranks) / WORLD == pytest.approx(loss, rel=1e-6)  # the logged loss: their mean
        for rank in ranks:
            for key, expected in grads.items():
                torch.testing.assert_close(rank[name][1][key], expected, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")
        for dp in range(2):  # token-dropout fractions: counts summed over the CP group only, not the world
            batch = collated_batch(dp)
            whole = pad_sequences(
                batch["input_ids"].reshape(-1), batch["labels"].reshape(-1), batch["cu_seqlens"], CP, PAD, 8
            )
            shards = [ranks[dp * CP + cp][name][2] for cp in range(CP)]
            gathered = gather_shards(shards, whole["cu_seqlens_padded"])
            real = whole["position_ids"] < torch.repeat_interleave(
                batch["cu_seqlens"].diff(), whole["cu_seqlens_padded"].diff()
            )
            torch.testing.assert_close(gathered[real], fractions[dp], rtol=0, atol=0)


def _context(rank: int, world_size: int, cp_size: int) -> DistributedContext:
    return DistributedContext(rank, rank, world_size, torch.device("cpu"), cp_size)


def test_every_rank_of_a_cp_group_keeps_its_chunks_of_its_data_parallel_ranks_batch(tokenizer):
    """The loader shards by data-parallel rank: a CP group's shards reassemble the batch that dp rank reads alone."""
    from loader import build_dataloaders

    cfg = compose(
        "L0_sanity",
        [
            "use_sequence_packing=true",
            "dataset.validation_size=0",
            "dataset.num_workers=0",
            "token_micro_batch_size=1024",
        ],
    )
    layout = BatchLayout.from_config(cfg)

    def first_batches(context, count=3):
        stream, _ = build_dataloaders(cfg, layout, context, tokenizer)
        batches = iter(stream)
        return [next(batches) for _ in range(count)], stream

    for dp_rank in range(2):  # 4 ranks as 2 x 2, against 2 data-parallel ranks without CP
        plain, _ = first_batches(_context(dp_rank, 2, 1))
        shards = [first_batches(_context(dp_rank * 2 + cp, 4, 2))[0] for cp in range(2)]
        for index, whole in enumerate(plain):
            mine = [shards[cp][index] for cp in range(2)]
            padded = mine[0]["cu_seqlens_padded"]
            assert torch.equal(mine[1]["cu_seqlens_padded"], padded) and mine[0]["max_seqlen"] == mine[1]["max_seqlen"]
            unsplit = pad_sequences(
                whole["input_ids"].reshape(-1), whole["labels"].reshape(-1), whole["cu_seqlens"], 2, PAD, 8
            )
            for key in ("input_ids", "labels"):
                assert torch.equal(gather_shards([m[key].reshape(-1) for m in mine], padded), unsplit[key])
            assert torch.equal(mine[0]["cu_seqlens"], whole["cu_seqlens"])
    # the data position is one global count: saved under cp_size=2, resumed on one rank without CP, no pack repeated
    _, stream = first_batches(_context(1, 2, 2), count=2)
    state = stream.state_dict()
    assert state["consumed"] == 2 and state["world_size"] == 1
    one_rank, _ = first_batches(_context(0, 1, 1), count=3)
    fresh, _ = build_dataloaders(cfg, layout, _context(0, 1, 1), tokenizer)
    fresh.load_state_dict(state)
    assert torch.equal(next(iter(fresh))["input_ids"], one_rank[2]["input_ids"])
